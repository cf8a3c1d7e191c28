"""One projection (or one service: streams.services) as a Faust worker: its own
consumer group, one ordered agent (concurrency 1), batches taken without
acknowledgement and acknowledged only after the processor has applied or
dead-lettered every event of the batch, so Faust can only commit offsets of events
that live somewhere.

Faust acks an event whose agent raised ("acked and not processed again", its agents
guide); here the agent never raises for an event: errors are the processor's business.
Its web server serves /healthz, /readyz and /metrics: per-partition lag, event age,
counters, and a flag for a partition that has lag but stopped advancing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import faust
from prometheus_client import Gauge, Histogram, generate_latest
from psycopg_pool import AsyncConnectionPool

from infra import gc_tuning, logsafe, tracing
from infra.settings import Settings, libpq_url
from infra.telemetry import HOP_BUCKETS, observe_many
from infra.tracing import SpanKind
from projectors.catalogue import CATALOGUE
from streams.batching import batches
from streams.consumer import ProjectorApp, fetch_max_wait_ms
from streams.deadletters import AnyRecord, DeadLetters, header
from streams.processor import Processor
from streams.services import SERVICES, Runner
from streams.wrappers import RetryPolicy

log = logging.getLogger("ringiflow.worker")

LAG = Gauge("ringiflow_consumer_lag", "Records behind the partition's end",
            ["group", "topic", "partition"])
STALLED = Gauge("ringiflow_partition_stalled",
                "1 when a partition has lag but has not advanced for stall_after_s",
                ["group", "topic", "partition"])
CONSUME_DELAY = Histogram("ringiflow_consume_delay_seconds",
                          "Relay send (the record's timestamp) to this worker receiving it",
                          ["group"], buckets=HOP_BUCKETS)
APPLY_DELAY = Histogram("ringiflow_apply_delay_seconds",
                        "Received by this worker to applied or dead-lettered", ["group"],
                        buckets=HOP_BUCKETS)
BATCH_RECORDS = Histogram("ringiflow_batch_records", "Records per delivered fetch", ["group"],
                          buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000))


class RecentDelays:
    """Apply delays of the last events (received -> applied), for `ringiflow lag`:
    a recent p50/p99 where the /metrics histogram holds everything since start."""

    def __init__(self, window_s: float = 300.0, keep: int = 20_000) -> None:
        self.window_s = window_s
        self.seen: deque[tuple[float, float]] = deque(maxlen=keep)

    def extend(self, delays: Iterable[float]) -> None:
        now = time.monotonic()
        self.seen.extend((now, d) for d in delays)

    def summary(self) -> dict[str, Any]:
        since = time.monotonic() - self.window_s
        recent = sorted(d for at, d in self.seen if at >= since)

        def at(q: float) -> float | None:
            return round(recent[min(len(recent) - 1, int(q * len(recent)))] * 1000, 2) \
                if recent else None

        return {"window_s": self.window_s, "events": len(recent), "p50_ms": at(.5),
                "p99_ms": at(.99)}


class Progress:
    """Where each partition is, for lag and stall detection."""

    def __init__(self, group: str, stall_after_s: float) -> None:
        self.group, self.stall_after_s = group, stall_after_s
        self.next_offset: dict[tuple[str, int], int] = {}
        self.moved_at: dict[tuple[str, int], float] = {}

    def advanced(self, records: Sequence[AnyRecord]) -> None:
        now = time.monotonic()
        last = {(r.topic, r.partition): r.offset for r in records}  # delivered in order
        for where, offset in last.items():
            self.next_offset[where] = offset + 1
            self.moved_at[where] = now

    def report(self, highwaters: dict[tuple[str, int], int]) -> list[str]:
        stalled = []
        now = time.monotonic()
        for (topic, partition), end in highwaters.items():
            position = self.next_offset.get((topic, partition))
            lag = max(0, end - position) if position is not None else 0
            LAG.labels(self.group, topic, str(partition)).set(lag)
            moved = self.moved_at.setdefault((topic, partition), now)
            stuck = lag > 0 and now - moved > self.stall_after_s
            STALLED.labels(self.group, topic, str(partition)).set(int(stuck))
            if stuck:
                stalled.append(f"{topic}[{partition}] lag {lag}, no progress for "
                               f"{now - moved:.0f} s")
        return stalled


def process_span(group: str, records: Sequence[AnyRecord]) -> AbstractContextManager[Any]:
    """`process <topic>` for a batch: linked to the send span of every event in it,
    and the child of that span when the batch holds one event (one connected trace)."""
    if not tracing.enabled():
        return contextlib.nullcontext()
    topics = sorted({r.topic for r in records})
    parents = [header(r, "traceparent") for r in records]
    extra: dict[str, Any] = {"messaging.consumer.group.name": group,
                             "messaging.batch.message_count": len(records)}
    if len(records) == 1:
        r = records[0]
        extra |= {"messaging.destination.partition.id": str(r.partition),
                  "messaging.kafka.offset": r.offset,
                  "messaging.kafka.message.key": (r.key or b"").decode(errors="replace")}
    return tracing.tracer.start_as_current_span(
        f"process {','.join(topics)}", kind=SpanKind.CONSUMER,
        context=tracing.context_from(parents[0]) if len(records) == 1 else None,
        links=tracing.links_to(parents),
        attributes=tracing.kafka_attributes(",".join(topics), "process", **extra))


def build_app(group: str, settings: Settings, port: int, datadir: Path,
              consumer_group: str | None = None) -> faust.App:
    """`consumer_group`: the Kafka group to read as (default: the projection's own);
    benchmarks read the same topics again from the start under a new one."""
    bootstrap = settings.require("kafka_bootstrap")
    app = ProjectorApp(
        consumer_group or group,
        fetch_max_wait_ms=fetch_max_wait_ms(bootstrap, settings.worker_fetch_max_wait_ms),
        broker=[f"kafka://{host}" for host in bootstrap.split(",")],
        value_serializer="raw", key_serializer="raw", store="memory://",
        datadir=str(datadir), topic_disable_leader=True, topic_allow_declare=False,
        # An unfinished batch is never acknowledged, so shutdown must not wait for it
        # (it is redelivered after the restart).
        consumer_auto_offset_reset="earliest", stream_wait_empty=False,
        broker_max_poll_records=settings.worker_batch_size,
        stream_buffer_maxsize=settings.worker_batch_size * 4,
        web_enabled=True, web_port=port, web_bind=settings.workers_host,
        web_host=settings.workers_host, web_in_thread=False,
        # A worker that dies without leaving its group (SIGKILL, a lost host) holds its
        # partitions this long: seconds, not Kafka's 45 s or Faust's 60 s default. Not a
        # stand-in workaround: the same on Apache Kafka (ADR 0006).
        broker_session_timeout=settings.worker_session_timeout_s,
        broker_heartbeat_interval=min(1.0, settings.worker_session_timeout_s / 3),
        broker_rebalance_timeout=settings.worker_session_timeout_s,
    )
    url = libpq_url(settings.role_database_url("projector"))
    pool = AsyncConnectionPool(url, min_size=1, max_size=4, open=False)
    dead_letters = DeadLetters(group, bootstrap, pool, settings.worker_parked_keep_s)
    processor: Runner
    if group in CATALOGUE:
        processor = Processor(CATALOGUE[group](settings), dead_letters,
                              RetryPolicy(attempts=settings.worker_retry_attempts),
                              parked_cap=settings.parked_aggregates_cap)
    else:
        processor = SERVICES[group].build(settings, dead_letters, pool)
    topic = app.topic(*processor.topics, key_type=bytes, value_type=bytes)
    progress = Progress(group, settings.stall_after_s)
    consume_delay, apply_delay = CONSUME_DELAY.labels(group), APPLY_DELAY.labels(group)
    batch_records = BATCH_RECORDS.labels(group)
    delays = RecentDelays()
    state: dict[str, Any] = {"started": False, "stalled": []}

    def restart(why: str, exc: BaseException) -> None:
        """Stop, so the supervisor starts this worker afresh: an agent that raised
        would be restarted by Faust with what failed (a closed pool, a half-read
        batch) still in place."""
        if not processor.stop.is_set():
            log.critical("%s: %s (%s: %s); stopping the worker so it restarts", group, why,
                         type(exc).__name__, exc, exc_info=exc)
            app.loop.call_soon(lambda: os.kill(os.getpid(), signal.SIGTERM))

    async def open_stores() -> bool:
        try:
            await pool.open(wait=True, timeout=30)
            await processor.start()
        except Exception as exc:
            restart("its stores could not be opened; check that PostgreSQL (and the "
                    "projection's store) can be reached with the settings given", exc)
            return False
        # Batches share one read of the parked set while this listens for changes.
        state["watch"] = asyncio.get_running_loop().create_task(dead_letters.watch(url))
        state["started"] = True
        return True

    @app.agent(topic, name=group, concurrency=1)
    async def project(stream: faust.StreamT) -> None:
        # Whole fetches, acknowledged only once applied or dead-lettered: nothing is
        # acknowledged on an exception, at shutdown or by Faust's passive drainer.
        # Asked for before the stores open, which can take seconds (OpenSearch).
        incoming = batches(stream)
        if not state["started"] and not await open_stores():
            return
        async for batch in incoming:
            records = batch.records  # aiokafka's records, as the processor reads them
            assignment = app.consumer.assignment()
            if assignment != state.get("assignment"):
                # A partition taken over may have aggregates its last owner parked.
                dead_letters.forget()
                state["assignment"] = assignment
            batch_records.observe(len(records))
            received = batch.received
            observe_many(consume_delay, [max(0.0, received - r.timestamp / 1000)
                                         for r in records if r.timestamp])
            try:
                with process_span(group, records):
                    await processor.process(records)
            except Exception as exc:
                # Never let the agent raise: Faust would restart it and acknowledge past
                # the unfinished batch (faust#606). The batch stays unacknowledged and
                # is redelivered to the restarted worker.
                restart("batch failed unexpectedly; it will be redelivered", exc)
                return
            done = time.time()
            apply_delay.observe(done - received)
            delays.extend([done - received] * len(records))
            progress.advanced(records)
            batch.ack()  # only now may Faust commit these offsets

    @app.timer(interval=5.0)
    async def watch() -> None:
        assigned = app.consumer.assignment()
        highwaters = {(tp.topic, tp.partition): app.consumer.highwater(tp) or 0
                      for tp in assigned}
        state["stalled"] = progress.report(highwaters)
        for line in state["stalled"]:
            log.error("%s: partition stalled: %s", group, line)

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok", "component": group})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        ready = state["started"] and bool(app.consumer.assignment()) and not state["stalled"]
        return web.json({"status": "ready" if ready else "not_ready", "component": group,
                         "stalled_partitions": state["stalled"]},
                        status=200 if ready else 503)

    @app.page("/apply-delay")
    async def apply_delay_page(web: Any, request: Any) -> Any:
        return web.json({"group": group, **delays.summary()})

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        # aiohttp wants the charset apart from the content type.
        return web.text(generate_latest().decode(), content_type="text/plain")

    @app.on_before_shutdown.connect
    def _stopping(app: faust.App, **kwargs: Any) -> None:
        processor.stop.set()  # an unfinished batch stays unacknowledged: redelivered later
        if (watching := state.get("watch")) is not None:
            watching.cancel()

    return app


def run_projector(group: str, settings: Settings, port: int,
                  consumer_group: str | None = None) -> None:
    datadir = settings.data_path / "faust" / group
    datadir.mkdir(parents=True, exist_ok=True)
    app = build_app(group, settings, port, datadir, consumer_group)
    # Faust keeps the process's logging (override_logging=False): what `ringiflow
    # projector` configured, with every record redacted (no token or password).
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True,
                          redirect_stdouts=False, override_logging=False)
    logsafe.install()
    tracing.setup(f"worker-{group}")
    gc_tuning.settle()
    worker.execute_from_commandline()
