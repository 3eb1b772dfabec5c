from array import array

def iso_timestamps(ts: array) -> list[str]: ...  # Unix µs -> '2026-11-28T00:45:59.000213Z'
def iso_json(ts: array) -> bytes: ...  # the JSON array of iso_timestamps(ts)
