import datetime
from typing import Any

ERR_NOT_FINITE: str
ERR_TOO_OLD: str
ERR_TOO_NEW: str

def timestamp_us(dt: datetime.datetime) -> int: ...
def encode_batch(
    readings: list[Any | None],
    series: dict[tuple[str, str, str, str], int],
    now_us: int,
) -> tuple[bytes | None, int, list[tuple[int, str]], list[int]]: ...
