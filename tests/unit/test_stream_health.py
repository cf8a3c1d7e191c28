"""Stall detection and replay-aware side effects, without servers."""

from __future__ import annotations

import time

from projectors.derived import notification_records
from projectors.projection import Delivery
from streams.deadletters import Record
from streams.worker import Progress
from tests.scenarios import build_world


def records(topic: str, partition: int, offsets: range) -> list[Record]:
    return [Record(topic, partition, o, b"k", b"v", ()) for o in offsets]


def test_a_partition_with_lag_and_no_progress_is_flagged_as_stalled() -> None:
    progress = Progress("g", stall_after_s=0.05)
    progress.advanced(records("t", 0, range(10)))
    progress.advanced(records("t", 1, range(10)))
    assert progress.report({("t", 0): 10, ("t", 1): 25}) == []  # lag, but just moved
    time.sleep(0.1)
    stalled = progress.report({("t", 0): 10, ("t", 1): 25})
    assert len(stalled) == 1 and stalled[0].startswith("t[1] lag 15")  # t[0] is caught up


def test_progress_clears_the_stall() -> None:
    progress = Progress("g", stall_after_s=0.05)
    progress.advanced(records("t", 0, range(3)))
    time.sleep(0.1)
    assert progress.report({("t", 0): 9})
    progress.advanced(records("t", 0, range(3, 9)))
    assert progress.report({("t", 0): 9}) == []


def test_notifications_name_their_recipient_and_are_stable_across_redelivery() -> None:
    world = build_world(workflows=6)
    assigned = next(e for e in world.events if e.event_type == "WorkflowStepAssigned")
    first = notification_records(Delivery(assigned))
    again = notification_records(Delivery(assigned))
    assert first == again  # same id: consumers deduplicate redeliveries
    topic, key, _value, headers = first[0]
    assert topic == "ringiflow.notification.commands"
    assert key.decode() == assigned.payload["assignee_id"]
    assert ("ringiflow-replay", b"true") not in headers
    replayed = notification_records(Delivery(assigned, replay=True))
    assert ("ringiflow-replay", b"true") in replayed[0][3]
