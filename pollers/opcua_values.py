"""What one OPC-UA DataValue becomes: a Sample, or a PointError that says
why not. The poll reader (``opcua.py``) and the subscriber
(``opcua_subscription.py``) both store a value only when its status is
Good and it is a finite number (a boolean reads as 1.0 or 0.0); the
subscriber's fast path (``haltless.fast.data_changes``) decodes the wire
itself and words its refusals with the functions here, so a value is
refused the same way whichever path read it."""
from __future__ import annotations

import datetime as _dt
import math
from typing import NamedTuple

from asyncua import ua

from .base import PointError, Sample

UTC = _dt.timezone.utc
NO_TIME = _dt.datetime(1601, 1, 2, tzinfo=UTC)  # servers send the 1601 epoch for "no timestamp"
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=UTC)
_POINT_HINTS = {"BadNodeIdUnknown": "does not exist on the server", "BadNotReadable": "is not readable",
                "BadAttributeIdInvalid": "has no value (is it a variable?)"}


class Point(NamedTuple):
    """A configured node as its readings name it."""

    node_id: str
    raw_tag: str
    metric_name: str
    unit: str | None


def is_good(code: int) -> bool:
    return not code & 0xC0000000  # Good = top two bits clear


def status_error(point: Point, code: int) -> PointError:
    """The point's error for a value whose status is not Good (Bad or Uncertain)."""
    name = ua.StatusCode(code).name
    hint = _POINT_HINTS.get(name)
    return PointError(point.raw_tag, point.metric_name,
                      f"node {point.node_id} {hint} ({name})" if hint
                      else f"the server reported status {name}, not Good")


def type_error(point: Point, variant_type: int, is_array: bool) -> PointError:
    """The point's error for a value that is not a number (``variant_type`` 0: no value)."""
    name = "Null" if variant_type == 0 else ua.VariantType(variant_type).name + "[]" * is_array
    return PointError(point.raw_tag, point.metric_name, f"value of type {name} is not numeric")


def finite_error(point: Point, number: float) -> PointError:
    return PointError(point.raw_tag, point.metric_name, f"value {number} is not a finite number")


def utc(ts: _dt.datetime | None) -> _dt.datetime | None:
    """``ts`` as aware UTC, or None when the server sent none (or the 1601 epoch)."""
    if ts is None:
        return None
    if ts.tzinfo is not UTC:
        ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    return None if ts < NO_TIME else ts


def from_us(us: int) -> _dt.datetime:
    """Unix microseconds as an aware UTC datetime, exactly."""
    return _EPOCH + _dt.timedelta(microseconds=us)


def to_sample(dv: ua.DataValue, point: Point, fallback: _dt.datetime) -> Sample | PointError:
    """The reading of ``dv``, stamped with its SourceTimestamp, else ``fallback``."""
    status = dv.StatusCode
    if status is not None and not is_good(status.value):
        return status_error(point, status.value)
    variant = dv.Value
    value = variant.Value if variant is not None else None
    if not isinstance(value, (int, float)):  # bool is an int: True -> 1.0
        return type_error(point, 0 if variant is None else variant.VariantType.value,
                          variant is not None and variant.is_array)
    number = float(value)
    if not math.isfinite(number):
        return finite_error(point, number)
    return Sample(point.metric_name, point.unit, point.raw_tag, number, utc(dv.SourceTimestamp) or fallback)
