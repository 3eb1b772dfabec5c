import datetime
from typing import Any, Final

MAX_ROW: Final[int]  # readings per reading_chunks row at most
RECORD_SIZE: Final[int]  # bytes of one packed record (int32 series, int64 µs, float64)
NOT_FINITE: Final[int]  # the refusal codes in encode_batch's errors
TOO_OLD: Final[int]
TOO_NEW: Final[int]

def timestamp_us(dt: datetime.datetime) -> int: ...

# -> (records, accepted, errors as (index, code), missing)
def encode_batch(
    readings: list[Any | None],  # haltless.core.wire.Reading, or None to skip
    series: dict[tuple[str, str, str, str], int],
    now_us: int,
    oldest_us: int | None = None,
) -> tuple[bytes | None, int, list[tuple[int, int]], list[int]]: ...
def encode_chunks(records: bytes | bytearray | memoryview) -> bytes: ...
