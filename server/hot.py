"""The two hot slots of ``reading_chunks`` (``reading_chunks_0`` and ``_1``):
writers fill the slot of the current arrival hour, compaction empties the
other one (``server/compact.py``). Both sides ask here which is which."""
from __future__ import annotations

import time


def hot_slot(now: float | None = None) -> int:
    """The reading_chunks slot writers fill now: the arrival hour modulo 2."""
    return int((time.time() if now is None else now) // 3600) % 2
