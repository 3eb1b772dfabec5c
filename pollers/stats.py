"""What the loops of one process count, for its status lines and bench/:
polls and their start lag (``schedule.py``), publishes and the delivery lag
of each value they carried (``subscribe.py``), failures, readings."""
from __future__ import annotations

DELIVERY_CAP_MS = 600_000  # lags above 10 min are counted as 10 min


class Stats:
    """Counters since the last snapshot. ``lags`` are poll-start lags in
    seconds; ``delivery_ms`` counts subscribed values by their delivery lag
    in whole milliseconds (the value's timestamp to its arrival here), a
    histogram because there can be 50,000 of them a second."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.polls = 0
        self.missed = 0
        self.failed = 0
        self.readings = 0
        self.publishes = 0       # publish responses received (data or keep-alive)
        self.notifications = 0   # values those carried
        self.dropped = 0         # values received while the lease was not valid
        self.delivery_ms: dict[int, int] = {}

    def snapshot(self, reset: bool = True) -> dict:
        lags = sorted(self.lags)

        def q(p):
            return round(lags[min(len(lags) - 1, int(p * len(lags)))] * 1000, 2) if lags else None
        out = {"polls": self.polls, "missed": self.missed, "failed": self.failed,
               "readings": self.readings, "lag_ms_p50": q(0.5), "lag_ms_p99": q(0.99),
               "lag_ms_max": round(lags[-1] * 1000, 2) if lags else None}
        if self.publishes or self.notifications:
            out.update(publishes=self.publishes, notifications=self.notifications,
                       dropped=self.dropped, delivery_ms_p50=self._delivery(0.5),
                       delivery_ms_p99=self._delivery(0.99),
                       delivery_ms_max=max(self.delivery_ms) if self.delivery_ms else None)
        if reset:
            self.__init__()
        return out

    def _delivery(self, p: float) -> int | None:
        total = sum(self.delivery_ms.values())
        if not total:
            return None
        rank, seen = int(p * total), 0
        for ms in sorted(self.delivery_ms):
            seen += self.delivery_ms[ms]
            if seen > rank:
                return ms
        return max(self.delivery_ms)
