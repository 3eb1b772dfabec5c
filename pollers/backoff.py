"""How long one source waits before it tries its device again: the delay
that the poll loop (``schedule.py``) and the subscription loop
(``subscribe.py``) share, so that every source of either kind backs off
the same way.

Exponential with jitter, per source: 1 s, doubling to 60 s, each delay
drawn from its upper half (0.5x-1x) so that sources that failed together
do not come back together. A device that refuses every session so sees at
most 7 attempts in its first minute and 1-2 a minute after that (the
reconnect storms of telegraf #18787: 6,410 CreateSession requests in two
minutes). Two exceptions:

* a device that nothing answers for at all (connection refused, no route:
  ``DeviceUnreachable``) costs nothing to knock on, so its delay stops
  doubling at 10 s: data flows again within ~10 s of it coming back;
* the count of failures is reset only once a connection has stayed up for
  ``HEALTHY_AFTER`` seconds, not at its first success: a device that
  accepts a session and drops it at once keeps backing off instead of
  being reconnected every second.
"""
from __future__ import annotations

import random
import time
from typing import Callable

BASE = 1.0               # first delay, seconds
CAP = 60.0               # the delay stops doubling here ...
UNREACHABLE_CAP = 10.0   # ... or here, while nothing answers at the address
HEALTHY_AFTER = 60.0     # a connection up this long resets the count


class Backoff:
    """The reconnect delays of one source."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 jitter: Callable[[float, float], float] = random.uniform) -> None:
        self.clock = clock
        self.jitter = jitter
        self.failures = 0
        self.up_since: float | None = None  # when the current connection was made

    def connected(self) -> None:
        """A connection (a session, a subscription) was made."""
        self.up_since = self.clock()

    def failed(self, unreachable: bool = False) -> float:
        """A connect failed or a connection broke: seconds to wait before the next attempt."""
        if self.up_since is not None and self.clock() - self.up_since >= HEALTHY_AFTER:
            self.failures = 0
        self.up_since = None
        self.failures += 1
        cap = UNREACHABLE_CAP if unreachable else CAP
        return min(cap, BASE * 2 ** min(self.failures - 1, 16)) * self.jitter(0.5, 1.0)
