from array import array
from collections.abc import Iterable
from typing import Final

MAX_COUNT: Final[int]

def pack_ints(values: array | Iterable[int]) -> bytes: ...
def unpack_ints(data: bytes | bytearray | memoryview) -> array: ...  # array('q')
def pack_values(values: array | Iterable[float]) -> bytes: ...
def unpack_values(data: bytes | bytearray | memoryview) -> array: ...  # array('d')
def sort_by_time(ts: array, vals: array) -> None: ...  # array('q'), array('d'), in place
def summarize(ts: array, vals: array, interval_us: int = 60_000_000) -> tuple[int, array, array, array]: ...  # (d, starts 'q', count 'q', fields 'q' or 'd')
