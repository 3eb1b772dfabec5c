"""A request body into readings (what ``Ingestor.prepare`` takes).

The fast path is one msgspec decode of the whole batch into ``Reading``
structs. A body msgspec refuses (a bad reading, a ``NaN`` literal, a NUL
escape) takes the slow path: the stdlib scanner, reading by reading, so
one bad reading fails only itself and names its field. Whole-batch
mistakes (not JSON, the wrong shape, more than 1,000 readings) are a
``ClientError`` that answers the request.
"""
from __future__ import annotations

import json
import re
from json.decoder import scanstring

import msgspec

from ..core.errors import ClientError, Unprocessable
from ..core.wire import (MAX_READINGS, Reading, batch_decoder, describe_validation_error,
                         fast_decoder, fast_reading_decoder)
from .jsontext import NOT_UTF8, decoder, text_problem, utf8


def decode_batch(body: bytes, strict: bool = False) -> tuple[list, dict[int, str], list]:
    """Returns (readings, errors, raw): readings[i] is a Reading (its JSON
    text as msgspec.Raw unless ``strict``, see ``as_reading``) or None when
    errors[i] says why not; raw[i] is the reading as sent (slow path only).

    A body with ``\\u0000`` takes the slow path too: msgspec accepts NUL in
    strings, PostgreSQL refuses it, so it must be found reading by reading."""
    try:
        readings = (batch_decoder if strict else fast_decoder).decode(body).readings
    except msgspec.ValidationError as exc:
        if str(exc).endswith(f"length <= {MAX_READINGS} - at `$.readings`"):
            raise _too_many(count_readings(body) or None) from None
        return _decode_slow(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return _decode_slow(body)
    if b"\\" in body and b"\\u0000" in body:  # memchr first: most bodies hold no escape
        return _decode_slow(body)
    return readings, {}, []


def as_reading(item):
    """A reading of decode_batch's with attributes: the text of a fast-path
    reading decoded (the kernel read it already, so it decodes)."""
    return fast_reading_decoder.decode(item) if type(item) is msgspec.Raw else item


def count_readings(body: bytes) -> int:
    """How many readings ``body`` holds (0 when it is not a batch at all),
    without validating them: what the rate limiter charges."""
    try:
        return len(_envelope_decoder.decode(body).readings)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        try:
            return len(_decode_slow(body)[0])
        except ClientError:
            return 0


class _Envelope(msgspec.Struct):
    readings: list[msgspec.Raw]


_envelope_decoder = msgspec.json.Decoder(_Envelope)


def _too_many(n: int | None) -> ClientError:
    has = f"{n:,}" if n is not None else f"more than {MAX_READINGS:,}"
    return Unprocessable(
        f"batch has {has} readings; the limit is {MAX_READINGS:,} per request - split it "
        "into several requests")


def _decode_slow(body: bytes) -> tuple[list, dict[int, str], list]:
    """Reading by reading, so one bad reading fails only itself.

    The stdlib scanner accepts the NaN/Infinity literals that json.dumps
    writes by default and turns 1e400 (and integers of more than 4,300
    digits) into inf: those readings then fail as "not finite" on their own.
    The readings array is scanned item by item and refused past the
    1,000th, so a 10 MB body is not parsed whole first (that blocked the
    event loop ~0.5 s per request). Bytes that are not UTF-8 are kept as
    lone surrogates (``surrogateescape``) and fail the reading whose string
    holds them, like a ``\\ud800`` escape does."""
    text = body.decode("utf-8", "surrogateescape")
    raw = _scan_batch(text)
    readings: list = []
    errors: dict[int, str] = {}
    for i, item in enumerate(raw):
        r = None
        if item is _TOO_DEEP:
            errors[i] = ("reading is nested too deeply (unknown fields are ignored, but must "
                         f"nest less than {_MAX_DEPTH} levels)")
        elif not isinstance(item, dict):
            errors[i] = f"reading must be a JSON object; got {_kind(item)}"
        else:
            try:
                r = msgspec.convert(item, Reading)
            except msgspec.ValidationError as exc:
                errors[i] = describe_validation_error(exc)
            except UnicodeEncodeError:  # msgspec met a lone surrogate (a key, a timestamp)
                errors[i] = _unencodable(item)
            else:
                bad = _text_error(r)
                if bad:
                    r, errors[i] = None, bad
        readings.append(r)
    return readings, errors, raw


_TEXT_FIELDS = ("machine_identifier", "metric_name", "unit", "raw_tag")
_MAX_DEPTH = 900  # about where the stdlib scanner gives up (the recursion limit)


def _text_error(r: Reading) -> str | None:
    """Why a string of ``r`` cannot be stored (PostgreSQL text is UTF-8 without NUL)."""
    for name in _TEXT_FIELDS:
        v = getattr(r, name)
        why = text_problem(v) if v else None
        if why:
            return f"{name}: {why}"
    return None


def _unencodable(item: dict) -> str:
    for k, v in item.items():
        if not utf8(k):
            return f"a field name {NOT_UTF8}"
        if isinstance(v, str) and not utf8(v):
            return f"{k[:100]}: {NOT_UTF8}"
    return "reading is not valid UTF-8 text; send UTF-8 text"


_scan = decoder.scan_once
_WS = re.compile(r"[ \t\n\r]*")
# What the stdlib scanner takes for a scalar: numbers, the three literals,
# and NaN / Infinity / -Infinity (json.dumps writes them).
_SCALAR = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
                     r"|true|false|null|NaN|Infinity|-Infinity")
_TOO_DEEP = object()
_FIRST = {"[": "an array", '"': "a string", "t": "a boolean", "f": "a boolean", "n": "null",
          "N": "a number", "I": "a number", "-": "a number", **{d: "a number" for d in "0123456789"}}


def _scan_batch(text: str) -> list:
    """The items of the top-level object's "readings" array, scanned one by
    one (at most MAX_READINGS); the other members are parsed and dropped."""
    ws = _WS.match
    i = ws(text, 0).end()
    if i == len(text):
        raise _not_json(text, i, "the body is empty")
    if text[i] != "{":
        kind = _FIRST.get(text[i])
        if kind is None:
            raise _not_json(text, i, "expected a value")
        raise Unprocessable('request body must be a JSON object {"readings": [...]}; '
                            f"got {kind}")
    keys: list[str] = []
    readings = _MISSING = object()
    i = ws(text, i + 1).end()
    if text.startswith("}", i):
        i += 1
    else:
        while True:
            if not text.startswith('"', i):
                raise _not_json(text, i, "expected a property name in double quotes")
            key, i = _scan_value(text, i)
            i = ws(text, i).end()
            if not text.startswith(":", i):
                raise _not_json(text, i, "expected ':'")
            i = ws(text, i + 1).end()
            if key == "readings" and text.startswith("[", i):
                readings, i = _scan_items(text, i)
            else:
                try:
                    value, i = _scan_value(text, i)
                except RecursionError:  # an unknown member (or "readings") nested too deeply
                    value, i = _TOO_DEEP, _skip_value(text, i)
                if key == "readings":
                    readings = value
            if len(keys) < 5:
                keys.append(key)
            i = ws(text, i).end()
            if text.startswith(",", i):
                i = ws(text, i + 1).end()
                continue
            if text.startswith("}", i):
                i += 1
                break
            raise _not_json(text, i, "expected ',' or '}'")
    i = ws(text, i).end()
    if i != len(text):
        raise _not_json(text, i, "extra data after the JSON object")
    if readings is _MISSING:
        raise Unprocessable('request body must be a JSON object {"readings": [...]}; '
                            f"got an object with keys {sorted(keys)}")
    if not isinstance(readings, list):
        got = "an object nested too deeply" if readings is _TOO_DEEP else _kind(readings)
        raise Unprocessable(f'"readings" must be an array of readings; got {got}')
    return readings


def _scan_items(text: str, i: int) -> tuple[list, int]:
    ws = _WS.match
    items: list = []
    i = ws(text, i + 1).end()
    if text.startswith("]", i):
        return items, i + 1
    while True:
        try:
            item, i = _scan_value(text, i)
        except RecursionError:
            item, i = _TOO_DEEP, _skip_value(text, i)
        items.append(item)
        i = ws(text, i).end()
        if text.startswith(",", i):
            if len(items) == MAX_READINGS:
                raise _too_many(None)
            i = ws(text, i + 1).end()
            continue
        if text.startswith("]", i):
            return items, i + 1
        raise _not_json(text, i, "expected ',' or ']'")


def _scan_value(text: str, i: int):
    try:
        return _scan(text, i)
    except StopIteration:
        raise _not_json(text, i, "expected a value") from None
    except json.JSONDecodeError as exc:
        raise _not_json(text, exc.pos, exc.msg) from None


def _skip_value(text: str, i: int) -> int:
    """Where the JSON value at ``i`` ends, for a value nested too deeply for
    the stdlib scanner (which recurses): checked as strictly as that scanner
    checks (strings, escapes, numbers, NaN/Infinity, commas, colons), but
    with a stack of open containers instead of recursion, so any depth is
    either valid JSON or a 400 naming the position."""
    ws = _WS.match
    closers: list[str] = []
    while True:
        i = ws(text, i).end()  # a value starts here
        c = text[i:i + 1]
        if c == "{" or c == "[":
            close = "}" if c == "{" else "]"
            i = ws(text, i + 1).end()
            if text.startswith(close, i):
                i += 1
            else:
                closers.append(close)
                if close == "}":
                    i = _skip_key(text, i)
                continue
        elif c == '"':
            try:
                i = scanstring(text, i + 1)[1]
            except json.JSONDecodeError as exc:
                raise _not_json(text, exc.pos, exc.msg) from None
        else:
            m = _SCALAR.match(text, i)
            if m is None:
                raise _not_json(text, i, "expected a value")
            i = m.end()
        while closers:  # a value ended: close containers, or on to the next value
            i = ws(text, i).end()
            if text.startswith(",", i):
                i += 1
                if closers[-1] == "}":
                    i = _skip_key(text, ws(text, i).end())
                break
            if not text.startswith(closers[-1], i):
                raise _not_json(text, i, f"expected ',' or '{closers[-1]}'")
            closers.pop()
            i += 1
        else:
            return i


def _skip_key(text: str, i: int) -> int:
    """Past ``"name":`` at ``i`` (white space before it already skipped)."""
    if not text.startswith('"', i):
        raise _not_json(text, i, "expected a property name in double quotes")
    try:
        i = scanstring(text, i + 1)[1]
    except json.JSONDecodeError as exc:
        raise _not_json(text, exc.pos, exc.msg) from None
    i = _WS.match(text, i).end()
    if not text.startswith(":", i):
        raise _not_json(text, i, "expected ':'")
    return i + 1


def _not_json(text: str, pos: int, msg: str) -> ClientError:
    where = json.JSONDecodeError(msg, text, pos)
    return ClientError(f"request body is not valid JSON: {msg} at line {where.lineno} column "
                       f"{where.colno} (character {pos})")


def _kind(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def echo_identifier(readings: list, raw: list, i: int) -> str | None:
    """The machine_identifier to echo with reading i's error: only one that
    is valid text of the allowed length (never a 1 MB string back)."""
    r = readings[i]
    if r is not None:
        return as_reading(r).machine_identifier
    item = raw[i] if i < len(raw) else None
    ident = item.get("machine_identifier") if isinstance(item, dict) else None
    if isinstance(ident, str) and 0 < len(ident) <= 200 and "\x00" not in ident and utf8(ident):
        return ident
    return None
