"""How long a source waits before it tries its device again
(pollers/backoff.py), on a clock the test moves: no waiting."""
from __future__ import annotations

import pytest

from haltless.pollers import backoff
from haltless.pollers.backoff import Backoff


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def attempts_in(seconds: float, jitter: float, unreachable: bool = False) -> int:
    """Attempts a device that refuses every one of them sees in ``seconds``,
    with every delay drawn at ``jitter`` (0.5: as short as the jitter allows)."""
    clock = Clock()
    b = Backoff(clock, lambda lo, hi: jitter)
    n = 0
    while clock.now < seconds:
        n += 1
        clock.now += b.failed(unreachable)
    return n


def test_a_device_refusing_every_session_sees_a_handful_of_attempts_a_minute():
    # 1, 2, 4, 8, 16, 32 s (each at least halved by the jitter), then 60
    assert attempts_in(60, jitter=0.5) == 7
    assert attempts_in(60, jitter=1.0) == 6
    # after the first minutes: one or two a minute, never more
    assert attempts_in(600, jitter=0.5) - attempts_in(300, jitter=0.5) <= 10


def test_delays_double_from_one_second_to_sixty_within_the_jitter():
    clock = Clock()
    low, high = Backoff(clock, lambda lo, hi: lo), Backoff(clock, lambda lo, hi: hi)
    assert [low.failed() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert [high.failed() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_a_device_nobody_answers_for_is_tried_every_ten_seconds_at_most():
    clock = Clock()
    b = Backoff(clock, lambda lo, hi: hi)
    assert [b.failed(unreachable=True) for _ in range(7)] == [1, 2, 4, 8, 10, 10, 10]
    # once it answers and refuses, the session delays go on doubling
    assert b.failed() == 60


def test_the_count_resets_only_after_a_connection_stayed_up_for_the_healthy_period():
    clock = Clock()
    b = Backoff(clock, lambda lo, hi: hi)
    assert [b.failed() for _ in range(3)] == [1, 2, 4]
    # a session accepted and dropped at once does not reset the count ...
    b.connected()
    clock.now += 5
    assert b.failed() == 8
    # ... one that lived the healthy period does
    b.connected()
    clock.now += backoff.HEALTHY_AFTER
    assert b.failed() == 1
    assert b.failed() == 2


@pytest.mark.parametrize("failures", [100, 10_000])
def test_a_long_outage_keeps_the_cap_without_overflowing(failures):
    b = Backoff(Clock(), lambda lo, hi: hi)
    for _ in range(failures):
        delay = b.failed()
    assert delay == backoff.CAP
