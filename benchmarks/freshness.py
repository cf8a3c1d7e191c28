"""Command -> visible, as a client sees it (issue 14).

    python -m benchmarks.freshness [--broker apache|tansu] [--rates 50,500] [--seconds 4]

On one embedded stack the whole system runs as `ringiflow up` runs it (command API,
relay, the five projector workers, the query API). Workflows are created at a fixed
rate (open loop: each command is sent at its own time, whatever the others do) by
users of several tenants; each command's consistency token is then sent at once to
the query API's list (PostgreSQL), detail (Redis) and search (OpenSearch) with
`X-Consistency-Token` and `wait_ms=10000`. Printed per read model: the time from the
command's response until the answer says `X-Consistency: reached`, p50/p99; then the
per-hop breakdown read off the processes' /metrics histograms over the same run;
next to the floor measured in the same run: a raw produce -> consume round trip on
the same broker (the relay's producer settings, an aiokafka consumer with the
workers' fetch wait, one record at a time, at the same rate).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import aiohttp

from benchmarks import cpu
from benchmarks.common import BENCH_SECRET, add_broker_flag, app_env, embedded_stack, percentile
from infra.auth import mint_token
from infra.kafka import admin_client, record_consumer
from infra.kafka import producer as kafka_producer
from infra.servers import free_port
from infra.settings import Settings
from projectors.catalogue import CATALOGUE
from streams.consumer import fetch_max_wait_ms

COMMANDS = "/api/v1/commands"
QUERIES = "/api/v1/queries"
WAIT_MS = 10_000
TENANTS, USERS = 4, 8  # 32 users: the per-user and per-tenant wait caps are not the limit
READ_MODELS = ("list (PostgreSQL)", "detail (Redis)", "search (OpenSearch)")

# The per-hop histograms (label, metric, label filter), in the order an event crosses them.
HOPS = (
    ("commit -> relay ack", "ringiflow_relay_commit_to_ack_seconds", {}),
    *((f"relay send -> consumed: {g}", "ringiflow_consume_delay_seconds", {"group": g})
      for g in CATALOGUE),
    *((f"consumed -> applied: {g}", "ringiflow_apply_delay_seconds", {"group": g})
      for g in CATALOGUE),
    *((f"event age at apply: {g}", "ringiflow_event_age_at_apply_seconds", {"group": g})
      for g in CATALOGUE),
    ("bulk done -> searchable (refresh): search-indexer",
     "ringiflow_search_refresh_delay_seconds", {}),
    *((f"query token wait: {model}", "ringiflow_consistency_wait_seconds",
       {"read_model": model, "outcome": "reached"})
      for model in ("workflow_list", "workflow_detail", "search")),
)


@contextmanager
def system(settings: Settings) -> Iterator[dict[str, str]]:
    """command-api, relay, workers and query-api, as `up` runs them."""
    ports = {name: free_port() for name in ("command-api", "relay", "workers", "query-api")}
    env = app_env(settings, **{f"RINGIFLOW_{name.replace('-', '_').upper()}_PORT": str(port)
                               for name, port in ports.items()})
    if settings.worker_fetch_max_wait_ms is not None:
        env["RINGIFLOW_WORKER_FETCH_MAX_WAIT_MS"] = str(settings.worker_fetch_max_wait_ms)
    env["RINGIFLOW_SEARCH_REFRESH_INTERVAL_MS"] = str(settings.search_refresh_interval_ms)
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    with ExitStack() as stack:
        for name in ports:
            process = subprocess.Popen([sys.executable, "-m", "ringiflow", "run", name],
                                       env=env)
            stack.callback(process.wait, 15)
            stack.callback(process.terminate)
        deadline = time.monotonic() + 120
        for name, url in urls.items():
            path = "/readyz" if name == "workers" else "/healthz"
            while True:
                try:
                    with urllib.request.urlopen(url + path, timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} not ready at {url}{path}") from None
                    time.sleep(0.2)
        yield urls


class Client:
    """Users of several tenants, each with a definition to create workflows from."""

    def __init__(self, session: aiohttp.ClientSession, urls: dict[str, str]) -> None:
        self.session, self.urls = session, urls
        self.users: list[tuple[str, str]] = []  # (bearer token, definition id)

    async def post(self, token: str, path: str, body: dict) -> dict:
        async with self.session.post(self.urls["command-api"] + COMMANDS + path, json=body,
                                     headers={"Authorization": f"Bearer {token}"}) as r:
            answer = await r.json()
            if r.status >= 300:
                raise RuntimeError(f"POST {path}: {r.status} {answer}")
            return answer

    async def enrol(self) -> None:
        for _ in range(TENANTS):
            tenant = uuid.uuid4()
            for _ in range(USERS):
                user = uuid.uuid4()
                token = mint_token(BENCH_SECRET, tenant_id=tenant, user_id=user,
                                   name="bench", roles=["admin"])
                await self.post(token, "/users", {"user_id": str(user),
                                                  "display_name": "Bench User",
                                                  "email": f"{user.hex[:12]}@example.jp"})
                definition = await self.post(token, "/definitions", {
                    "name": "備品購入", "steps": [{"name": "課長承認", "assignee_id": str(user)}]})
                self.users.append((token, definition["aggregate_id"]))

    async def read(self, token: str, path: str, consistency: str) -> bool:
        headers = {"Authorization": f"Bearer {token}", "X-Consistency-Token": consistency}
        async with self.session.get(self.urls["query-api"] + QUERIES + path,
                                    headers=headers) as r:
            await r.read()
            return r.status == 200 and r.headers.get("X-Consistency") == "reached"

    async def one(self, n: int, results: dict[str, list[float]], failures: Counter[str]) -> None:
        token, definition = self.users[n % len(self.users)]
        started = time.perf_counter()
        try:
            accepted = await self.post(token, "/workflows", {
                "definition_id": definition, "title": f"ノートPC購入 freshness {n}"})
        except Exception as exc:
            failures[f"command: {str(exc)[:80]}"] += 1
            return
        answered = time.perf_counter()
        results["the command itself"].append(answered - started)
        consistency, wf = accepted["consistency_token"], accepted["aggregate_id"]
        paths = (f"/workflows?limit=20&wait_ms={WAIT_MS}", f"/workflows/{wf}?wait_ms={WAIT_MS}",
                 f"/search?q=freshness&limit=1&wait_ms={WAIT_MS}")

        async def visible(model: str, path: str) -> None:
            try:
                if await self.read(token, path, consistency):
                    results[model].append(time.perf_counter() - answered)
                else:
                    failures[f"{model}: not reached"] += 1
            except Exception as exc:
                failures[f"{model}: {type(exc).__name__}"] += 1

        await asyncio.gather(*(visible(m, p) for m, p in zip(READ_MODELS, paths, strict=True)))

    async def run(self, rate: float, seconds: float) -> tuple[dict[str, list[float]],
                                                              Counter[str]]:
        results: dict[str, list[float]] = defaultdict(list)
        failures: Counter[str] = Counter()
        start = time.perf_counter() + 0.1
        tasks = []
        for n in range(int(rate * seconds)):  # open loop: command n is due at start + n / rate
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.one(n, results, failures)))
        await asyncio.gather(*tasks)
        return results, failures


def scrape(urls: dict[str, str]) -> str:
    text = []
    for name in ("relay", "workers", "query-api"):
        with urllib.request.urlopen(urls[name] + "/metrics", timeout=10) as r:
            text.append(r.read().decode())
    return "\n".join(text)


BUCKET = re.compile(r'^(\w+)_bucket\{(.*)\} ([0-9.e+-]+)$')


def buckets(text: str, metric: str, where: dict[str, str]) -> dict[float, float]:
    """Cumulative counts per upper bound, summed over every series that matches."""
    found: dict[float, float] = defaultdict(float)
    for line in text.splitlines():
        m = BUCKET.match(line)
        if not m or m.group(1) != metric:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if any(labels.get(k) != v for k, v in where.items()):
            continue
        le = labels["le"]
        found[float("inf") if le == "+Inf" else float(le)] += float(m.group(3))
    return found


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The q-quantile of what was observed between two scrapes, interpolated in its bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, previous_bound, previous_count = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return previous_bound
            share = (rank - previous_count) / max(count - previous_count, 1e-9)
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, count
    return None


async def floor(bootstrap: str, rate: float, seconds: float,
                fetch_wait_ms: int) -> list[float]:
    """A raw produce -> consume round trip on the same broker, at the same rate."""
    from confluent_kafka.admin import NewTopic

    topic = f"bench.floor.{uuid.uuid4().hex[:8]}"
    admin = admin_client(bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    producer = kafka_producer(bootstrap)  # the relay's settings
    consumer = record_consumer(bootstrap, topic, fetch_max_wait_ms=fetch_wait_ms)
    await consumer.start()
    try:
        await consumer.seek_to_end()
        await asyncio.sleep(1)
        sent: dict[bytes, float] = {}
        latencies: list[float] = []
        count = int(rate * seconds)

        async def receive() -> None:
            while len(latencies) < count:
                batch = await consumer.getmany(timeout_ms=200)
                now = time.perf_counter()
                for records in batch.values():
                    latencies.extend(now - sent[r.key] for r in records if r.key in sent)

        receiver = asyncio.create_task(receive())
        start = time.perf_counter()
        for n in range(count):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            key = str(n).encode()
            sent[key] = time.perf_counter()
            producer.produce(topic, b"x" * 600, key=key)
            producer.poll(0)
        producer.flush(10)
        await asyncio.wait_for(receiver, 30)
        return latencies
    finally:
        await consumer.stop()


def ms(value: float | None) -> str:
    return "      -" if value is None else f"{value * 1000:7.1f}"


async def measure(urls: dict[str, str], settings: Settings, rates: list[float],
                  seconds: float, warm_s: float) -> None:
    bootstrap = settings.kafka_bootstrap or ""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = Client(session, urls)
        await client.enrol()
        await client.run(20, 2)  # warm: connections, caches, the first fetches
        for rate in rates:
            base = await floor(bootstrap, rate, seconds,
                               fetch_max_wait_ms(bootstrap, settings.worker_fetch_max_wait_ms))
            # Warm at this rate: pools grown, caches full, and the JVMs' compilers
            # settled on this load (ADR 0006: OpenSearch's full JIT still compiled a
            # minute into a run; Kafka keeps its full JIT).
            await client.run(rate, warm_s)
            before = scrape(urls)
            with cpu.measuring() as usage:
                results, failures = await client.run(rate, seconds)
            used = usage.used
            after = scrape(urls)
            b50, b99 = percentile(base, .5), percentile(base, .99)
            print(f"\n{rate:.0f} commands/s for {seconds:.0f} s "
                  f"({int(rate * seconds)} workflows, {len(client.users)} users of "
                  f"{TENANTS} tenants)")
            print(f"  {'':<44} {'p50 ms':>7} {'p99 ms':>7}   p50 / floor")
            print(f"  {'floor: raw produce -> consume':<44} {ms(b50)} {ms(b99)}")
            for model in ("the command itself", *READ_MODELS):
                values = results.get(model, [])
                if not values:
                    print(f"  {model:<44}   (none reached)")
                    continue
                p50, p99 = percentile(values, .5), percentile(values, .99)
                ratio = f"   {p50 / b50:5.1f} x" if model in READ_MODELS else ""
                print(f"  {model:<44} {ms(p50)} {ms(p99)}{ratio}")
            print("  per hop (from the processes' /metrics over this run):")
            for label, metric, where in HOPS:
                b, a = buckets(before, metric, where), buckets(after, metric, where)
                print(f"    {label:<42} {ms(quantile(b, a, .5))} {ms(quantile(b, a, .99))}")
            for failure, count in sorted(failures.items()):
                print(f"  ! {failure}: {count}")
            if used:
                print(f"  {cpu.report(used)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="50,500",
                        help="commands per second, comma-separated (default 50,500)")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="how long each rate is measured, after --warm-seconds (default 6)")
    parser.add_argument("--warm-seconds", type=float, default=2.0,
                        help="load at each rate before it is measured (default 2)")
    parser.add_argument("--fetch-wait-ms", type=int, default=None,
                        help="the workers' fetch wait (default: the workers' own default)")
    parser.add_argument("--search-refresh-ms", type=int,
                        default=Settings.model_fields["search_refresh_interval_ms"].default,
                        help="the search indexer's least time between refreshes (default: "
                             "the indexer's own)")
    add_broker_flag(parser)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    print(f"cores: {os.cpu_count()}; broker: {args.broker}; reads wait_ms={WAIT_MS}; "
          "client: one asyncio process (aiohttp)")
    with embedded_stack(broker=args.broker) as stack:
        settings = stack.model_copy(update={"worker_fetch_max_wait_ms": args.fetch_wait_ms,
                                            "search_refresh_interval_ms": args.search_refresh_ms})
        with system(settings) as urls:
            asyncio.run(measure(urls, settings, rates, args.seconds, args.warm_seconds))


if __name__ == "__main__":
    main()
