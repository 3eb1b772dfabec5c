MAX_US: int  # 9999-12-31T23:59:59.999999Z: later timestamps are clamped to it

def data_changes(body: bytes, start: int, end: int) -> list[tuple[int, float | None, int, int | None, int]] | None: ...  # (client_handle, value, status, timestamp_us, variant_type) per item; None: decode it with asyncua
