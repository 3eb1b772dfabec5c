import datetime
from typing import Any, Final

MAX_ROW: Final[int]  # readings per reading_chunks row at most
RECORD_SIZE: Final[int]  # bytes of one packed record (int32 series, int64 µs, float64)
NOT_FINITE: Final[int]  # the refusal codes in encode_batch's errors
TOO_OLD: Final[int]
TOO_NEW: Final[int]
RECHECK: Final[int]  # a FastReading the kernel cannot vouch for: decode the body strictly

def timestamp_us(dt: datetime.datetime) -> int: ...
def parse_timestamp(text: str) -> int | None: ...  # RFC 3339 text the kernel takes -> Unix µs

class SeriesIndex:
    # (machine_identifier, metric_name, unit or "", raw_tag or "") -> series id
    def add(
        self, machine_identifier: str, metric_name: str, unit: str | None, raw_tag: str | None,
        series_id: int,
    ) -> None: ...
    def get(
        self, machine_identifier: str, metric_name: str, unit: str | None, raw_tag: str | None
    ) -> int | None: ...
    def forget(
        self, machine_identifier: str, metric_name: str, unit: str | None, raw_tag: str | None
    ) -> None: ...  # get misses the key again (a series' attributes changed)
    def clear(self) -> None: ...
    def __len__(self) -> int: ...  # keys that map to a series

# -> (records, accepted, errors as (index, code), missing)
def encode_batch(
    readings: list[Any | None],  # msgspec.Raw (a reading's JSON text), core.wire Reading or
                                 # FastReading, or None to skip
    index: SeriesIndex,
    now_us: int,
    oldest_us: int | None = None,
) -> tuple[bytes | None, int, list[tuple[int, int]], list[int]]: ...
def encode_chunks(records: bytes | bytearray | memoryview) -> bytes: ...
