"""MQTT sources, the side that talks to the broker (no database): one
connection (gmqtt, MQTT 5), TLS verified by a CA or a pinned certificate,
subscriptions, and ``Subscriber``, which keeps a source subscribed for as
long as it runs. ``server/mqtt_ingest.py`` turns what it hears into
readings; ``MqttProbe`` is test-connection's reader.

Why gmqtt (README "MQTT and Sparkplug B"): it acknowledges a QoS 1 message
only when our handler's coroutine returns (``optimistic_acknowledgement=
False``), so a message is acknowledged after its readings are committed,
with a public API; aiomqtt has no manual acknowledgement (its issue #345).
It also took a fifth of aiomqtt's (paho's) CPU per message here: about
20 µs against 100 µs for 2.6 kB messages on uvloop. What we change: gmqtt
reconnects by itself, with a fixed delay, on the same client; ``_Client``
turns that off and ``Subscriber`` makes a new client per connection, with
exponential backoff and jitter, subscribes again and lets its owner publish
what a new session needs (a Sparkplug STATE birth).

A connection is made to the address the address policy checked (never a
fresh resolution of the name); TLS still verifies, and sends as SNI, the
source's host name (``_Context``).
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import uuid
from typing import Awaitable, Callable

import gmqtt
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.mqtt.handler import MQTTConnectError

from ..core.errors import ReaderError
from .base import ReadResult
from .mqtt_config import MqttConfig, MqttTls, subscriptions
from .schedule import BACKOFF_BASE, BACKOFF_MAX

KEEPALIVE = 10            # s: a silent broker is noticed within 2x this (gmqtt closes then)
# Unacknowledged QoS 1 messages the broker may have in flight to us (MQTT 5
# Receive Maximum). Messages wait for a commit before they are acknowledged;
# past HURRY of them waiting, the owner commits early (server/mqtt_ingest.py).
RECEIVE_MAXIMUM = 1000
SESSION_EXPIRY = 7 * 86400  # s a persistent session (json format) outlives its connection
# A session that lasted this long (s) resets the reconnect backoff; a
# shorter one (a commit that failed, a broker that accepts then drops us)
# keeps it growing.
STABLE = 30.0
SUBACK_FAILURES = {0x80: "unspecified error", 0x83: "implementation specific error",
                   0x87: "not authorized", 0x8F: "topic filter invalid",
                   0x91: "packet identifier in use", 0x97: "quota exceeded",
                   0x9E: "shared subscriptions not supported",
                   0xA1: "subscription identifiers not supported",
                   0xA2: "wildcard subscriptions not supported"}


# ------------------------------------------------------------------ TLS

class _PinnedObject(ssl.SSLObject):
    """Checks the pinned certificate as the handshake completes: before
    CONNECT (and the password) is sent."""

    def do_handshake(self) -> None:
        super().do_handshake()
        pin = self.context.pin
        der = self.getpeercert(binary_form=True) or b""
        got = hashlib.sha256(der).hexdigest()
        if got != pin:
            err = ssl.SSLCertVerificationError(
                f"the broker's certificate has SHA-256 {got}, but the source pins {pin}")
            err.verify_message = err.args[0]
            raise err


class _Context(ssl.SSLContext):
    """An SSLContext that verifies and sends as SNI ``server_name`` whatever
    address the connection was made to."""
    server_name: str | None = None
    pin: str | None = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None,
                 session=None):
        return super().wrap_bio(incoming, outgoing, server_side,
                                self.server_name or server_hostname, session)


def tls_context(tls: MqttTls, host: str) -> ssl.SSLContext:
    ctx = _Context(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_certificate is not None:
        ctx.load_verify_locations(cadata=tls.ca_certificate)
    elif tls.server_certificate_sha256 is not None:
        ctx.check_hostname = False  # the pin alone decides (a self-signed broker)
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_default_certs()
    ctx.server_name = tls.server_name or host.strip("[]")
    if tls.server_certificate_sha256 is not None:
        ctx.pin = tls.server_certificate_sha256.lower()
        ctx.sslobject_class = _PinnedObject
    return ctx


# ------------------------------------------------------------------ one connection

class _Client(gmqtt.Client):
    """gmqtt's client without its own reconnects: it calls ``reconnect``
    when the connection is lost (and after some refusals); ``Subscriber``
    decides what happens then, on a new client."""

    async def reconnect(self, delay: bool = False) -> None:
        return None


def _refused(exc: MQTTConnectError) -> str:
    text = exc.message.removeprefix("Connection Refused: ")
    text = text[:1].lower() + text[1:]
    low = text.lower()
    if "password" in low or "authori" in low:
        # mosquitto answers a wrong password with "not authorized" as well
        text += " - check the source's username and password (and the broker's ACL)"
    return f"the broker refused the connection: {text}"


def new_client(cfg: MqttConfig, *, client_id: str, clean_start: bool,
               will: gmqtt.Message | None = None, on_message=None,
               on_disconnect=None) -> gmqtt.Client:
    """A client, not connected yet. ``on_message(client, topic, payload, qos,
    properties)`` is a coroutine function; a QoS 1 message is acknowledged
    when it returns. It may be called before ``connect`` returns: a
    persistent session's queued messages follow the CONNACK at once."""
    client = _Client(client_id, clean_session=clean_start, optimistic_acknowledgement=False,
                     will_message=will, receive_maximum=RECEIVE_MAXIMUM,
                     session_expiry_interval=0 if clean_start else SESSION_EXPIRY)
    if on_message is not None:
        client.on_message = on_message
    if on_disconnect is not None:
        client.on_disconnect = on_disconnect
    if cfg.username is not None:
        client.set_auth_credentials(cfg.username, cfg.password)
    return client


async def connect(client: gmqtt.Client, address: str, port: int, cfg: MqttConfig,
                  server_name: str) -> None:
    """Connect ``client`` (CONNACK received); ReaderError with a sentence a
    person can act on otherwise (and the client closed)."""
    ctx = tls_context(cfg.tls, server_name) if cfg.tls is not None else False
    where = f"{address}:{port}"
    try:
        async with asyncio.timeout(cfg.timeout_seconds):
            await client.connect(address, port, ssl=ctx, keepalive=KEEPALIVE, version=MQTTv50)
    except BaseException as exc:
        await close_client(client)
        if isinstance(exc, MQTTConnectError):
            raise ReaderError(_refused(exc)) from None
        if isinstance(exc, TimeoutError):
            hint = "" if cfg.tls is not None else " (if that is a TLS port, set \"tls\")"
            raise ReaderError(f"no CONNACK from {where} within {cfg.timeout_seconds:g} s{hint}"
                              ) from None
        if isinstance(exc, ConnectionRefusedError):
            raise ReaderError(f"connection refused by {where} - is the broker running and "
                              "listening there?") from None
        if isinstance(exc, ssl.SSLCertVerificationError):
            why = getattr(exc, "verify_message", None) or str(exc)
            raise ReaderError(f"TLS: the certificate of {where} was not accepted: {why}") from None
        if isinstance(exc, ssl.SSLError):
            raise ReaderError(f"TLS handshake with {where} failed ({exc.reason or exc}) - is "
                              "that the broker's TLS port?") from None
        if isinstance(exc, ConnectionResetError) and cfg.tls is not None:
            raise ReaderError(f"{where} closed the connection during the TLS handshake - is "
                              "that the broker's TLS port?") from None
        if isinstance(exc, OSError):
            raise ReaderError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        if isinstance(exc, Exception):  # a library's surprise is still this source's failure
            raise ReaderError(f"cannot connect to {where}: {exc!r}") from None
        raise


async def close_client(client: gmqtt.Client, reason_code: int = 0) -> None:
    """DISCONNECT (reason 0: the will is not sent; 4: it is) and close; never raises."""
    try:
        await asyncio.wait_for(client.disconnect(reason_code=reason_code), 2)
    except Exception:  # noqa: BLE001 - closing a connection that may be half open or gone
        pass


async def subscribe(client: gmqtt.Client, filters: list[str], qos: int, timeout: float) -> None:
    """Subscribe and wait for the SUBACK; ReaderError names a refused filter."""
    fut = asyncio.get_running_loop().create_future()
    want: list[int] = []

    def on_subscribe(c, mid, codes, properties):
        if want and mid == want[0] and not fut.done():
            fut.set_result(codes)
    client.on_subscribe = on_subscribe
    want.append(client.subscribe([gmqtt.Subscription(t, qos=qos) for t in filters]))
    try:
        async with asyncio.timeout(timeout):
            codes = await fut
    except TimeoutError:
        raise ReaderError(f"no SUBACK within {timeout:g} s") from None
    for topic, code in zip(filters, codes):
        if code >= 0x80:
            why = SUBACK_FAILURES.get(code, f"reason code 0x{code:02X}")
            raise ReaderError(f"the broker refused the subscription to {topic!r}: {why}")


# ------------------------------------------------------------------ test-connection

class MqttProbe:
    """test-connection (and nothing else): connect, subscribe to the source's
    topic filters, disconnect. Its own client id and a clean session, so a
    json source's persistent session is not taken over or ended, and no
    will or STATE: a probe is not the primary host."""

    def __init__(self, address: str, port: int, config: MqttConfig, server_name: str) -> None:
        self.address, self.port, self.config, self.server_name = address, port, config, server_name
        self.client: gmqtt.Client | None = None

    async def connect(self) -> None:
        client = new_client(self.config, client_id=f"haltless-probe-{uuid.uuid4().hex[:8]}",
                            clean_start=True)
        await connect(client, self.address, self.port, self.config, self.server_name)
        self.client = client

    async def read(self) -> ReadResult:
        await subscribe(self.client, subscriptions(self.config), self.config.qos,
                        self.config.timeout_seconds)
        return ReadResult([], [])

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await close_client(client)


# ------------------------------------------------------------------ a source, subscribed

class Subscriber:
    """Keeps one source subscribed while ``run()`` runs: connect, subscribe,
    ``on_connected(client)`` (publish what a new session needs), hand each
    message to ``on_message``, and when the connection ends reconnect: at
    once after a session that lasted, else after an exponential backoff
    with jitter (1 s doubling to 60 s, as a poll loop).

    ``on_message(topic, payload, qos)`` is called in arrival order; for a
    QoS 1 message it returns a future that completes once the message's
    readings are committed (None if there is nothing to wait for), and the
    message is acknowledged then. If it fails the connection is dropped
    first, so the broker redelivers the message on the next session.
    ``address()`` gives the address to connect to (the address policy's).
    """

    def __init__(self, address: Callable[[], Awaitable[str]], port: int, cfg: MqttConfig, *,
                 server_name: str, client_id: str, clean_start: bool,
                 on_message: Callable[[str, bytes, int], asyncio.Future | None],
                 on_connected: Callable[[gmqtt.Client], Awaitable[None]],
                 on_lost: Callable[[], None], on_error: Callable[[str], None],
                 will: Callable[[], gmqtt.Message | None] = lambda: None) -> None:
        self.address, self.port, self.cfg = address, port, cfg
        self.server_name, self.client_id, self.clean_start = server_name, client_id, clean_start
        self.on_message, self.on_connected = on_message, on_connected
        self.on_lost, self.on_error, self.will = on_lost, on_error, will
        self.client: gmqtt.Client | None = None
        self.failures = 0
        self._lost = asyncio.Event()
        self._dropping: asyncio.Task | None = None
        # Handlers of QoS 1 messages waiting for their commit: task -> waiter.
        self._acking: dict[asyncio.Task, asyncio.Future] = {}

    async def run(self) -> None:
        """Until cancelled. A cancel leaves a connected client open, for the
        owner to finish (acknowledge, say goodbye) and ``close()``."""
        while True:
            try:
                await self._connect()
            except Exception as exc:  # noqa: BLE001 - every failure to connect is retried
                self.failures += 1
                self.on_error(f"connect: {exc}" if isinstance(exc, ReaderError)
                              else f"connect: unexpected {exc!r}")
                await asyncio.sleep(self._backoff())
                continue
            up_since = asyncio.get_running_loop().time()
            await self._lost.wait()
            self.client = None
            self.on_lost()
            if asyncio.get_running_loop().time() - up_since >= STABLE:
                self.failures = 0
            await asyncio.sleep(self._backoff() if self.failures else 0.2 * random.random())

    def _backoff(self) -> float:
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** max(0, self.failures - 1))
        return delay * random.uniform(0.5, 1.0)

    async def _connect(self) -> None:
        address = await self.address()
        lost = self._lost = asyncio.Event()
        # Current before it connects: the session's queued messages (json)
        # come right after the CONNACK, and must be handled, not dropped.
        client = self.client = new_client(
            self.cfg, client_id=self.client_id, clean_start=self.clean_start, will=self.will(),
            on_message=self._message, on_disconnect=lambda c, packet, exc=None: lost.set())
        try:
            await connect(client, address, self.port, self.cfg, self.server_name)
            await subscribe(client, subscriptions(self.cfg), self.cfg.qos, self.cfg.timeout_seconds)
            await self.on_connected(client)
            if lost.is_set():  # lost between CONNACK and here
                raise ReaderError("the broker closed the connection right after accepting it")
        except BaseException:
            self.client = None
            await close_client(client)
            raise

    async def _message(self, client, topic, payload, qos, properties) -> int:
        if client is not self.client:
            return 0  # a closed connection's last packets
        waiter = self.on_message(topic, payload, qos)
        if waiter is not None and qos > 0:
            task = asyncio.current_task()
            self._acking[task] = waiter
            try:
                await waiter
            except Exception:  # noqa: BLE001 - not committed: not acknowledged
                await self.drop()
            finally:
                self._acking.pop(task, None)
        return 0  # PUBACK "success" (on a dropped connection it goes nowhere)

    async def settle(self, timeout: float = 1.0) -> None:
        """Let the messages whose commit is done be acknowledged (their
        handlers return, and gmqtt sends the PUBACK as each one ends)."""
        ready = [t for t, w in self._acking.items() if w.done()]
        if ready:
            await asyncio.wait(ready, timeout=timeout)

    async def drop(self) -> None:
        """Close the connection now, without acknowledging what is pending
        (the broker redelivers it to the next session) and with our will."""
        client = self.client
        if client is None:
            return
        if self._dropping is None or self._dropping.done():
            self.failures += 1  # reconnect after a backoff, not at once
            self._dropping = asyncio.ensure_future(close_client(client, reason_code=4))
        await asyncio.shield(self._dropping)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Publish on the current connection; False when there is none."""
        client = self.client
        if client is None or not client.is_connected:
            return False
        client.publish(topic, payload, qos=qos, retain=retain)
        return True

    async def close(self, goodbye: Callable[[gmqtt.Client], None] | None = None) -> None:
        """End the session cleanly: ``goodbye(client)`` (publish what the
        session's end needs), then DISCONNECT."""
        client, self.client = self.client, None
        if client is None:
            return
        if goodbye is not None and client.is_connected:
            try:
                goodbye(client)
            except Exception:  # noqa: BLE001 - the connection may be going away already
                pass
        await close_client(client)
