from array import array

def from_chunk(
    ts_bin: bytes | bytearray | memoryview, vals_bin: bytes | bytearray | memoryview
) -> tuple[array, array]: ...  # (array('q') of Unix µs, array('d'))
def group_chunks(
    data: bytes | bytearray | memoryview,
) -> list[tuple[int, int, array, array]]: ...  # (series_id, bucket in Unix µs, ts, vals)
