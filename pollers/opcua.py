"""OPC-UA reader: polls the Value attribute of configured nodes with asyncua.

With security_mode "Sign"/"SignAndEncrypt" the channel uses Basic256Sha256 and
a client certificate kept in ``pki_dir``. The server's certificate must match a
pinned SHA-256 fingerprint, or else is trusted on first use via a TrustStore.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import math
import socket
import threading
from pathlib import Path
from typing import NamedTuple

from asyncua import Client, ua
from asyncua.crypto import cert_gen, security_policies, uacrypto
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..core.errors import ReaderError
from .base import PointError, ReadResult, Sample, utcnow
from .opcua_config import (OpcuaConfig, endpoint_url, node_id_parts, parse_endpoint, raw_tag,
                           validate_opcua_config)
from .trust import TrustStore, write_atomic


def parse_node_id(text: str) -> ua.NodeId:
    """The asyncua NodeId of a configured node id (``node_id_parts`` checks it)."""
    ns, kind, ident = node_id_parts(text)
    if kind == "i":
        return ua.NodeId(ident, ns)
    return ua.NodeId(ident, ns, _NODE_ID_TYPES[kind])


_NODE_ID_TYPES = {"s": ua.NodeIdType.String, "g": ua.NodeIdType.Guid, "b": ua.NodeIdType.ByteString}


class ClientCertificate(NamedTuple):
    cert_path: Path
    key_path: Path
    application_uri: str
    sha256: str  # what a server admin compares before trusting the certificate


_CERT_LOCK = threading.Lock()


def ensure_client_certificate(pki_dir: Path) -> ClientCertificate:
    """Load client_cert.der / client_key.pem from pki_dir, generating them on first use
    (blocking: call via asyncio.to_thread). A server administrator trusts the certificate
    once, so it is kept, and valid for 10 years so it does not silently expire in the field."""
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
            write_atomic(key_path, cert_gen.dump_private_key_as_pem(key), 0o600)
            write_atomic(cert_path, cert.public_bytes(Encoding.DER), 0o644)
        der = cert_path.read_bytes()
    # The session must announce the ApplicationUri that is in the certificate,
    # even if the hostname changed since it was generated.
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return ClientCertificate(cert_path, key_path, uris[0] if uris else "", hashlib.sha256(der).hexdigest())


_UTC = _dt.timezone.utc
_MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}
_NO_TIME = _dt.datetime(1601, 1, 2, tzinfo=_UTC)  # servers send the 1601 epoch for "no timestamp"
_POINT_HINTS = {"BadNodeIdUnknown": "does not exist on the server", "BadNotReadable": "is not readable",
                "BadAttributeIdInvalid": "has no value (is it a variable?)"}
_IDENTITY_ERRORS = {"BadUserAccessDenied", "BadIdentityTokenInvalid", "BadIdentityTokenRejected"}


READ_CHUNK = 250


class OpcuaReader:
    """One session with one OPC-UA server, reading the configured nodes' values."""

    def __init__(self, endpoint: str, config: OpcuaConfig, *, pki_dir: Path, trust_store: TrustStore) -> None:
        validate_opcua_config(config)
        self._host, self._port = parse_endpoint(endpoint)
        self._url, self._where = endpoint.strip(), f"{self._host}:{self._port}"
        self._trust_key = endpoint_url(self._host.lower(), self._port)  # a server has one certificate
        self._cfg, self._pki_dir, self._trust_store = config, Path(pki_dir), trust_store
        self._points = [(n.node_id, raw_tag(n.node_id), n.metric_name, n.unit) for n in config.nodes]
        self._read_ids = [
            ua.ReadValueId(NodeId=parse_node_id(n.node_id), AttributeId=ua.AttributeIds.Value) for n in config.nodes
        ]
        self._batches: list[ua.ReadParameters] = []
        self._client: Client | None = None
        self.max_nodes_per_read = 0  # the server's limit, read at connect; 0 = none

    async def connect(self) -> None:
        await self.close()
        cfg = self._cfg
        # Our polls notice a dead connection anyway, so the supervisor's
        # keep-alive probe only has to keep the session from expiring.
        client = Client(self._url, timeout=cfg.timeout_seconds, watchdog_intervall=max(10.0, cfg.timeout_seconds))
        # Sessions orphaned by a dropped link hold one of the few session slots
        # an embedded server has until they time out: 2 min, not asyncua's 1 h.
        client.session_timeout = 120_000
        client.name = client.description = "haltless OPC-UA reader"
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
            limit_id = ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)
            params = ua.ReadParameters(NodesToRead=[ua.ReadValueId(limit_id, ua.AttributeIds.Value)])
            [dv] = await client.uaclient.read(params)
            limit = dv.Value.Value if dv.Value is not None and (dv.StatusCode is None or dv.StatusCode.is_good()) else 0
            self.max_nodes_per_read = limit if isinstance(limit, int) and limit > 0 else 0  # 0/missing: no limit
        except BaseException as exc:
            if connected:
                await _disconnect_quietly(client, cfg.timeout_seconds)
            else:
                client.disconnect_socket()  # e.g. cancelled mid-handshake
            if isinstance(exc, Exception) and not isinstance(exc, ReaderError):
                raise self._connect_error(exc, ccert) from exc
            raise
        # At most READ_CHUNK nodes per request even when the server allows more:
        # decoding a response is pure Python, and a 1,000-node one holds the
        # event loop ~20 ms, delaying every other source's poll (bench/pollers).
        size = min(self.max_nodes_per_read or READ_CHUNK, READ_CHUNK)
        self._batches = [
            ua.ReadParameters(TimestampsToReturn=ua.TimestampsToReturn.Source, NodesToRead=self._read_ids[i:i + size])
            for i in range(0, len(self._read_ids), size)
        ]
        self._client = client

    async def _server_certificate(self, client: Client) -> bytes:
        # Fetched here rather than inside set_security so that a missing mode
        # can be reported together with what the server does offer.
        endpoints = await client.connect_and_get_server_endpoints()
        mode, uri = _MODES[self._cfg.security_mode], security_policies.SecurityPolicyBasic256Sha256.URI
        for ep in endpoints:
            if ep.SecurityMode == mode and ep.SecurityPolicyUri == uri and ep.ServerCertificate:
                return uacrypto.der_from_x509(uacrypto.x509_from_der(ep.ServerCertificate))  # drop any chain
        offered = sorted({f"{e.SecurityPolicyUri.rpartition('#')[2]}/{e.SecurityMode.name.rstrip('_')}"
                          for e in endpoints})
        raise ReaderError(f"the OPC-UA server at {self._where} does not offer security mode "
                          f"{self._cfg.security_mode} with policy Basic256Sha256; it offers: "
                          f"{', '.join(offered) or 'nothing'}")

    def _check_server_certificate(self, fingerprint: str, known: str | None) -> None:
        pin = self._cfg.server_certificate_sha256
        accept = f"if this change is expected, accept it by setting server_certificate_sha256 to {fingerprint}"
        if pin is not None and fingerprint != pin.lower():
            raise ReaderError(f"the certificate of the OPC-UA server at {self._where} does not match the pinned "
                              f"fingerprint: pinned SHA-256 {pin.lower()}, server presents {fingerprint}; {accept}")
        if pin is None and known is not None and fingerprint != known:
            raise ReaderError(
                f"the certificate of the OPC-UA server at {self._where} changed since it was first trusted: "
                f"recorded SHA-256 {known}, server now presents {fingerprint}. This happens when the server "
                f"is reinstalled or its certificate renewed - or when another machine impersonates it; {accept}")

    def _connect_error(self, exc: Exception, ccert: ClientCertificate | None) -> ReaderError:
        cfg, where = self._cfg, self._where
        if isinstance(exc, ConnectionRefusedError):
            return ReaderError(f"connection refused by {where} - is the OPC-UA server running?")
        if isinstance(exc, TimeoutError):
            return ReaderError(f"no answer from {where} within {cfg.timeout_seconds:g}s - is this the address "
                               "of an OPC-UA server, and is it reachable?")
        if isinstance(exc, OSError):
            return ReaderError(f"cannot connect to {where}: {exc.strerror or exc}")
        if not isinstance(exc, ua.UaStatusCodeError):
            return ReaderError(f"connecting to the OPC-UA server at {where} failed: {type(exc).__name__}: {exc}")
        name = ua.StatusCode(exc.code).name
        if name in _IDENTITY_ERRORS and cfg.username is not None:
            return ReaderError(f"the server rejected user {cfg.username!r}: wrong username or password ({name})")
        if name in _IDENTITY_ERRORS:
            return ReaderError(f"the server at {where} does not allow anonymous access ({name}); "
                               "set username and password")
        if ccert is not None and (name.startswith("BadCertificate") or name == "BadSecurityChecksFailed"):
            return ReaderError(f"the server at {where} rejected our client certificate ({name}): the client "
                               f"certificate must be trusted on the server - it is {ccert.cert_path} "
                               f"(SHA-256 {ccert.sha256})")
        if name in ("BadSecurityPolicyRejected", "BadSecurityModeRejected"):
            return ReaderError(f"the server at {where} rejected security mode {cfg.security_mode} with policy "
                               f"{cfg.security_policy} ({name})")
        return ReaderError(f"the OPC-UA server at {where} refused the connection: {name}")

    async def read(self) -> ReadResult:
        client = self._client
        if client is None:
            raise ReaderError(f"not connected to {self._where}")
        poll_time = utcnow()
        samples: list[Sample] = []
        errors: list[PointError] = []
        points = iter(self._points)
        # One batch after another: not every server takes several requests in flight per session.
        for params in self._batches:
            try:
                results = await client.uaclient.read(params)
            except Exception as exc:
                raise self._read_error(exc) from exc
            if len(results) != len(params.NodesToRead):
                raise ReaderError(f"the server at {self._where} answered {len(results)} values "
                                  f"for {len(params.NodesToRead)} nodes")
            for dv, (node_id, tag, metric, unit) in zip(results, points):
                status = dv.StatusCode
                if status is not None and status.value & 0xC0000000:  # Good = top two bits clear
                    hint = _POINT_HINTS.get(name := status.name)
                    msg = f"node {node_id} {hint} ({name})" if hint else f"the server reported status {name}, not Good"
                    errors.append(PointError(tag, metric, msg))
                    continue
                variant = dv.Value
                value = variant.Value if variant is not None else None
                if not isinstance(value, (int, float)):  # bool is an int: True -> 1.0
                    type_name = "Null" if variant is None else variant.VariantType.name + "[]" * variant.is_array
                    errors.append(PointError(tag, metric, f"value of type {type_name} is not numeric"))
                    continue
                number = float(value)
                if not math.isfinite(number):
                    errors.append(PointError(tag, metric, f"value {number} is not a finite number"))
                    continue
                ts = dv.SourceTimestamp
                if ts is not None and ts.tzinfo is not _UTC:
                    ts = ts.replace(tzinfo=_UTC) if ts.tzinfo is None else ts.astimezone(_UTC)
                samples.append(Sample(metric, unit, tag, number, poll_time if ts is None or ts < _NO_TIME else ts))
        return ReadResult(samples, errors)

    def _read_error(self, exc: Exception) -> ReaderError:
        if isinstance(exc, TimeoutError):
            return ReaderError(f"no answer from {self._where} within {self._cfg.timeout_seconds:g}s while reading")
        if isinstance(exc, (ConnectionError, OSError)):
            return ReaderError(f"lost the connection to the OPC-UA server at {self._where} ({exc})")
        if isinstance(exc, ua.UaStatusCodeError):
            return ReaderError(f"the OPC-UA server at {self._where} refused the read: {ua.StatusCode(exc.code).name}")
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
        pass  # the server drops the session with the socket, or when it times out
    finally:
        client.disconnect_socket()
