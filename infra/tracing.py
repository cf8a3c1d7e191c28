"""OpenTelemetry tracing: on when the standard OTEL_* variables name an exporter,
off -- a no-op tracer, nothing injected, nothing exported -- otherwise.

One trace per command (ADR 0008): the command API's request span, its append span
(whose context is stored with the outbox row, as the row's `traceparent`), the
relay's `send <topic>` span continuing that context (and replacing the header with
its own, so a record carries one traceparent), each consumer group's
`process <topic>` span linked to the send span of every event in its batch, the
store writes beneath it, derived records carrying it on, and a query's consistency
wait linked to the trace that wrote the version it waited for."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()
tracer = trace.get_tracer("ringiflow")
_enabled = False

__all__ = ["SpanKind", "tracer"]


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    """What the OTEL_* variables ask for: an exporter named, or an OTLP endpoint set."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER")
    if exporter is not None:
        return exporter.strip().lower() not in ("", "none")
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def enabled() -> bool:
    return _enabled


def setup(component: str) -> bool:
    """Install the SDK for this process when the environment asks for it: spans go
    over OTLP/HTTP (the exporter reads its own OTEL_EXPORTER_OTLP_* settings), and
    PostgreSQL and Redis calls get spans of their own. Returns whether it is on."""
    global _enabled
    if _enabled or not wanted():
        return _enabled
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: f"ringiflow-{component}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    PsycopgInstrumentor().instrument(enable_commenter=False, skip_dep_check=True)
    RedisInstrumentor().instrument()
    _enabled = True
    return True


def instrument_app(app: Any) -> None:
    """Server spans for a FastAPI app (health and metrics scrapes left out)."""
    if _enabled:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics")


def flush() -> None:
    """Export what is buffered now (a CLI run ends before the batch timer fires)."""
    provider = trace.get_tracer_provider()
    if _enabled and hasattr(provider, "force_flush"):
        provider.force_flush(5000)


def span(name: str, attributes: Callable[[], dict[str, Any]]) -> AbstractContextManager[Any]:
    """A current span when tracing is on; when off, nothing: not even the attributes
    are built (a hot path's no-op span cost a command ~3 % of its CPU)."""
    if not _enabled:
        return nullcontext()
    return tracer.start_as_current_span(name, attributes=attributes())


def current_span_context() -> SpanContext | None:
    context = trace.get_current_span().get_span_context()
    return context if _enabled and context.is_valid else None


def traceparent_of(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def context_from(traceparent: str | None) -> Context | None:
    """The remote parent a `traceparent` value names, or None."""
    if not traceparent:
        return None
    context = PROPAGATOR.extract({"traceparent": traceparent})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def span_context_from(traceparent: str | None) -> SpanContext | None:
    context = context_from(traceparent)
    return trace.get_current_span(context).get_span_context() if context else None


def links_to(traceparents: Iterable[str | None]) -> list[Link]:
    """One link per distinct span the values name."""
    seen: dict[tuple[int, int], SpanContext] = {}
    for value in traceparents:
        context = span_context_from(value)
        if context is not None:
            seen.setdefault((context.trace_id, context.span_id), context)
    return [Link(c) for c in seen.values()]


def remote_trace(trace_id_hex: str) -> SpanContext | None:
    """A context in another trace known only by its id (an event's metadata)."""
    try:
        trace_id = int(trace_id_hex, 16)
    except (TypeError, ValueError):
        return None
    if not trace_id:
        return None
    return SpanContext(trace_id, int.from_bytes(os.urandom(8), "big") | 1, is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))


def with_traceparent(headers: list[tuple[str, bytes]], context: SpanContext,
                     ) -> list[tuple[str, bytes]]:
    """The headers with `traceparent` replaced by `context`: a record carries one."""
    return [(k, v) for k, v in headers if k != "traceparent"] + \
        [("traceparent", traceparent_of(context).encode())]


def kafka_attributes(topic: str, operation: str, **extra: Any) -> dict[str, Any]:
    """Messaging semantic conventions for Kafka."""
    return {"messaging.system": "kafka", "messaging.operation.type": operation,
            "messaging.operation.name": operation, "messaging.destination.name": topic,
            **{k: v for k, v in extra.items() if v is not None}}
