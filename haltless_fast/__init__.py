"""The native kernels: the compiled ``_validate`` (ingest) and ``_codec``
(compacted blocks) when they import, else their pure-Python twins.
``HALTLESS_NO_EXTENSIONS=1`` forces the twins."""
import os

from . import _codec_py, _validate_py

if os.environ.get("HALTLESS_NO_EXTENSIONS"):
    _impl, _codec = _validate_py, _codec_py
else:
    try:
        from . import _validate as _impl  # type: ignore[no-redef]
    except ImportError:  # not built: the twin gives the same answers, slower
        _impl = _validate_py
    try:
        from . import _codec  # type: ignore[no-redef]
    except ImportError:
        _codec = _codec_py

encode_batch = _impl.encode_batch
encode_chunks = _impl.encode_chunks
RECORD_SIZE = _impl.RECORD_SIZE
timestamp_us = _impl.timestamp_us
NOT_FINITE = _impl.NOT_FINITE
TOO_OLD = _impl.TOO_OLD
TOO_NEW = _impl.TOO_NEW
COMPILED = _impl is not _validate_py

pack_ints = _codec.pack_ints
unpack_ints = _codec.unpack_ints
pack_values = _codec.pack_values
unpack_values = _codec.unpack_values
from_chunk = _codec.from_chunk
sort_by_time = _codec.sort_by_time
group_chunks = _codec.group_chunks
aggregate = _codec.aggregate
iso_timestamps = _codec.iso_timestamps
iso_json = _codec.iso_json
CODEC_COMPILED = _codec is not _codec_py

__all__ = ["encode_batch", "encode_chunks", "RECORD_SIZE", "group_chunks", "timestamp_us", "NOT_FINITE", "TOO_OLD", "TOO_NEW", "COMPILED",
           "pack_ints", "unpack_ints", "pack_values", "unpack_values", "from_chunk",
           "sort_by_time", "aggregate", "iso_timestamps", "iso_json", "CODEC_COMPILED"]
