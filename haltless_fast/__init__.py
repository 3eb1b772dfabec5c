"""The ingest kernel: the compiled ``_validate`` when it imports, else its
pure-Python twin. ``HALTLESS_NO_EXTENSIONS=1`` forces the twin."""
import os

from . import _validate_py

if os.environ.get("HALTLESS_NO_EXTENSIONS"):
    _impl = _validate_py
else:
    try:
        from . import _validate as _impl  # type: ignore[no-redef]
    except ImportError:  # not built: the twin gives the same answers, slower
        _impl = _validate_py

encode_batch = _impl.encode_batch
timestamp_us = _impl.timestamp_us
ERR_NOT_FINITE = _impl.ERR_NOT_FINITE
ERR_TOO_OLD = _impl.ERR_TOO_OLD
ERR_TOO_NEW = _impl.ERR_TOO_NEW
COMPILED = _impl is not _validate_py

__all__ = ["encode_batch", "timestamp_us", "ERR_NOT_FINITE", "ERR_TOO_OLD", "ERR_TOO_NEW", "COMPILED"]
