"""Relay marks: when does a broker count as having lost what it acknowledged?"""

from __future__ import annotations

from uuid import uuid4

from relay.marks import Marks
from relay.publisher import Outcome, Row

TOPIC = "ringiflow.workflow.events"


def batch(first_id: int, offsets: list[tuple[int, int, int]]) -> tuple[list[Row], Outcome]:
    """Rows (lane, partition, offset) acknowledged in one relay batch."""
    rows, outcome = [], Outcome()
    for n, (lane, partition, offset) in enumerate(offsets):
        row = Row(first_id + n, str(uuid4()), str(uuid4()), lane, 1, TOPIC, b"", {}, 0.0)
        rows.append(row)
        outcome.acked_at[row.id] = 0.0
        outcome.offsets[row.id] = (partition, offset)
    return rows, outcome


def test_a_healthy_broker_reaches_every_mark_even_reporting_ends_like_tansu() -> None:
    marks = Marks()
    assert marks.advance(*batch(1, [(0, 5, 0), (1, 5, 1), (0, 5, 2)])) == []
    assert marks.advance(*batch(10, [(1, 5, 3), (0, 5, 4), (0, 5, 5), (1, 5, 6)])) == []
    # Tansu: one past the first offset of the newest produce request (here, 3).
    assert marks.lost({(TOPIC, 5): 4}, {0, 1}) == []
    assert marks.lost({(TOPIC, 5): 7}, {0, 1}) == []


def test_a_broker_that_came_back_empty_or_short_is_found_for_the_lanes_it_held() -> None:
    marks = Marks()
    marks.advance(*batch(1, [(0, 2, 40), (3, 2, 41), (0, 4, 7)]))
    assert marks.lost({}, {0, 3}) != []  # the topic is gone
    lost = marks.lost({(TOPIC, 2): 0, (TOPIC, 4): 8}, {0})
    assert lost == [f"{TOPIC}[2] ends at 0, 41 were acknowledged"]
    assert marks.lost({(TOPIC, 2): 0, (TOPIC, 4): 8}, {5}) == []  # not this relay's lanes


def test_acknowledgements_that_go_back_mean_the_log_started_over() -> None:
    marks = Marks()
    marks.advance(*batch(1, [(0, 1, 100), (0, 1, 101)]))
    assert marks.advance(*batch(5, [(0, 1, 102)])) == []
    assert marks.advance(*batch(9, [(0, 1, 0), (0, 1, 1)])) == [f"{TOPIC}[1]"]


def test_forgotten_and_dropped_lanes_no_longer_count() -> None:
    marks = Marks()
    marks.advance(*batch(1, [(0, 1, 9), (2, 1, 10)]))
    marks.drop({0})
    assert marks.lost({(TOPIC, 1): 0}, {0, 2}) == [f"{TOPIC}[1] ends at 0, 10 were acknowledged"]
