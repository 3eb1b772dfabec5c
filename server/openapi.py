"""``GET /openapi.json``: an OpenAPI 3.1 document generated from the wire
types (``server/wire.py``, the protocol configs of ``pollers/``) with
``msgspec.json.schema_components``, so limits such as ``maxItems: 1000`` and
string lengths come from the same types that decode the requests. The
suite validates it with openapi-spec-validator and runs schemathesis
against the live server for every operation.
"""
from __future__ import annotations

import functools

import msgspec

from ..pollers.modbus import ModbusConfig
from ..pollers.opcua import OpcuaConfig

from . import wire

REF = "#/components/schemas/{name}"

# (method, path, summary, request type, success status, response type, security)
OPERATIONS = [
    ("post", "/api/v1/ingest", "Push readings (the contract's HTTP Push)",
     wire.IngestBatch, "207", wire.IngestResult, "apiKey"),
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
]

STATUS = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}


@functools.cache
def document() -> bytes:
    types = [t for op in OPERATIONS for t in (op[3], op[5]) if t is not None]
    types += [wire.ErrorBody, ModbusConfig, OpcuaConfig]
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    of = dict(zip(map(id, types), schemas))
    _dates(components)
    # A source's config is the protocol's config type; which one depends on
    # "protocol", so the body type says only "an object" (checked by field).
    for name in ("SourceCreate",):
        components[name]["properties"]["config"] = {
            "anyOf": [{"$ref": REF.format(name="ModbusConfig")},
                      {"$ref": REF.format(name="OpcuaConfig")}]}
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
        if body is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": of[id(body)]}}}
        if status == "204":
            op["responses"][status] = {"description": "Done"}
        else:
            schema = of[id(answer)] if answer is not None else STATUS
            op["responses"][status] = {"description": "Success",
                                       "content": {"application/json": {"schema": schema}}}
        op["responses"]["default"] = error
        if security:
            op["security"] = [{security: []}]
        paths.setdefault(path, {})[method] = op
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics of every worker",
                                 "operationId": "get_metrics", "responses": {
                                     "200": {"description": "Prometheus text format",
                                             "content": {"text/plain": {"schema": {"type": "string"}}}},
                                     "default": error}}}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "Haltless ingest", "version": "1",
                 "description": "The HTTP push API of the public contract and the management "
                                "API for direct ingestion. Every refusal is JSON "
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
