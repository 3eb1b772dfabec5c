"""One session with one OPC-UA server, as the poll reader (``opcua.py``)
and the subscriber (``opcua_subscription.py``) both open it: the address,
the security mode, the client certificate, the server certificate pinned
or trusted on first use, the user token, and what each failure means in
words a person can act on.

With security_mode "Sign"/"SignAndEncrypt" the channel uses Basic256Sha256
and a client certificate kept in ``pki_dir``. The server's certificate must
match a pinned SHA-256 fingerprint, or else is trusted on first use via a
TrustStore, and is checked before any password is sent.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import socket
import threading
from pathlib import Path
from typing import NamedTuple

from asyncua import Client, ua
from asyncua.crypto import cert_gen, security_policies, uacrypto
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..core.errors import DeviceUnreachable, ReaderError
from .opcua_config import OpcuaConfig, endpoint_url, node_id_parts, parse_endpoint, validate_opcua_config
from .trust import TrustStore, write_atomic

# Sessions orphaned by a dropped link hold one of the few session slots an
# embedded server has until they time out: 2 min, not asyncua's 1 h.
SESSION_TIMEOUT_MS = 120_000


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


_MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}
_IDENTITY_ERRORS = {"BadUserAccessDenied", "BadIdentityTokenInvalid", "BadIdentityTokenRejected"}
# connect() failures that mean nothing answered at the address at all
_NO_ANSWER = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}


class OpcuaEndpoint:
    """Where and how to open a session: ``open()`` returns a connected,
    activated asyncua Client or raises ReaderError (DeviceUnreachable when
    nothing answered at the address)."""

    def __init__(self, endpoint: str, config: OpcuaConfig, *, pki_dir: Path, trust_store: TrustStore,
                 name: str = "haltless OPC-UA reader") -> None:
        validate_opcua_config(config)
        self.host, self.port = parse_endpoint(endpoint)
        self.url, self.where = endpoint.strip(), f"{self.host}:{self.port}"
        self._trust_key = endpoint_url(self.host.lower(), self.port)  # a server has one certificate
        self.cfg, self._pki_dir, self._trust_store = config, Path(pki_dir), trust_store
        self.name = name

    async def open(self) -> Client:
        cfg = self.cfg
        # The reader's polls and the subscriber's publish deadline notice a
        # dead connection anyway, so asyncua's supervisor probe only has to
        # keep the session from expiring.
        client = Client(self.url, timeout=cfg.timeout_seconds, watchdog_intervall=max(10.0, cfg.timeout_seconds))
        client.session_timeout = SESSION_TIMEOUT_MS
        client.name = client.description = self.name
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
        except BaseException as exc:
            if connected:
                await disconnect_quietly(client, cfg.timeout_seconds)
            else:
                client.disconnect_socket()  # e.g. cancelled mid-handshake
            if isinstance(exc, Exception) and not isinstance(exc, ReaderError):
                raise self._connect_error(exc, ccert) from exc
            raise
        return client

    async def _server_certificate(self, client: Client) -> bytes:
        # Fetched here rather than inside set_security so that a missing mode
        # can be reported together with what the server does offer.
        endpoints = await client.connect_and_get_server_endpoints()
        mode, uri = _MODES[self.cfg.security_mode], security_policies.SecurityPolicyBasic256Sha256.URI
        for ep in endpoints:
            if ep.SecurityMode == mode and ep.SecurityPolicyUri == uri and ep.ServerCertificate:
                return uacrypto.der_from_x509(uacrypto.x509_from_der(ep.ServerCertificate))  # drop any chain
        offered = sorted({f"{e.SecurityPolicyUri.rpartition('#')[2]}/{e.SecurityMode.name.rstrip('_')}"
                          for e in endpoints})
        raise ReaderError(f"the OPC-UA server at {self.where} does not offer security mode "
                          f"{self.cfg.security_mode} with policy Basic256Sha256; it offers: "
                          f"{', '.join(offered) or 'nothing'}")

    def _check_server_certificate(self, fingerprint: str, known: str | None) -> None:
        pin = self.cfg.server_certificate_sha256
        accept = f"if this change is expected, accept it by setting server_certificate_sha256 to {fingerprint}"
        if pin is not None and fingerprint != pin.lower():
            raise ReaderError(f"the certificate of the OPC-UA server at {self.where} does not match the pinned "
                              f"fingerprint: pinned SHA-256 {pin.lower()}, server presents {fingerprint}; {accept}")
        if pin is None and known is not None and fingerprint != known:
            raise ReaderError(
                f"the certificate of the OPC-UA server at {self.where} changed since it was first trusted: "
                f"recorded SHA-256 {known}, server now presents {fingerprint}. This happens when the server "
                f"is reinstalled or its certificate renewed - or when another machine impersonates it; {accept}")

    def _connect_error(self, exc: Exception, ccert: ClientCertificate | None) -> ReaderError:
        cfg, where = self.cfg, self.where
        if isinstance(exc, ConnectionRefusedError):
            return DeviceUnreachable(f"connection refused by {where} - is the OPC-UA server running?")
        if isinstance(exc, TimeoutError):
            return ReaderError(f"no answer from {where} within {cfg.timeout_seconds:g}s - is this the address "
                               "of an OPC-UA server, and is it reachable?")
        if isinstance(exc, OSError):
            kind = DeviceUnreachable if exc.errno in _NO_ANSWER else ReaderError
            return kind(f"cannot connect to {where}: {exc.strerror or exc}")
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

    def request_error(self, exc: BaseException, doing: str, request: str) -> ReaderError:
        """What a failed request on an open session means (``doing`` "reading",
        ``request`` "the read")."""
        if isinstance(exc, TimeoutError):
            return ReaderError(f"no answer from {self.where} within {self.cfg.timeout_seconds:g}s while {doing}")
        if isinstance(exc, (ConnectionError, OSError)):
            return ReaderError(f"lost the connection to the OPC-UA server at {self.where} ({exc})")
        if isinstance(exc, ua.UaStatusCodeError):
            return ReaderError(f"the OPC-UA server at {self.where} refused {request}: "
                               f"{ua.StatusCode(exc.code).name}")
        return ReaderError(f"{request} at {self.where} failed: {type(exc).__name__}: {exc}")


async def disconnect_quietly(client: Client, timeout: float) -> None:
    try:
        await asyncio.wait_for(client.disconnect(), timeout + 1.0)
    except Exception:
        pass  # the server drops the session with the socket, or when it times out
    finally:
        client.disconnect_socket()
