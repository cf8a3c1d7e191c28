"""What one hostile user costs everyone else (issue 13).

    python -m benchmarks.fairness [--seconds 15] [--flood 400]

On one embedded stack with two tenants, the query API (2 processes, as `up` runs
it) serves tenant B's list pages at concurrency 4: first alone (the baseline),
then while one user of tenant A keeps `--flood` reads open, each with a forged
consistency token (a version that never comes) and `wait_ms=10000`, re-sent when it
ends (after the Retry-After of a 429). Printed: B's list p50/p99 under the flood as a ratio to
the baseline, how the flood's reads ended, and the longest forged wait next to its
10 s cap. Then the command API takes a 200 MB body without credentials: the time
to its 401 and the API process's RSS growth, next to a 1 KB body.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from collections import Counter
from uuid import uuid4

import aiohttp
import psutil

from benchmarks.common import add_broker_flag, app_process, embedded_stack, median, percentile
from benchmarks.queries import load, seed
from contract import AggregateType, ConsistencyToken

LIST = "/api/v1/queries/workflows?limit=20"
WAIT_MS = 10_000


async def reads(base: str, token: str, seconds: float) -> list[float]:
    """Tenant B's list pages at concurrency 4: their latencies."""
    return (await load(base, [LIST], token, 4, seconds))[1]


async def flood(base: str, token: str, workflow_ids: list[str], seconds: float,
                width: int) -> tuple[Counter[int], float, float]:
    """`width` forged waits kept open for `seconds`: their statuses, the longest as
    the client saw it and as the server reported it (X-Consistency-Waited-Ms)."""
    statuses: Counter[int] = Counter()
    longest = reported = 0.0
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=width)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(headers=headers, connector=connector,
                                     timeout=timeout) as session:
        deadline = time.perf_counter() + seconds

        async def waiter(n: int) -> None:
            nonlocal longest, reported
            forged = ConsistencyToken(AggregateType.WORKFLOW,
                                      uuid4() if n % 2 else workflow_ids[n % len(workflow_ids)],
                                      ConsistencyToken.MAX_VERSION).encode()
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.get(f"{base}{LIST}&after={forged}&wait_ms={WAIT_MS}") as r:
                    await r.read()
                    statuses[r.status] += 1
                elapsed = time.perf_counter() - started
                if r.status == 200:
                    longest = max(longest, elapsed)
                    reported = max(reported, int(r.headers["X-Consistency-Waited-Ms"]) / 1000)
                else:  # 429: again after its Retry-After, to keep `width` waits asked for
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))

        await asyncio.gather(*(waiter(n) for n in range(width)))
    return statuses, longest, reported


def unauthenticated_post(base: str, size: int) -> float:
    """Send a body of `size` bytes without credentials; seconds until the response
    starts (the server may answer, and close, before the body is all sent)."""
    host, port = base.removeprefix("http://").split(":")
    started = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /api/v1/commands/users HTTP/1.1\r\nHost: {host}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
                     .encode())
        chunk, sent = b"x" * 65536, 0
        sock.setblocking(False)
        while True:
            try:
                if sock.recv(1):
                    return time.perf_counter() - started
            except BlockingIOError:
                pass
            except OSError:
                return time.perf_counter() - started
            if sent < size:
                try:
                    sent += sock.send(chunk[: size - sent])
                except BlockingIOError:
                    time.sleep(0.001)
                except OSError:
                    return time.perf_counter() - started
            else:
                time.sleep(0.001)


def api_rss() -> int:
    return sum(p.memory_info().rss for p in psutil.process_iter()
               if "ringiflow" in " ".join(p.cmdline() or []) and "command-api" in p.cmdline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--flood", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    add_broker_flag(parser)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}; query API processes: 2; tenant B reads at "
          f"concurrency 4; {args.seconds:.0f} s x {args.rounds} rounds, medians")
    with embedded_stack(broker=args.broker) as settings:
        victim, _, _ = asyncio.run(seed(settings, 200))
        hostile, hostile_ids, _ = asyncio.run(seed(settings, 20))
        with app_process("query-api", settings, "RINGIFLOW_QUERY_API_PORT", 2) as base:
            asyncio.run(reads(base, victim, 2))  # warm
            alone, flooded, statuses, longest, reported = [], [], Counter[int](), [], []

            async def under_flood() -> list[float]:
                task = asyncio.create_task(
                    flood(base, hostile, hostile_ids, args.seconds, args.flood))
                await asyncio.sleep(1)  # the flood is open
                latencies = await reads(base, victim, args.seconds - 2)
                ended, worst, worst_reported = await task
                statuses.update(ended)
                longest.append(worst)
                reported.append(worst_reported)
                return latencies

            for _ in range(args.rounds):
                alone.append(asyncio.run(reads(base, victim, args.seconds - 2)))
                flooded.append(asyncio.run(under_flood()))
            p50 = median([percentile(x, 0.5) for x in alone]) * 1000
            p99 = median([percentile(x, 0.99) for x in alone]) * 1000
            f50 = median([percentile(x, 0.5) for x in flooded]) * 1000
            f99 = median([percentile(x, 0.99) for x in flooded]) * 1000
            print(f"{'tenant B list, alone':<44} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms")
            print(f"{'tenant B list, under the flood':<44} p50 {f50:7.1f} ms  p99 "
                  f"{f99:7.1f} ms  = {f50 / p50:.2f} x / {f99 / p99:.2f} x alone")
            print(f"{'flood reads ended':<44} " + ", ".join(
                f"{status}: {count}" for status, count in sorted(statuses.items())))
            print(f"{'longest forged wait (cap 10 s)':<44} {max(longest):.2f} s at the "
                  f"client, {max(reported):.2f} s by the server's count")
        with app_process("command-api", settings, "RINGIFLOW_COMMAND_API_PORT") as base:
            small = median([unauthenticated_post(base, 1024) for _ in range(5)])
            before = api_rss()
            big = unauthenticated_post(base, 200 * 1024 * 1024)
            grown = (api_rss() - before) / 2**20
            print(f"{'401 for a 1 KB body without a token':<44} {small * 1000:7.1f} ms")
            print(f"{'401 for a 200 MB body without a token':<44} {big * 1000:7.1f} ms "
                  f"= {big / small:.1f} x; API RSS {grown:+.0f} MB")


if __name__ == "__main__":
    main()
