"""Ingest sources (direct ingestion): validation of the contract's bodies,
storage with write-only secrets sealed, and the JSON shape the API returns."""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, NamedTuple

import asyncpg
import msgspec
from msgspec import UNSET

from ..core.errors import NotFound, TargetRefused, Unprocessable
from ..core.wire import (MqttStatus, Source, SourceCreate, SourcePatch, SourceStatus,
                         describe_validation_error)
from ..pollers.modbus_config import ModbusConfig, validate_modbus_config
from ..pollers.mqtt_config import MqttConfig, validate_mqtt_config
from ..pollers.opcua_config import OpcuaConfig, validate_opcua_config
from .jsontext import decoder, text_problem
from .netpolicy import AddressPolicy
from .secretbox import SecretBox

SECRET_FIELDS = {"opcua": ("password",), "modbus": (), "mqtt": ("password",)}
CONFIG_TYPES = {"opcua": OpcuaConfig, "modbus": ModbusConfig, "mqtt": MqttConfig}
VALIDATORS = {"opcua": validate_opcua_config, "modbus": validate_modbus_config,
              "mqtt": validate_mqtt_config}
# Protocols whose sources may name no machine (their messages name it).
MACHINE_OPTIONAL = {"mqtt"}


def decode_body(body: bytes, typ):
    """The management body as ``typ``; 422 naming the field otherwise. The
    stdlib parser (management bodies are small) keeps NaN, Infinity, 1e400
    and integers of more than 4,300 digits as floats, so the field-level
    check names the field they are in; strings PostgreSQL cannot store (NUL,
    lone surrogates, bytes that are not UTF-8) are refused by path."""
    try:
        doc = decoder.decode(body.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as exc:
        raise Unprocessable(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise Unprocessable("request body is nested too deeply") from None
    try:
        _check_text(doc, "")
    except RecursionError:
        raise Unprocessable("request body is nested too deeply") from None
    try:
        return msgspec.convert(doc, typ)
    except msgspec.ValidationError as exc:
        raise Unprocessable(describe_validation_error(exc)) from None


def _check_text(v, path: str) -> None:
    if isinstance(v, str):
        why = text_problem(v)
        if why:
            raise Unprocessable(f"{path or 'body'}: {why}")
    elif isinstance(v, dict):
        for k, item in v.items():
            why = text_problem(k)
            if why:
                raise Unprocessable(f"{path or 'body'}: a property name {why}")
            _check_text(item, f"{path}.{k}" if path else k)
    elif isinstance(v, list):
        for i, item in enumerate(v):
            _check_text(item, f"{path}[{i}]")


def check_config(protocol: str, config: dict):
    """The typed config of ``protocol``; 422 naming the field otherwise."""
    try:
        cfg = msgspec.convert(config, CONFIG_TYPES[protocol])
    except msgspec.ValidationError as exc:
        msg = describe_validation_error(exc, CONFIG_TYPES[protocol])
        top = re.fullmatch(r"missing required field `(\w+)`", msg)
        if top:  # a field of the config itself: name it first, as every other message does
            raise Unprocessable(f"config.{top.group(1)}: missing required field") from None
        if not re.match(r"[\w.\[\]]+: ", msg):  # about the config as a whole
            raise Unprocessable(f"config: {msg}") from None
        raise Unprocessable(f"config.{msg}" if not msg.startswith(":") else f"config{msg}") from None
    try:
        VALIDATORS[protocol](cfg)
    except ValueError as exc:
        raise Unprocessable(f"config.{exc}") from None
    return cfg


def check_target(policy: AddressPolicy, host: str, port: int) -> None:
    try:
        policy.check(host, port)
    except TargetRefused as exc:
        raise Unprocessable(f"host: {exc}") from None


def split_secrets(protocol: str, config: dict) -> tuple[dict, dict]:
    public = {k: v for k, v in config.items() if k not in SECRET_FIELDS[protocol]}
    secret = {k: config[k] for k in SECRET_FIELDS[protocol] if config.get(k) is not None}
    return public, secret


COLUMNS = ("id, machine_id, name, protocol, host, port, poll_interval_seconds, is_active, config,"
           " secrets, created_at, updated_at, last_poll_at, last_success_at, last_error,"
           " last_error_at, readings_written, points_failed, polls_missed, lease_owner,"
           " server_cert_sha256, protocol_status")


def public_config(row) -> dict:
    """The stored config without its write-only fields."""
    return json.loads(row["config"]) if isinstance(row["config"], str) else dict(row["config"])


def full_config(row, box: SecretBox) -> dict:
    """The config a reader needs: the stored config with its secrets opened."""
    return {**public_config(row), **box.open(row["secrets"], row["id"].bytes)}


class StoredSource(NamedTuple):
    """A source as a reader needs it: its typed config (secrets opened),
    validated once when it is loaded, not at every reconnect."""

    id: uuid.UUID
    protocol: str
    host: str
    port: int
    config: Any  # ModbusConfig | OpcuaConfig


def stored(row, box: SecretBox) -> StoredSource:
    return StoredSource(row["id"], row["protocol"], row["host"], row["port"],
                        msgspec.convert(full_config(row, box), CONFIG_TYPES[row["protocol"]]))


# What a poller needs of the sources it leased.
POLL_COLUMNS = ("s.id, s.org_id, s.protocol, s.host, s.port, s.poll_interval_seconds, s.config,"
                " s.secrets, s.version, m.machine_identifier, s.protocol_status")


async def for_polling(conn, ids: list[uuid.UUID]) -> list[asyncpg.Record]:
    """machine_identifier is None for a source without a machine (mqtt)."""
    return await conn.fetch(
        f"SELECT {POLL_COLUMNS} FROM ingest_sources s LEFT JOIN machines m ON m.id = s.machine_id"
        " WHERE s.id = ANY($1::uuid[])", ids)


async def certificate_pin(pool, source_id: uuid.UUID) -> str | None:
    """The OPC-UA server certificate recorded for the source (trust on first use)."""
    return await pool.fetchval(
        "SELECT server_cert_sha256 FROM ingest_sources WHERE id = $1", source_id)


async def record_certificate(pool, source_id: uuid.UUID, sha256_hex: str) -> None:
    await pool.execute(
        "UPDATE ingest_sources SET server_cert_sha256 = $2 WHERE id = $1"
        " AND server_cert_sha256 IS NULL", source_id, sha256_hex)


def to_wire(row: asyncpg.Record) -> Source:
    """The API shape of a source; secrets are reported as set/not set only."""
    config = public_config(row)
    if "password" in SECRET_FIELDS[row["protocol"]]:
        config["password_set"] = row["secrets"] is not None
    return Source(
        id=row["id"], machine_id=row["machine_id"], name=row["name"], protocol=row["protocol"],
        host=row["host"], port=row["port"], poll_interval_seconds=row["poll_interval_seconds"],
        is_active=row["is_active"], config=config, created_at=row["created_at"],
        updated_at=row["updated_at"],
        status=SourceStatus(
            last_poll_at=row["last_poll_at"], last_success_at=row["last_success_at"],
            last_error=row["last_error"], last_error_at=row["last_error_at"],
            readings_written=row["readings_written"], points_failed=row["points_failed"],
            polls_missed=row["polls_missed"], polled_by=row["lease_owner"],
            server_certificate_sha256=row["server_cert_sha256"],
            mqtt=mqtt_status(row["protocol_status"]) if row["protocol"] == "mqtt" else None))


def mqtt_status(stored: str | None) -> MqttStatus:
    """An MQTT source's protocol_status (written by its poller), or the
    status of one no poller has run yet."""
    if stored:
        return msgspec.json.decode(stored, type=MqttStatus)
    return MqttStatus(connected=False, messages=0, discarded=0, rebirths_requested=0,
                      skipped={}, nodes=[], nodes_total=0)


async def _check_machine(conn, org: uuid.UUID, machine_id: uuid.UUID | None,
                         protocol: str) -> None:
    if machine_id is None:
        if protocol not in MACHINE_OPTIONAL:
            raise Unprocessable(f"machine_id: required for protocol {protocol!r} (only mqtt "
                                "sources may leave it out)")
        return
    if not await conn.fetchval("SELECT 1 FROM machines WHERE org_id = $1 AND id = $2", org, machine_id):
        raise Unprocessable(f"machine_id: no machine {machine_id} in your organization; "
                            "create it with POST /api/v1/machines")


async def create(conn, org: uuid.UUID, body: SourceCreate, box: SecretBox,
                 policy: AddressPolicy) -> Source:
    check_config(body.protocol, body.config)
    check_target(policy, body.host, body.port)
    await _check_machine(conn, org, body.machine_id, body.protocol)
    public, secret = split_secrets(body.protocol, body.config)
    sid = uuid.uuid4()
    sealed = box.seal(secret, sid.bytes) if secret else None
    row = await conn.fetchrow(
        f"INSERT INTO ingest_sources (id, org_id, machine_id, name, protocol, host, port,"
        f" poll_interval_seconds, is_active, config, secrets)"
        f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11) RETURNING {COLUMNS}",
        sid, org, body.machine_id, body.name, body.protocol, body.host, body.port,
        body.poll_interval_seconds, body.is_active, json.dumps(public), sealed)
    return to_wire(row)


async def get_row(conn, org: uuid.UUID, source_id: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM ingest_sources WHERE org_id = $1 AND id = $2", org, source_id)
    if row is None:
        raise NotFound(f"no ingest source {source_id} in your organization")
    return row


async def list_all(conn, org: uuid.UUID) -> list[Source]:
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM ingest_sources WHERE org_id = $1 ORDER BY created_at, id", org)
    return [to_wire(r) for r in rows]


async def patch(conn, org: uuid.UUID, source_id: uuid.UUID, body: SourcePatch, box: SecretBox,
                policy: AddressPolicy) -> Source:
    async with conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {COLUMNS} FROM ingest_sources WHERE org_id = $1 AND id = $2 FOR UPDATE",
            org, source_id)
        if row is None:
            raise NotFound(f"no ingest source {source_id} in your organization")
        protocol = row["protocol"]
        old_public = public_config(row)
        old_secret = box.open(row["secrets"], source_id.bytes)
        config = body.config if body.config is not UNSET else {**old_public, **old_secret}
        if body.config is not UNSET:
            # A secret left out of a new config keeps its stored value (it is
            # never returned, so clients cannot echo it back); null clears it.
            for k in SECRET_FIELDS[protocol]:
                if k not in config and k in old_secret:
                    config = {**config, k: old_secret[k]}
        check_config(protocol, config)
        host = row["host"] if body.host is UNSET else body.host
        port = row["port"] if body.port is UNSET else body.port
        if body.host is not UNSET or body.port is not UNSET:
            check_target(policy, host, port)
        machine_id = row["machine_id"] if body.machine_id is UNSET else body.machine_id
        if body.machine_id is not UNSET:
            await _check_machine(conn, org, machine_id, protocol)
        public, secret = split_secrets(protocol, config)
        sealed = box.seal(secret, source_id.bytes) if secret else None
        new = await conn.fetchrow(
            f"UPDATE ingest_sources SET machine_id = $3, name = $4, host = $5, port = $6,"
            f" poll_interval_seconds = $7, is_active = $8, config = $9::jsonb, secrets = $10,"
            f" version = version + 1, updated_at = now(),"
            f" server_cert_sha256 = CASE WHEN host = $5 AND port = $6 THEN server_cert_sha256 END"
            f" WHERE org_id = $1 AND id = $2 RETURNING {COLUMNS}",
            org, source_id, machine_id,
            row["name"] if body.name is UNSET else body.name, host, port,
            row["poll_interval_seconds"] if body.poll_interval_seconds is UNSET
            else body.poll_interval_seconds,
            row["is_active"] if body.is_active is UNSET else body.is_active,
            json.dumps(public), sealed)
    return to_wire(new)


async def delete(conn, org: uuid.UUID, source_id: uuid.UUID) -> None:
    status = await conn.execute("DELETE FROM ingest_sources WHERE org_id = $1 AND id = $2",
                                org, source_id)
    if status == "DELETE 0":
        raise NotFound(f"no ingest source {source_id} in your organization")
