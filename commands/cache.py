"""Recently written aggregates, kept in the command API process (ADR 0013).

A command on a cached aggregate decides on the cached state and appends with
`store.append_at`, which writes only if the stream is still at that version: one
round trip instead of load + append. A copy gone stale (another process, the
saga, a concurrent request moved the stream on) costs one more round trip and
nothing else: the append returns the missed events, they are folded on, and the
command is decided again. The cache therefore never decides what is written,
only how many round trips it takes.

A second one, of the same size, keeps the snapshots of other aggregates that
commands read (`commands.reads`, ADR 0016), checked at the append in the same way.

Keys carry the tenant: a tenant never meets another tenant's state through it."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar
from uuid import UUID

Key = tuple[UUID, str, UUID]  # tenant, aggregate type, aggregate id
V = TypeVar("V")


class StateCache(Generic[V]):
    """A bounded LRU of aggregate states (or snapshots); `capacity` 0 keeps nothing."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._states: OrderedDict[Key, V] = OrderedDict()

    def get(self, key: Key) -> V | None:
        state = self._states.get(key)
        if state is not None:
            self._states.move_to_end(key)
        return state

    def put(self, key: Key, state: V) -> None:
        if self.capacity <= 0:
            return
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)

    def drop(self, key: Key) -> None:
        self._states.pop(key, None)

    def __len__(self) -> int:
        return len(self._states)
