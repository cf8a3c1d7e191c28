"""Where the machine's CPU went during a measurement: each process this benchmark
started (and their children), named by what it is, from /proc.

A latency figure on a 2-core machine says little without it: the same run measured
list p50 18 ms once and 130 ms another time, with the stack using 188 % of 200 %
(issue 14). Printed next to the figures, the shares show whether the machine was
saturated and by whom."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

PROC = Path("/proc")
# What a process is, from its command line: the first of these found in it.
KINDS = (("opensearch", "OpenSearch"), ("osmem", "osmem"), ("kafka.Kafka", "Apache Kafka"),
         ("tansu", "Tansu"), ("redis-server", "Redis"), ("postgres", "PostgreSQL"),
         ("mailcatcher", "mail catcher"))


@dataclass(frozen=True)
class Process:
    parent: int
    cpu_s: float  # user + system since it started
    command: str


def processes() -> dict[int, Process]:
    """Every process on the machine; {} where there is no /proc."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    found: dict[int, Process] = {}
    if not PROC.is_dir():
        return found
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # the name may hold spaces
        found[int(entry.name)] = Process(int(fields[1]), (int(fields[11]) + int(fields[12])) / tick,
                                         command)
    return found


def kind(pid: int, table: dict[int, Process], root: int) -> str | None:
    """The name a process is counted under, or None when `root` did not start it.
    A RingiFlow component is named by its role; a server by what it runs; anything
    else by the nearest named ancestor (a PostgreSQL backend, OpenSearch's JVM under
    its launcher script)."""
    chain = []
    while pid in table and pid != root:
        chain.append(pid)
        pid = table[pid].parent
    if pid != root:
        return None
    for member in chain:  # nearest first
        words = table[member].command.split()
        for verb in ("run", "projector"):
            if "ringiflow" in words and verb in words[:-1]:
                return words[words.index(verb) + 1]
        for needle, name in KINDS:
            if needle in table[member].command:
                return name
    return "other"


def shares(before: dict[int, Process], after: dict[int, Process], seconds: float,
           root: int | None = None) -> list[tuple[str, float]]:
    """Each kind's CPU between two `processes()` as a share of one core, busiest
    first; the root itself (the benchmark's client) as "this benchmark"."""
    root = os.getpid() if root is None else root
    used: dict[str, float] = {}
    for pid, now in after.items():
        name = "this benchmark" if pid == root else kind(pid, after, root)
        if name is None:
            continue
        then = before.get(pid)
        spent = now.cpu_s - (then.cpu_s if then and then.command == now.command else 0.0)
        used[name] = used.get(name, 0.0) + spent / seconds
    return sorted(used.items(), key=lambda item: -item[1])


def report(used: list[tuple[str, float]], cores: int | None = None) -> str:
    """One line: the total against the machine's cores, then each kind over 1 %."""
    cores = cores or os.cpu_count() or 1
    total = sum(share for _, share in used)
    parts = [f"{name} {share * 100:.0f}" for name, share in used if share >= 0.01]
    return (f"CPU over this run: {total * 100:.0f} % of {cores * 100} % "
            f"(% of one core: {', '.join(parts)})")


@dataclass
class Usage:
    """The CPU shares over a `measuring` block, filled in when it ends."""

    used: list[tuple[str, float]] = field(default_factory=list)


@contextmanager
def measuring(ended_as: str = "ended children") -> Iterator[Usage]:
    """The CPU shares over the block, sync or async. A child that ran and was waited
    for inside it (a client such as wrk) is gone from /proc by the end: it counts as
    `ended_as`, from the kernel's account of waited-for children."""
    before, children = processes(), resource.getrusage(resource.RUSAGE_CHILDREN)
    started, usage = time.monotonic(), Usage()
    yield usage
    seconds = time.monotonic() - started
    used = shares(before, processes(), seconds)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    ended = (after.ru_utime - children.ru_utime + after.ru_stime - children.ru_stime) / seconds
    if ended >= 0.005:
        used = sorted([*used, (ended_as, ended)], key=lambda item: -item[1])
    usage.used = used


def during(work: Callable[[], T],
           ended_as: str = "ended children") -> tuple[T, list[tuple[str, float]]]:
    """`work()` and the CPU shares over it (see `measuring`)."""
    with measuring(ended_as) as usage:
        result = work()
    return result, usage.used
