"""OPC-UA reader: polls the Value attribute of configured nodes with asyncua.

Security: with security_mode "Sign"/"SignAndEncrypt" the channel uses
Basic256Sha256 with a client certificate kept in ``pki_dir``. The server's
certificate is checked against a pinned SHA-256 fingerprint, or else trusted on
first use through a ``TrustStore`` (later connections must present the same one).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as _dt
import hashlib
import json
import math
import os
import re
import socket
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Annotated, Literal, NamedTuple, Protocol
from urllib.parse import urlsplit

import msgspec
from asyncua import Client, ua
from asyncua.crypto import cert_gen, security_policies, uacrypto
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from msgspec import Meta

from pollers.base import PointError, ReaderError, ReadResult, Sample, utcnow

__all__ = [
    "ClientCertificate", "FileTrustStore", "OpcuaConfig", "OpcuaNode", "OpcuaReader", "TrustStore",
    "endpoint_url", "ensure_client_certificate", "parse_endpoint", "parse_node_id", "raw_tag",
    "validate_opcua_config",
]


class OpcuaNode(msgspec.Struct, forbid_unknown_fields=True):
    node_id: Annotated[str, Meta(min_length=1, max_length=512)]
    metric_name: Annotated[str, Meta(min_length=1, max_length=200)]
    unit: Annotated[str, Meta(max_length=64)] | None = None


class OpcuaConfig(msgspec.Struct, forbid_unknown_fields=True):
    nodes: Annotated[list[OpcuaNode], Meta(min_length=1, max_length=20000)]
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    security_policy: Literal["Basic256Sha256"] = "Basic256Sha256"
    username: Annotated[str, Meta(max_length=256)] | None = None
    password: Annotated[str, Meta(max_length=256)] | None = None
    # hex SHA-256 of the server certificate (DER); None = trust on first use
    server_certificate_sha256: str | None = None
    timeout_seconds: Annotated[float, Meta(gt=0, le=60)] = 5.0


# ---------------------------------------------------------------- node ids

_NODE_ID_HELP = "use ns=<n>;i=<number>, ns=<n>;s=<string>, ns=<n>;g=<guid>, or ns=<n>;b=<base64>"
_NODE_ID_RE = re.compile(r"(?:ns=([0-9]{1,5});)?([isgb])=(.+)", re.DOTALL)
_GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_node_id(text: str) -> ua.NodeId:
    """Parse one of the four node id formats; ``ns=<n>;`` may be left out (ns=0).

    Stricter than ``ua.NodeId.from_string``, which silently accepts a bad
    base64 identifier as raw bytes and so would read some other node.
    """
    m = _NODE_ID_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a node id; {_NODE_ID_HELP}")
    ns = int(m.group(1) or 0)
    kind, ident = m.group(2), m.group(3)
    if ns > 65535:
        raise ValueError(f"{text!r}: namespace index {ns} is out of range (0-65535)")
    if kind == "i":
        if not re.fullmatch(r"[0-9]{1,10}", ident) or int(ident) > 0xFFFFFFFF:
            raise ValueError(f"{text!r}: a numeric identifier must be a whole number 0-4294967295")
        return ua.NodeId(int(ident), ns)
    if kind == "s":
        return ua.NodeId(ident, ns, ua.NodeIdType.String)
    if kind == "g":
        if not _GUID_RE.fullmatch(ident):
            raise ValueError(f"{text!r}: a GUID identifier looks like 09087e75-8e5e-499b-954f-f2a9603db28a")
        return ua.NodeId(uuid.UUID(ident), ns, ua.NodeIdType.Guid)
    try:
        raw = base64.b64decode(ident, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    # only canonical base64 round-trips; this also keeps raw_tag() collision-free
    if not raw or base64.b64encode(raw).decode("ascii") != ident:
        raise ValueError(f"{text!r}: an opaque identifier must be non-empty, padded base64 (e.g. M/RbKBsRVkePCePcx24oRA==)")
    return ua.NodeId(raw, ns, ua.NodeIdType.ByteString)


def raw_tag(node_id: str) -> str:
    """The reading's raw_tag for a configured node id: the text as configured,
    with every '=' dropped and every ';' replaced by '_'.

    ``ns=2;i=1001`` -> ``ns2_i1001``, ``ns=2;s=Temperature.Value`` ->
    ``ns2_sTemperature.Value``, ``ns=2;g=0908...b28a`` -> ``ns2_g0908...b28a``,
    ``ns=2;b=M/RbKBsRVkePCePcx24oRA==`` -> ``ns2_bM/RbKBsRVkePCePcx24oRA``,
    ``i=85`` -> ``i85`` (no ns is added). Base64 padding is implied by length,
    so dropping it loses nothing; only string ids that themselves contain '='
    or ';' can collide (``s=a=b`` and ``s=ab``).
    """
    return node_id.replace("=", "").replace(";", "_")


def validate_opcua_config(cfg: OpcuaConfig) -> None:
    """Checks msgspec cannot express; raises ValueError naming the field path."""
    for i, node in enumerate(cfg.nodes):
        try:
            parse_node_id(node.node_id)
        except ValueError as exc:
            raise ValueError(f"nodes[{i}].node_id: {exc}") from None
    if cfg.username is not None and cfg.password is None:
        raise ValueError("password: required when username is set")
    if cfg.password is not None and cfg.username is None:
        raise ValueError("username: required when password is set")
    if cfg.username is not None:
        if not cfg.username:
            raise ValueError("username: must not be empty")
        if cfg.security_mode == "None":
            raise ValueError(
                "username: needs security_mode 'Sign' or 'SignAndEncrypt'; with 'None' the password "
                "would travel in clear text over the network"
            )
    pin = cfg.server_certificate_sha256
    if pin is not None:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", pin):
            raise ValueError(
                f"server_certificate_sha256: {pin!r} must be 64 hex characters "
                "(the SHA-256 of the server certificate in DER form)"
            )
        if cfg.security_mode == "None":
            raise ValueError(
                "server_certificate_sha256: a pin only takes effect with security_mode 'Sign' or "
                "'SignAndEncrypt'; with 'None' the server certificate is not used"
            )


# ---------------------------------------------------------------- endpoints

def endpoint_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"opc.tcp://{host}:{port}"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``opc.tcp://host:port[/path]`` -> (host, port)."""
    form = "use opc.tcp://host:port, e.g. opc.tcp://192.168.1.20:4840"
    parts = urlsplit(endpoint.strip())
    if parts.scheme.lower() != "opc.tcp":
        raise ValueError(f"endpoint {endpoint!r} is not an opc.tcp:// URL; {form}")
    if "@" in parts.netloc:
        raise ValueError(f"endpoint {endpoint!r} contains credentials; set username/password in the config instead")
    if parts.query or parts.fragment:
        raise ValueError(f"endpoint {endpoint!r} must not have a query or fragment; {form}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"endpoint {endpoint!r} has an invalid port; {form}") from None
    if not parts.hostname:
        raise ValueError(f"endpoint {endpoint!r} has no host; {form}")
    if port is None or port == 0:
        raise ValueError(f"endpoint {endpoint!r} has no port; {form}")
    return parts.hostname, port


# ---------------------------------------------------------------- server certificate trust

class TrustStore(Protocol):
    async def get(self, endpoint: str) -> str | None: ...

    async def put(self, endpoint: str, sha256_hex: str) -> None: ...


class FileTrustStore:
    """Fingerprints recorded on first use, as a JSON object {endpoint: sha256_hex}.

    Writes replace the file atomically, so a crash never leaves it half-written.
    Two processes writing at once can lose one record; it is re-recorded on that
    reader's next connect.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # not asyncio.Lock: one store may serve several loops

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ReaderError(f"cannot read the server trust store {self.path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ReaderError(f"the server trust store {self.path} is not a JSON object")
        return data

    def _put(self, endpoint: str, sha256_hex: str) -> None:
        with self._lock:
            data = self._load()
            data[endpoint] = sha256_hex
            _write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True).encode(), 0o644)

    async def get(self, endpoint: str) -> str | None:
        # no lock: os.replace makes every read see a whole file
        return (await asyncio.to_thread(self._load)).get(endpoint)

    async def put(self, endpoint: str, sha256_hex: str) -> None:
        await asyncio.to_thread(self._put, endpoint, sha256_hex)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------- client certificate

class ClientCertificate(NamedTuple):
    cert_path: Path
    key_path: Path
    application_uri: str
    sha256: str  # what a server admin compares before trusting it


_CERT_LOCK = threading.Lock()


def ensure_client_certificate(pki_dir: Path) -> ClientCertificate:
    """Load the client certificate from pki_dir, generating it on first use.

    Blocking (RSA key generation); call via asyncio.to_thread. Servers trust a
    certificate once, so it is generated once and then kept; valid 10 years so
    it does not silently expire in the field.
    """
    pki_dir = Path(pki_dir)
    cert_path, key_path = pki_dir / "client_cert.der", pki_dir / "client_key.pem"
    with _CERT_LOCK:
        if not (cert_path.is_file() and key_path.is_file()):
            pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            host = socket.gethostname()
            app_uri = f"urn:haltless:opcua-client:{host}"
            key = cert_gen.generate_private_key()
            cert = cert_gen.generate_self_signed_app_certificate(
                key, f"haltless OPC-UA client@{host}", {},
                [x509.UniformResourceIdentifier(app_uri), x509.DNSName(host)],
                [ExtendedKeyUsageOID.CLIENT_AUTH], days=3650,
            )
            _write_atomic(key_path, cert_gen.dump_private_key_as_pem(key), 0o600)
            _write_atomic(cert_path, cert.public_bytes(Encoding.DER), 0o644)
        der = cert_path.read_bytes()
    cert = x509.load_der_x509_certificate(der)
    # The session's ApplicationUri must equal the one in the certificate, even
    # if the hostname changed since it was generated.
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return ClientCertificate(cert_path, key_path, uris[0] if uris else "", hashlib.sha256(der).hexdigest())


# ---------------------------------------------------------------- the reader

_MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}
_NO_TIME = _dt.datetime(1601, 1, 2, tzinfo=_dt.timezone.utc)  # OPC-UA "no timestamp" is the 1601 epoch
_POINT_HINTS = {
    "BadNodeIdUnknown": "does not exist on the server",
    "BadNodeIdInvalid": "is not a valid node id for this server",
    "BadAttributeIdInvalid": "has no value (is it a variable?)",
    "BadNotReadable": "is not readable",
    "BadUserAccessDenied": "may not be read by this user",
}
_IDENTITY_ERRORS = {"BadUserAccessDenied", "BadIdentityTokenInvalid", "BadIdentityTokenRejected"}


def _status_name(exc: ua.UaStatusCodeError) -> str:
    return ua.StatusCode(exc.code).name


class OpcuaReader:
    """One session to one OPC-UA server, reading the configured nodes' values."""

    def __init__(self, endpoint: str, config: OpcuaConfig, *, pki_dir: Path, trust_store: TrustStore) -> None:
        validate_opcua_config(config)
        self._host, self._port = parse_endpoint(endpoint)
        self._url = endpoint.strip()
        self._where = f"{self._host}:{self._port}"
        self._trust_key = endpoint_url(self._host.lower(), self._port)  # one certificate per server
        self._cfg = config
        self._pki_dir = Path(pki_dir)
        self._trust_store = trust_store
        self._points = [(n.node_id, raw_tag(n.node_id), n.metric_name, n.unit) for n in config.nodes]
        self._read_ids = [
            ua.ReadValueId(NodeId=parse_node_id(n.node_id), AttributeId=ua.AttributeIds.Value)
            for n in config.nodes
        ]
        self._batches: list[ua.ReadParameters] = []
        self._client: Client | None = None
        self.max_nodes_per_read = 0  # as reported by the server after connect; 0 = no limit

    async def connect(self) -> None:
        await self.close()
        cfg = self._cfg
        # The supervisor's keep-alive probe duplicates what our polling already
        # detects; keep it rare so it does not compete with large reads.
        client = Client(self._url, timeout=cfg.timeout_seconds, watchdog_intervall=max(10.0, cfg.timeout_seconds))
        client.name = client.description = "haltless OPC-UA reader"
        client.product_uri = "urn:haltless"
        ccert: ClientCertificate | None = None
        connected = False
        try:
            fingerprint = known = None
            if cfg.security_mode != "None":
                ccert = await asyncio.to_thread(ensure_client_certificate, self._pki_dir)
                client.application_uri = ccert.application_uri
                server_der = await self._server_certificate(client)
                fingerprint = hashlib.sha256(server_der).hexdigest()
                known = await self._trust_store.get(self._trust_key)
                self._check_server_certificate(fingerprint, known)  # before any password is sent
                await client.set_security(
                    security_policies.SecurityPolicyBasic256Sha256, ccert.cert_path, ccert.key_path,
                    server_certificate=server_der, mode=_MODES[cfg.security_mode],
                )
            if cfg.username is not None:
                client.set_user(cfg.username)
                client.set_password(cfg.password or "")
            await client.connect()
            connected = True
            if fingerprint is not None and fingerprint != known:
                await self._trust_store.put(self._trust_key, fingerprint)
            self.max_nodes_per_read = await self._read_max_nodes_per_read(client)
        except BaseException as exc:
            if connected:
                await _disconnect_quietly(client, cfg.timeout_seconds)
            if isinstance(exc, Exception) and not isinstance(exc, ReaderError):
                raise self._connect_error(exc, ccert) from exc
            raise
        size = self.max_nodes_per_read or len(self._read_ids)
        self._batches = [
            ua.ReadParameters(TimestampsToReturn=ua.TimestampsToReturn.Source, NodesToRead=self._read_ids[i : i + size])
            for i in range(0, len(self._read_ids), size)
        ]
        self._client = client

    async def _server_certificate(self, client: Client) -> bytes:
        # Fetched ourselves rather than by set_security so that a missing mode
        # can be reported together with what the server does offer.
        endpoints = await client.connect_and_get_server_endpoints()
        mode, uri = _MODES[self._cfg.security_mode], security_policies.SecurityPolicyBasic256Sha256.URI
        for ep in endpoints:
            if ep.SecurityMode == mode and ep.SecurityPolicyUri == uri and ep.ServerCertificate:
                return uacrypto.der_from_x509(uacrypto.x509_from_der(ep.ServerCertificate))
        offered = sorted({f"{ep.SecurityPolicyUri.rpartition('#')[2]}/{ep.SecurityMode.name.rstrip('_')}" for ep in endpoints})
        raise ReaderError(
            f"the OPC-UA server at {self._where} does not offer security mode {self._cfg.security_mode} with "
            f"policy Basic256Sha256; it offers: {', '.join(offered) or 'nothing'}"
        )

    def _check_server_certificate(self, fingerprint: str, known: str | None) -> None:
        pin = self._cfg.server_certificate_sha256
        accept = f"if this change is expected, accept it by setting server_certificate_sha256 to {fingerprint}"
        if pin is not None:
            if fingerprint != pin.lower():
                raise ReaderError(
                    f"the certificate of the OPC-UA server at {self._where} does not match the pinned "
                    f"fingerprint: pinned SHA-256 {pin.lower()}, server presents {fingerprint}; {accept}"
                )
        elif known is not None and fingerprint != known:
            raise ReaderError(
                f"the certificate of the OPC-UA server at {self._where} changed since it was first trusted: "
                f"recorded SHA-256 {known}, server now presents {fingerprint}. This happens when the server "
                f"is reinstalled or its certificate renewed - or when another machine impersonates it; {accept}"
            )

    async def _read_max_nodes_per_read(self, client: Client) -> int:
        node = ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)
        params = ua.ReadParameters(NodesToRead=[ua.ReadValueId(NodeId=node, AttributeId=ua.AttributeIds.Value)])
        [dv] = await client.uaclient.read(params)
        value = dv.Value.Value if dv.Value is not None else None
        good = dv.StatusCode is None or dv.StatusCode.is_good()
        return value if good and isinstance(value, int) and value > 0 else 0

    def _connect_error(self, exc: Exception, ccert: ClientCertificate | None) -> ReaderError:
        cfg, where = self._cfg, self._where
        if isinstance(exc, ConnectionRefusedError):
            return ReaderError(f"connection refused by {where} - is the OPC-UA server running?")
        if isinstance(exc, TimeoutError):
            return ReaderError(
                f"no answer from {where} within {cfg.timeout_seconds:g}s - is this the address of an "
                "OPC-UA server, and is it reachable?"
            )
        if isinstance(exc, socket.gaierror):
            return ReaderError(f"cannot resolve host {self._host!r}: {exc.strerror}")
        if isinstance(exc, OSError):
            return ReaderError(f"cannot connect to {where}: {exc.strerror or exc}")
        if not isinstance(exc, ua.UaStatusCodeError):
            return ReaderError(f"connecting to the OPC-UA server at {where} failed: {type(exc).__name__}: {exc}")
        name = _status_name(exc)
        if name in _IDENTITY_ERRORS:
            if cfg.username is not None:
                return ReaderError(f"the server rejected user {cfg.username!r}: wrong username or password ({name})")
            return ReaderError(
                f"the server at {where} does not allow anonymous access ({name}); set username and password"
            )
        if ccert is not None and (name.startswith("BadCertificate") or name == "BadSecurityChecksFailed"):
            return ReaderError(
                f"the server at {where} rejected our client certificate ({name}): the client certificate must be "
                f"trusted on the server - it is {ccert.cert_path} (SHA-256 {ccert.sha256})"
            )
        if name in ("BadSecurityPolicyRejected", "BadSecurityModeRejected"):
            return ReaderError(
                f"the server at {where} rejected security mode {cfg.security_mode} with policy "
                f"{cfg.security_policy} ({name})"
            )
        return ReaderError(f"the OPC-UA server at {where} refused the connection: {name}")

    async def read(self) -> ReadResult:
        client = self._client
        if client is None:
            raise ReaderError(f"not connected to {self._where}")
        poll_time = utcnow()
        samples: list[Sample] = []
        errors: list[PointError] = []
        points = iter(self._points)
        # Batches go one after another: not every server accepts several
        # requests in flight on one session.
        for params in self._batches:
            try:
                results = await client.uaclient.read(params)
            except Exception as exc:
                raise self._read_error(exc) from exc
            if len(results) != len(params.NodesToRead):
                raise ReaderError(
                    f"the server at {self._where} answered {len(results)} values for {len(params.NodesToRead)} nodes"
                )
            for dv, (node_id, tag, metric, unit) in zip(results, points):
                status = dv.StatusCode
                if status is not None and status.value & 0xC0000000:  # Good = top two bits clear
                    name = status.name
                    hint = _POINT_HINTS.get(name)
                    msg = f"node {node_id} {hint} ({name})" if hint else f"the server reported status {name}, not Good"
                    errors.append(PointError(tag, metric, msg))
                    continue
                variant = dv.Value
                value = variant.Value if variant is not None else None
                if not isinstance(value, (int, float)):
                    type_name = variant.VariantType.name if variant is not None else "Null"
                    if variant is not None and variant.is_array:
                        type_name += "[]"
                    errors.append(PointError(tag, metric, f"value of type {type_name} is not numeric"))
                    continue
                number = float(value)  # bool -> 1.0 / 0.0
                if not math.isfinite(number):
                    errors.append(PointError(tag, metric, f"value {number} is not a finite number"))
                    continue
                ts = dv.SourceTimestamp
                if ts is None:
                    ts = poll_time
                else:
                    ts = ts.replace(tzinfo=_dt.timezone.utc) if ts.tzinfo is None else ts.astimezone(_dt.timezone.utc)
                    if ts < _NO_TIME:
                        ts = poll_time
                samples.append(Sample(metric, unit, tag, number, ts))
        return ReadResult(samples, errors)

    def _read_error(self, exc: Exception) -> ReaderError:
        if isinstance(exc, TimeoutError):
            return ReaderError(f"no answer from {self._where} within {self._cfg.timeout_seconds:g}s while reading")
        if isinstance(exc, (ConnectionError, OSError)):
            return ReaderError(f"lost the connection to the OPC-UA server at {self._where} ({exc})")
        if isinstance(exc, ua.UaStatusCodeError):
            return ReaderError(f"the OPC-UA server at {self._where} refused the read: {_status_name(exc)}")
        return ReaderError(f"reading from {self._where} failed: {type(exc).__name__}: {exc}")

    async def close(self) -> None:
        client, self._client = self._client, None
        self._batches = []
        if client is not None:
            await _disconnect_quietly(client, self._cfg.timeout_seconds)


async def _disconnect_quietly(client: Client, timeout: float) -> None:
    try:
        await asyncio.wait_for(client.disconnect(), timeout + 1.0)
    except Exception:
        pass  # the session dies with the socket or times out server-side
    finally:
        client.disconnect_socket()
