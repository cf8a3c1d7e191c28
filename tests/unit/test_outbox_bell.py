"""The bell's timing (ADR 0014), with its NOTIFY recorded instead of sent: the
first commit after a quiet spell is announced at once, a burst shares one more."""

from __future__ import annotations

import asyncio
import time

from commands.bell import MIN_GAP_S, OutboxBell


class RecordingBell(OutboxBell):
    def __init__(self) -> None:
        super().__init__("postgresql://unused")
        self.at: list[float] = []

    async def _notify(self) -> None:
        self.at.append(time.monotonic())
        self._sent_at = self.at[-1]
        self.sent += 1


async def settle(bell: RecordingBell) -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_ring_after_a_quiet_spell_is_sent_at_once() -> None:
    bell = RecordingBell()
    bell.ring()
    await settle(bell)  # no timer involved: a few turns of the loop
    assert bell.sent == 1
    await bell.close()


async def test_a_burst_within_the_gap_shares_one_notify_sent_after_the_last_ring() -> None:
    bell = RecordingBell()
    bell.ring()
    await settle(bell)
    rung_at = []
    for _ in range(10):
        rung_at.append(time.monotonic())
        bell.ring()
        await asyncio.sleep(0)
    await asyncio.sleep(MIN_GAP_S * 10)
    assert bell.sent == 2
    assert bell.at[1] >= rung_at[-1]  # every commit is followed by a NOTIFY after it
    assert bell.at[1] - bell.at[0] >= MIN_GAP_S * 0.9
    await bell.close()


async def test_closing_mid_gap_sends_what_is_owed() -> None:
    bell = RecordingBell()
    bell.ring()
    await settle(bell)
    bell.ring()  # waits out the gap
    await asyncio.sleep(0)
    await bell.close()
    assert bell.sent == 2
