"""``GET /openapi.json``: an OpenAPI 3.1 document generated from the wire
types (``core/wire.py``, the protocol configs of ``pollers/``) with
``msgspec.json.schema_components``, so limits such as ``maxItems: 1000`` and
string lengths come from the same types that decode the requests. The read
routes take query parameters instead of a body; theirs are described here
from the limits in ``server/query.py`` (the names are checked against the
ones each handler accepts). The suite validates the document with
openapi-spec-validator and runs schemathesis against the live server, with
real data, for every operation.
"""
from __future__ import annotations

import functools

import msgspec

from ..core import wire
from ..pollers.modbus_config import ModbusConfig
from ..pollers.mqtt_config import MqttConfig
from ..pollers.opcua_config import OpcuaConfig
from . import query

REF = "#/components/schemas/{name}"

# (method, path, summary, request type, success status, response type, security)
OPERATIONS = [
    ("post", "/api/v1/ingest", "Push readings (the contract's HTTP Push)",
     wire.IngestBatch, "207", wire.IngestResult, "apiKey"),
    ("get", "/api/v1/ingest/machines",
     ("Which of the given machines the API key's organization has (not in the public "
      "contract; `haltless agent --check` asks it)"), None, "200", wire.MachineCheck, "apiKey"),
    ("get", "/healthz", "The process is up", None, "200", None, None),
    ("get", "/readyz", "The database is reachable", None, "200", None, None),
    ("post", "/api/v1/machines", "Create a machine", wire.MachineCreate, "201", wire.Machine, "bearer"),
    ("get", "/api/v1/machines", "List machines", None, "200", list[wire.Machine], "bearer"),
    ("get", "/api/v1/machines/{id}", "One machine", None, "200", wire.Machine, "bearer"),
    ("post", "/api/v1/ingest-sources", "Create an ingest source", wire.SourceCreate, "201",
     wire.Source, "bearer"),
    ("get", "/api/v1/ingest-sources", "List ingest sources", None, "200", list[wire.Source], "bearer"),
    ("get", "/api/v1/ingest-sources/{id}", "One ingest source", None, "200", wire.Source, "bearer"),
    ("patch", "/api/v1/ingest-sources/{id}", "Change an ingest source", wire.SourcePatch, "200",
     wire.Source, "bearer"),
    ("delete", "/api/v1/ingest-sources/{id}", "Delete an ingest source", None, "204", None, "bearer"),
    ("post", "/api/v1/ingest-sources/{id}/test-connection", "Connect and read every point once",
     None, "200", wire.TestConnectionResult, "bearer"),
    ("get", "/api/v1/readings",
     ("Every stored reading of a machine's series in [from, to), in time order, paged (JSON) "
      "or streamed (CSV)"), None, "200", wire.ReadingsPage, "bearer"),
    ("get", "/api/v1/readings/aggregate",
     ("Aggregates of a machine's series per interval bucket (at whole minutes, compacted "
      "hours from their per-minute summaries)"), None, "200", wire.AggregatePage, "bearer"),
    ("get", "/api/v1/readings/latest",
     ("The newest reading of every series of the organization or of one machine"), None, "200",
     wire.LatestPage, "bearer"),
]

# ------------------------------------------------------------------ the read side's parameters


def _q(name: str, schema: dict, description: str, required: bool = False, **extra) -> dict:
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": schema, **extra}


_TIME = (f"ISO 8601 with Z or an offset (none means UTC), years {query.FIRST_YEAR} to "
         f"{query.LAST_YEAR - 1}")
_MACHINE = _q("machine_identifier", {"type": "string"}, "the machine's identifier; 404 when "
              "the token's organization has no such machine", required=True, example="CNC-001")
_METRICS = _q("metric_name", {"type": "array", "items": {"type": "string"}},
              "repeat it for several metrics; left out, every metric of the machine; 404 "
              "naming the metric the machine does not have", style="form", explode=True,
              example=["temperature"])
_RANGE = [
    _q("from", {"type": "string", "format": "date-time"},
       f"start of the half-open range [from, to), included: {_TIME}", required=True,
       example="2026-11-28T00:00:00Z"),
    _q("to", {"type": "string", "format": "date-time"},
       f"end of the range, left out; must be after from: {_TIME}", required=True,
       example="2026-11-28T01:00:00Z"),
]
_AGG_DEFAULT = query.DEFAULT_AGGREGATES.split(",")
PARAMETERS = {
    "/api/v1/readings": [
        _MACHINE, _METRICS, *_RANGE,
        _q("limit", {"type": "integer", "minimum": 1, "maximum": query.MAX_LIMIT,
                     "default": query.DEFAULT_LIMIT},
           "readings per page, counted over all series, the earliest first (JSON only)"),
        _q("cursor", {"type": "string"}, "next_cursor of the previous page; only with the "
           "same machine_identifier, metric_name, from and to (else 422)"),
        _q("format", {"type": "string", "enum": ["json", "csv"]}, "csv (or Accept: text/csv) "
           "streams every reading of the range as CSV rows; then no limit or cursor"),
    ],
    "/api/v1/readings/aggregate": [
        _q("machine_identifier", {"type": "string"}, "the machine's identifier (404 when the "
           "token's organization has no such machine); left out, every machine of the "
           "organization: one entry per machine and series (a fleet question in one request; "
           f"at most {query.MAX_FLEET_SERIES:,} series)", example="CNC-001"),
        _q("metric_name", {"type": "array", "items": {"type": "string"}},
           "repeat it for several metrics; left out, every metric; 404 naming a metric the "
           "machine (or, without machine_identifier, every machine) does not have",
           style="form", explode=True),
        *_RANGE,
        _q("interval", {"type": "string", "pattern": r"^[1-9][0-9]{0,6}[smhd]$"},
           "bucket width: a number and s, m, h or d, from 1s to 31d; buckets are aligned to "
           f"it from the Unix epoch; at most {query.MAX_BUCKETS:,} buckets and "
           f"{query.MAX_CELLS:,} series x buckets per request; at whole minutes compacted "
           "hours come from their per-minute summaries",
           required=True, example="1m"),
        _q("agg", {"type": "array", "minItems": 1, "default": _AGG_DEFAULT,
                   "items": {"type": "string", "enum": list(query.AGGREGATES)}},
           "the aggregates to compute, comma-separated (or repeated)", style="form",
           explode=False, example=_AGG_DEFAULT),
    ],
    "/api/v1/readings/latest": [
        _q("machine_identifier", {"type": "string"}, "only this machine's series; left out, "
           "every series of the organization; 404 when there is no such machine",
           example="CNC-001"),
    ],
    "/api/v1/ingest/machines": [
        _q("machine_identifier", {"type": "array", "minItems": 1,
                                  "maxItems": wire.MAX_MACHINE_CHECK,
                                  "items": {"type": "string", "minLength": 1, "maxLength": 200}},
           f"repeat it for each machine, 1 to {wire.MAX_MACHINE_CHECK}; each is answered in "
           "found or not_found", required=True, style="form", explode=True,
           example=["CNC-001"]),
    ],
}
# Refusals the read routes answer besides the general ones (429, 503, ...).
READ_ERRORS = {
    "401": "No bearer token, or an invalid one; an API key is refused here (keys are "
           "write-only; use `haltless token create`)",
    "404": "No such machine in the token's organization, or no such metric of the machine; "
           "the detail starts with the parameter's name",
    "422": "A parameter missing, malformed, out of its limits, repeated or unknown, a "
           "reversed range or a cursor of another query; the detail starts with the "
           "parameter's name and says what is allowed",
}

# ... and those of the key-checked GET.
MACHINE_CHECK_ERRORS = {
    "401": "No X-API-Key, or an unknown or revoked one",
    "422": "machine_identifier missing, repeated more than allowed, too long, or another "
           "parameter given; the detail starts with the parameter's name",
}

STATUS = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}


@functools.cache
def document() -> bytes:
    types = [t for op in OPERATIONS for t in (op[3], op[5]) if t is not None]
    types += [wire.ErrorBody, ModbusConfig, OpcuaConfig, MqttConfig]
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    of = dict(zip(map(id, types), schemas))
    _dates(components)
    # A source's config is the protocol's config type; which one depends on
    # "protocol", so the body type says only "an object" (checked by field).
    for name in ("SourceCreate",):
        components[name]["properties"]["config"] = {
            "anyOf": [{"$ref": REF.format(name="ModbusConfig")},
                      {"$ref": REF.format(name="OpcuaConfig")},
                      {"$ref": REF.format(name="MqttConfig")}]}
    error = {"description": "The request was refused: what was wrong, where, what is allowed",
             "content": {"application/json": {"schema": of[id(wire.ErrorBody)]}}}
    paths: dict = {}
    for method, path, summary, body, status, answer, security in OPERATIONS:
        op: dict = {"summary": summary, "operationId": f"{method}_{path}".replace("/", "_")
                    .replace("{", "").replace("}", "").replace("-", "_").strip("_"),
                    "responses": {}}
        if "{id}" in path:
            op["parameters"] = [{"name": "id", "in": "path", "required": True,
                                 "schema": {"type": "string", "format": "uuid"}}]
        if path in PARAMETERS:
            op["parameters"] = PARAMETERS[path]
        if body is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": of[id(body)]}}}
        if status == "204":
            op["responses"][status] = {"description": "Done"}
        else:
            schema = of[id(answer)] if answer is not None else STATUS
            op["responses"][status] = {"description": "Success",
                                       "content": {"application/json": {"schema": schema}}}
        if path in PARAMETERS:
            errors = MACHINE_CHECK_ERRORS if security == "apiKey" else READ_ERRORS
            for code, text in errors.items():
                op["responses"][code] = {**error, "description": text}
        op["responses"]["default"] = error
        if security:
            op["security"] = [{security: []}]
        paths.setdefault(path, {})[method] = op
    paths["/api/v1/readings"]["get"]["responses"]["200"]["content"]["text/csv"] = {
        "schema": {"type": "string",
                   "description": "a header line, then one row per reading in time order: "
                                  + query.CSV_HEADER.decode().strip()}}
    paths["/"] = {"get": {"summary": "The fleet page (HTML; paste a token from `haltless token "
                                     "create`)", "operationId": "get_fleet_page", "responses": {
                              "200": {"description": "The page; its scripts and styles are "
                                                     "under /static/",
                                      "content": {"text/html": {"schema": {"type": "string"}}}},
                              "default": error}}}
    paths["/openapi.json"] = {"get": {"summary": "This document", "operationId": "get_openapi",
                                      "responses": {"200": {"description": "OpenAPI 3.1",
                                                            "content": {"application/json": {
                                                                "schema": {"type": "object"}}}},
                                                    "default": error}}}
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics of every worker",
                                 "operationId": "get_metrics", "responses": {
                                     "200": {"description": "Prometheus text format",
                                             "content": {"text/plain": {"schema": {"type": "string"}}}},
                                     "default": error}}}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "Haltless ingest", "version": "1",
                 "description": "The HTTP push API of the public contract, the management "
                                "API for direct ingestion and the query API that reads the "
                                "readings back. Every refusal is JSON "
                                '{"detail": "..."}; 429 and 503 carry Retry-After.'},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
    }
    return msgspec.json.encode(doc)


def _dates(components: dict) -> None:
    """msgspec leaves ``format`` off datetimes (it accepts naive ones, which
    we take as UTC); the API sends and prefers RFC 3339."""
    for comp in components.values():
        for name, prop in comp.get("properties", {}).items():
            for s in [prop, *prop.get("anyOf", [])]:
                if s.get("type") == "string" and (name == "timestamp" or name.endswith("_at")):
                    s["format"] = "date-time"
