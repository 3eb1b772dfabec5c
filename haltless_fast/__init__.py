"""The native kernels, each bound to its compiled module when that imports,
else to its pure-Python twin (``<kernel>_py``: same signatures, same answers,
slower). ``HALTLESS_NO_EXTENSIONS=1`` forces the twins.

``_validate`` is the ingest hot path; ``_blocks`` (the block codec),
``_chunks`` (hot rows as COPY out), ``_aggregate`` (downsampling) and ``_iso``
(ISO 8601 text) are the codec; ``_opcua`` reads OPC-UA data change
notifications off the wire for the subscriber. ``COMPILED`` says the ingest
kernel is compiled, ``CODEC_COMPILED`` that all four codec kernels are,
``OPCUA_COMPILED`` the notification reader."""
import importlib
import os

# flag: {kernel: the names it hands on}; a flag is True when all its kernels are compiled.
_KERNELS = {
    "COMPILED": {
        "_validate": ("encode_batch", "encode_chunks", "MAX_ROW", "RECORD_SIZE", "timestamp_us",
                      "parse_timestamp", "SeriesIndex", "NOT_FINITE", "TOO_OLD", "TOO_NEW",
                      "RECHECK"),
    },
    "CODEC_COMPILED": {
        "_blocks": ("pack_ints", "unpack_ints", "pack_values", "unpack_values", "sort_by_time",
                    "summarize", "MAX_COUNT"),
        "_chunks": ("from_chunk", "group_chunks"),
        "_aggregate": ("aggregate",),
        "_iso": ("iso_timestamps", "iso_json"),
    },
    "OPCUA_COMPILED": {
        "_opcua": ("data_changes",),
    },
}


def _load(kernel: str):
    """The compiled module of ``kernel``, or its twin."""
    if not os.environ.get("HALTLESS_NO_EXTENSIONS"):
        try:
            return importlib.import_module(f"{__name__}.{kernel}")
        except ImportError:  # not built: the twin gives the same answers, slower
            pass
    return importlib.import_module(f"{__name__}.{kernel}_py")


__all__ = []
for _flag, _group in _KERNELS.items():
    _compiled = True
    for _kernel, _names in _group.items():
        _module = _load(_kernel)
        _compiled = _compiled and _module.__name__ == f"{__name__}.{_kernel}"
        globals().update({name: getattr(_module, name) for name in _names})
        __all__ += _names
    globals()[_flag] = _compiled
    __all__.append(_flag)
del _flag, _group, _compiled, _kernel, _names, _module
