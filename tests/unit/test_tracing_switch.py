"""Tracing is on only when the standard OTEL_* variables ask for an exporter."""

from __future__ import annotations

from infra import tracing


def test_tracing_follows_the_standard_otel_variables() -> None:
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none",
                               "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true",
                               "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})


def test_off_it_stores_no_span_and_links_only_what_a_traceparent_names() -> None:
    assert tracing.current_span_context() is None  # nothing set up in this process
    parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    links = tracing.links_to([parent, parent, None, "garbage"])
    assert [(f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}")
            for link in links] == [("ab" * 16, "cd" * 8)]
    headers = tracing.with_traceparent([("traceparent", b"old"), ("event_id", b"e")],
                                       links[0].context)
    assert headers == [("event_id", b"e"), ("traceparent", parent.encode())]
