"""One projection's worker, as `ringiflow projector GROUP` runs it, but reading as a
consumer group of its own, so each benchmark round reads the topics from the start.

    python -m benchmarks.projector_worker GROUP CONSUMER_GROUP PORT
"""

from __future__ import annotations

import logging
import sys

from infra.settings import load_settings
from streams.worker import run_projector


def main() -> None:
    group, consumer_group, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings = load_settings().with_runtime()
    logging.basicConfig(level=settings.log_level.upper())
    run_projector(group, settings, port, consumer_group)


if __name__ == "__main__":
    main()
