"""A Faust agent that does nothing with its records, to time Faust itself (issue 15).

    python -m benchmarks.noop_agent --bootstrap HOST:PORT --topics T [T ...]
        --total N [--path batches|events]

``batches``: the agent iterates :func:`streams.batching.batches` and acknowledges
each fetch (the projector workers' path). ``events``: Faust's own per-record path,
``stream.noack()`` with an ack per event. Prints ``RATE <records>/<seconds>`` once the
agent has seen `--total` records, then exits."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import uuid

import faust

from streams.batching import batches
from streams.consumer import ProjectorApp, fetch_max_wait_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topics", nargs="+", required=True)
    parser.add_argument("--total", type=int, required=True)
    parser.add_argument("--path", choices=("batches", "events"), default="batches")
    parser.add_argument("--max-poll-records", type=int, default=500)
    args = parser.parse_args()
    datadir = tempfile.mkdtemp(prefix="ringiflow-noop-")
    app = ProjectorApp(
        f"noop-{uuid.uuid4().hex[:8]}", fetch_max_wait_ms=fetch_max_wait_ms(args.bootstrap, None),
        deliver_batches=args.path == "batches",
        broker=[f"kafka://{h}" for h in args.bootstrap.split(",")], value_serializer="raw",
        key_serializer="raw", store="memory://", datadir=datadir, web_enabled=False,
        topic_disable_leader=True, topic_allow_declare=False,
        consumer_auto_offset_reset="earliest", stream_wait_empty=False,
        broker_max_poll_records=args.max_poll_records,
        stream_buffer_maxsize=args.max_poll_records * 4)
    topic = app.topic(*args.topics, key_type=bytes, value_type=bytes)
    seen, first, started = 0, 0, 0.0

    def count(n: int) -> None:
        # Timed from the first delivery, which itself is not counted: start-up and the
        # group join are not Faust's per-record cost.
        nonlocal seen, first, started
        if not started:
            first, started = n, time.perf_counter()
        seen += n
        if seen >= args.total:
            print(f"RATE {seen - first}/{time.perf_counter() - started:.6f}", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            seen = -(10**12)  # report once

    if args.path == "batches":
        @app.agent(topic, concurrency=1)
        async def noop(stream: faust.StreamT) -> None:
            async for batch in batches(stream):
                count(len(batch))
                batch.ack()
    else:
        @app.agent(topic, concurrency=1)
        async def noop_events(stream: faust.StreamT) -> None:
            quiet = stream.noack()
            async for event in quiet.events():
                count(1)
                await quiet.ack(event)

    sys.argv = [sys.argv[0], "worker", "--loglevel", "warning"]
    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
