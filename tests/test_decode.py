"""Request bodies into readings (server/decode.py), in process: any nesting
depth, anywhere in the body, is a per-reading error or a 4xx naming the
position, never an exception the app would answer 500."""
from __future__ import annotations

import json
import random

import pytest

from haltless.core.errors import ClientError
from haltless.server.decode import as_reading, count_readings, decode_batch

READING = {"machine_identifier": "M", "timestamp": "2026-01-01T00:00:00Z", "metric_name": "m",
           "value": 1.0}


def nested(depth: int, leaf: str = "1", rng: random.Random | None = None) -> str:
    """``depth`` levels of arrays and objects (chosen by ``rng``) around ``leaf``."""
    rng = rng or random.Random(0)
    opens, closes = [], []
    for _ in range(depth):
        if rng.random() < 0.5:
            opens.append("[")
            closes.append("]")
        else:
            opens.append('{"k": ')
            closes.append("}")
    return "".join(opens) + leaf + "".join(reversed(closes))


def outcome(body: str):
    """("ok", readings, errors) or ("refused", status, message); anything else raises."""
    try:
        readings, errors, _ = decode_batch(body.encode())
    except ClientError as exc:
        return "refused", exc.status, str(exc)
    return "ok", readings, errors


@pytest.mark.parametrize("depth", [10, 899, 1000, 20_000])
@pytest.mark.parametrize("where", ["unknown member after", "unknown member before",
                                   "unknown field of a reading"])
def test_any_depth_in_an_unknown_member_is_accepted_or_a_per_reading_error(depth, where):
    deep = nested(depth)
    if where == "unknown member after":
        body = json.dumps({"readings": [READING]})[:-1] + f', "x": {deep}}}'
    elif where == "unknown member before":
        body = f'{{"x": {deep}, "readings": [{json.dumps(READING)}]}}'
    else:
        body = '{"readings": [' + json.dumps(READING)[:-1] + f', "x": {deep}}}]}}'
    kind, readings, errors = outcome(body)
    assert kind == "ok"
    assert len(readings) == 1 and count_readings(body.encode()) == 1
    if where == "unknown field of a reading" and depth >= 1000:  # README: ~900 levels
        assert readings[0] is None and "nested too deeply" in errors[0]
    else:
        assert errors == {} and as_reading(readings[0]).machine_identifier == "M"


@pytest.mark.parametrize(("bad", "message"), [
    ("1 2", "expected ',' or ']'"),
    ('"\\q"', "Invalid \\escape"),
    ("tru", "expected a value"),
    ("[1,]", "expected a value"),
    ('{"k" 1}', "expected ':'"),
    ("{1: 2}", "expected a property name"),
    ('"a\nb"', "Invalid control character"),
])
def test_malformed_json_deep_inside_an_unknown_member_is_a_400_naming_the_spot(bad, message):
    body = '{"readings": [], "x": ' + "[" * 2000 + bad + "]" * 2000 + "}"
    kind, status, text = outcome(body)
    assert (kind, status) == ("refused", 400)
    assert message in text and "character" in text


def test_an_unterminated_deep_member_is_a_400():
    kind, status, text = outcome('{"readings": [], "x": ' + "[" * 5000)
    assert (kind, status) == ("refused", 400), text


def test_deep_readings_that_are_not_an_array_are_a_422():
    kind, status, text = outcome('{"readings": ' + nested(5000).replace("[", "{\"a\":", 1) + "}")
    assert kind == "refused" and status in (400, 422)
    kind, status, text = outcome('{"readings": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}")
    assert (kind, status) == ("refused", 422) and "must be an array" in text


def test_random_deep_bodies_never_escape_as_anything_but_a_client_error():
    rng = random.Random(20261207)
    scalars = ["1", "-0.5e3", '"s"', '"\\u00e9"', "true", "null", "NaN", "-Infinity"]
    for _ in range(300):
        depth = rng.choice([1, 50, 899, 901, 1500, 5000])
        deep = nested(depth, rng.choice(scalars), rng)
        if rng.random() < 0.3:  # break it somewhere
            cut = rng.randrange(len(deep))
            deep = deep[:cut] + rng.choice(["", ",", "]", "}", ":", '"', "x"]) + deep[cut + 1:]
        place = rng.choice(["before", "after", "in reading", "as readings"])
        if place == "before":
            body = f'{{"x": {deep}, "readings": []}}'
        elif place == "after":
            body = f'{{"readings": [], "x": {deep}}}'
        elif place == "in reading":
            body = '{"readings": [' + json.dumps(READING)[:-1] + f', "x": {deep}}}]}}'
        else:
            body = f'{{"readings": {deep}}}'
        kind, *_ = outcome(body)  # raises on anything but a ClientError
        count_readings(body.encode())
