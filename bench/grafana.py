"""Grafana's PostgreSQL macros and variables, expanded as Grafana 11 expands
them, so that the README's dashboard queries can be run (by the tests and
``bench/sql.py``) exactly as Grafana sends them.

Read from Grafana's source (pkg/tsdb/grafana-postgresql-datasource/macros.go):
the frontend first replaces variables (``$machine``, ``${machine}``,
``$__interval``, ``$__interval_ms``); the backend then replaces each
``$__name(args)``: ``$__timeFilter(col)`` -> ``col BETWEEN 'FROM' AND 'TO'``
and ``$__timeFrom()``/``$__timeTo()`` -> ``'FROM'``/``'TO'`` with the range in
UTC as RFC 3339 with nanoseconds (trailing zeros dropped, as Go's
RFC3339Nano does); ``$__timeGroup(col, '5m')`` ->
``floor(extract(epoch from col)/300)*300`` and ``$__timeGroupAlias`` the
same ``AS "time"``; ``$__time(col)`` -> ``col AS "time"``.
"""
from __future__ import annotations

import datetime as dt
import re

_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^)]*)\)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def rfc3339nano(t: dt.datetime) -> str:
    """Go's time.RFC3339Nano of ``t`` in UTC: no fraction when it is zero,
    else the fraction without trailing zeros."""
    t = t.astimezone(dt.UTC)
    frac = f"{t.microsecond:06d}000".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def seconds(interval: str) -> float:
    """Grafana's interval text ('1m', '30s', '500ms') in seconds."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w)", interval.strip().strip("'"))
    if m is None:
        raise ValueError(f"not a Grafana interval: {interval!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _go_float(x: float) -> str:
    """What Go's %v prints for a float64 of whole or fractional seconds."""
    return str(int(x)) if x == int(x) else repr(x)


def expand(sql: str, frm: dt.datetime, to: dt.datetime, variables: dict[str, str] | None = None,
           interval: str = "1m") -> str:
    """``sql`` as Grafana sends it for the range [frm, to], with ``variables``
    (name -> value) and ``$__interval`` = ``interval``."""
    values = {"__interval": interval, "__interval_ms": _go_float(seconds(interval) * 1000),
              **(variables or {})}
    for name in sorted(values, key=len, reverse=True):  # $machine before $mach
        sql = sql.replace("${" + name + "}", values[name])
        value = values[name]
        sql = re.sub(r"\$" + re.escape(name) + r"(?![_a-zA-Z0-9(])", lambda _, v=value: v, sql)
    f, t = rfc3339nano(frm), rfc3339nano(to)

    def macro(m: re.Match) -> str:
        name, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{f}' AND '{t}'"
        if name == "__timeFrom":
            return f"'{f}'"
        if name == "__timeTo":
            return f"'{t}'"
        if name == "__time":
            return f'{args[0]} AS "time"'
        if name in ("__timeGroup", "__timeGroupAlias"):
            s = _go_float(seconds(args[1]))
            group = f"floor(extract(epoch from {args[0]})/{s})*{s}"
            return group + (' AS "time"' if name == "__timeGroupAlias" else "")
        raise ValueError(f"macro ${name} is not expanded here")
    return _MACRO.sub(macro, sql)
