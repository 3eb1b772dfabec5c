from array import array
from collections.abc import Iterable
from typing import Final

MAX_COUNT: Final[int]

def pack_ints(values: array | Iterable[int]) -> bytes: ...
def unpack_ints(data: bytes | bytearray | memoryview) -> array: ...  # array('q')
def pack_values(values: array | Iterable[float]) -> bytes: ...
def unpack_values(data: bytes | bytearray | memoryview) -> array: ...  # array('d')
def from_chunk(
    ts_bin: bytes | bytearray | memoryview, vals_bin: bytes | bytearray | memoryview
) -> tuple[array, array]: ...  # (array('q') of Unix µs, array('d'))
def sort_by_time(ts: array, vals: array) -> None: ...
def aggregate(
    ts: array, vals: array, interval_us: int
) -> tuple[array, array, array, array, array, array, array]: ...  # starts, count, sum, min, max, first, last
def iso_timestamps(ts: array) -> list[str]: ...  # Unix µs -> '2026-11-28T00:45:59.000213Z'
def iso_json(ts: array) -> bytes: ...  # the JSON array of iso_timestamps(ts)
