"""A Faust worker on the batch drain whose "store" is an append-only log file, for
the rebalance tests (test_rebalance.py).

    python -m tests.integration.batch_worker BOOTSTRAP TOPIC GROUP LOGDIR

Each batch is written to LOGDIR/<pid>.log (one line per record: time_ns, partition,
offset, key, value) and flushed before the batch is acknowledged -- what a store does
before it may commit -- so a SIGKILL can lose only unacknowledged records."""

from __future__ import annotations

import os
import sys
import tempfile
import time

import faust

from streams.batching import batches
from streams.consumer import ProjectorApp, fetch_max_wait_ms


def main() -> None:
    bootstrap, topic_name, group, log_dir = sys.argv[1:5]
    app = ProjectorApp(
        group, fetch_max_wait_ms=fetch_max_wait_ms(bootstrap, None),
        broker=[f"kafka://{h}" for h in bootstrap.split(",")], value_serializer="raw",
        key_serializer="raw", store="memory://", web_enabled=False,
        datadir=tempfile.mkdtemp(prefix="batch-worker-"), topic_disable_leader=True,
        topic_allow_declare=False, consumer_auto_offset_reset="earliest",
        stream_wait_empty=False, broker_max_poll_records=50,
        broker_commit_interval=0.5,  # commit often: a kill then repeats little
        broker_session_timeout=6.0, broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=6.0)
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes)
    log = open(os.path.join(log_dir, f"{os.getpid()}.log"), "a")

    @app.agent(topic, concurrency=1)
    async def write_log(stream: faust.StreamT) -> None:
        async for batch in batches(stream):
            now = time.time_ns()
            log.write("".join(
                f"{now} {r.partition} {r.offset} {r.key.decode()} {r.value.decode()}\n"
                for r in batch.records))
            log.flush()
            batch.ack()

    sys.argv = [sys.argv[0], "worker", "--loglevel", "warning"]
    faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False,
                 override_logging=False).execute_from_commandline()


if __name__ == "__main__":
    main()
