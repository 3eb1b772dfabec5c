from array import array

def aggregate(
    ts: array, vals: array, interval_us: int
) -> tuple[array, array, array, array, array, array, array]: ...  # starts, count, sum, min, max, first, last
