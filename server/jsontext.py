"""JSON text the stdlib parses where msgspec refuses it (the ingest slow
path, management bodies), and the strings PostgreSQL cannot store: one
definition of each, so a reading and a source config are refused alike."""
from __future__ import annotations

import json


def parse_int(digits: str):
    """An integer literal; beyond the 4,300 digits int() takes, a float (+-inf)."""
    return int(digits) if len(digits) <= 4300 else float(digits)


# NaN, Infinity and 1e400 come out as floats; integers of any length parse.
decoder = json.JSONDecoder(parse_int=parse_int)

NUL = "contains a NUL character (\\u0000), which cannot be stored; remove it"
NOT_UTF8 = ("is not valid UTF-8 (invalid bytes, or a lone surrogate escape such as \\ud800); "
            "send UTF-8 text")


def utf8(v: str) -> bool:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_problem(v: str) -> str | None:
    """Why PostgreSQL cannot store ``v`` (NUL, or not UTF-8), or None."""
    if "\x00" in v:
        return NUL
    if not utf8(v):
        return NOT_UTF8
    return None
