"""OPC-UA subscriptions (pollers/opcua_subscription.py) and the loop that
keeps one alive (pollers/subscribe.py), against a real in-process asyncua
server on 127.0.0.1: what arrives, what a deadband keeps, and how each way a
subscription can be lost is repaired - seen from the server's side too.

The servers live in one module-wide event loop (``loop`` fixture, as in
test_opcua_reader); each test drives it with ``loop.run_until_complete``
and waits for what it expects with a deadline, never for a fixed time.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import time
from types import SimpleNamespace

import pytest
from asyncua import Server, ua

from haltless.core.errors import ReaderError
from haltless.pollers import opcua_subscription
from haltless.pollers.base import ReadResult
from haltless.pollers.opcua_config import OpcuaConfig, OpcuaNode, endpoint_url
from haltless.pollers.opcua_subscription import OpcuaSubscription
from haltless.pollers.readers import subscribed
from haltless.pollers.stats import Stats
from haltless.pollers.subscribe import SubscribeLoop
from haltless.pollers.trust import FileTrustStore
from helpers import free_port

UTC = dt.timezone.utc
STEADY = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
NODES = ("Fast", "Noisy", "Ranged", "Plain", "Steady", "Text")


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop

    async def cancel_leftovers():
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    loop.run_until_complete(cancel_leftovers())
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


class Device:
    """An asyncua server with the Sub.* nodes, and what happens to it seen
    from its side: every CreateSession (when), the live subscriptions."""

    def __init__(self, port: int | None = None, refuse_sessions: bool = False) -> None:
        self.port = port or free_port()
        self.endpoint = endpoint_url("127.0.0.1", self.port)
        self.refuse_sessions = refuse_sessions
        self.session_requests: list[float] = []
        self.srv: Server | None = None

    async def start(self) -> "Device":
        srv = Server(user_manager=_Refuser() if self.refuse_sessions else None)
        await srv.init()
        srv.set_endpoint(self.endpoint)
        srv.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        assert await srv.register_namespace("urn:haltless:sub") == 2
        objects = srv.nodes.objects
        for name in NODES[:-1]:
            await objects.add_variable(ua.NodeId(f"Sub.{name}", 2), name, 0.0)
        await objects.add_variable(ua.NodeId("Sub.Text", 2), "Text", "idle")
        ranged = srv.get_node(ua.NodeId("Sub.Ranged", 2))
        await ranged.add_property(0, "EURange", ua.Range(0.0, 200.0))  # 0:EURange, as in Part 8
        await srv.write_attribute_value(ua.NodeId("Sub.Steady", 2), ua.DataValue(
            ua.Variant(42.0), SourceTimestamp=STEADY, ServerTimestamp=STEADY))
        create_session = srv.iserver.create_session

        def counted(*args, **kw):
            self.session_requests.append(time.monotonic())
            return create_session(*args, **kw)
        srv.iserver.create_session = counted
        await srv.start()
        self.srv = srv
        return self

    async def stop(self) -> None:
        if self.srv is not None:
            await self.srv.stop()
            self.srv = None

    async def write(self, name: str, value, at: dt.datetime | None = None) -> dt.datetime:
        at = at or dt.datetime.now(UTC)
        await self.srv.write_attribute_value(ua.NodeId(f"Sub.{name}", 2), ua.DataValue(
            ua.Variant(float(value), ua.VariantType.Double), SourceTimestamp=at, ServerTimestamp=at))
        return at

    def subscriptions(self) -> dict:
        return dict(self.srv.iserver.subscription_service.subscriptions) if self.srv else {}

    def sessions(self) -> list:
        return [s for s in self.srv.iserver._external_sessions.values() if s.is_activated()]

    def queued_publish_requests(self) -> int:
        """Publish requests the server holds unanswered, over its connections."""
        return sum(len(p.processor._publish_requests) for p in self.srv.bserver.clients
                   if p.processor is not None)


class _Refuser:
    """A user manager that lets nobody in: every ActivateSession is refused."""

    def get_user(self, iserver, username=None, password=None, certificate=None):
        return None


@pytest.fixture(scope="module")
def device(loop):
    d = loop.run_until_complete(Device().start())
    yield d
    loop.run_until_complete(d.stop())


def config(*nodes: dict, publishing_interval_ms: float = 200, **kw) -> OpcuaConfig:
    return OpcuaConfig(nodes=[OpcuaNode(**{"metric_name": n["node_id"].rpartition(".")[2].lower(), **n})
                              for n in nodes],
                       mode="subscribe", publishing_interval_ms=publishing_interval_ms,
                       timeout_seconds=kw.pop("timeout_seconds", 2.0), **kw)


def node(name: str, **kw) -> dict:
    return {"node_id": f"ns=2;s=Sub.{name}", **kw}


def subscription(endpoint: str, cfg: OpcuaConfig, tmp_path, **kw) -> OpcuaSubscription:
    return OpcuaSubscription(endpoint, cfg, interval=1.0, pki_dir=tmp_path / "pki",
                             trust_store=FileTrustStore(tmp_path / "trust.json"), **kw)


async def until(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return v


async def receive_until(sub: OpcuaSubscription, pred, timeout: float = 20.0) -> ReadResult:
    """Everything ``sub`` receives until ``pred(samples, errors)`` holds."""
    samples, errors = [], []
    async with asyncio.timeout(timeout):
        while not pred(samples, errors):
            res = await sub.receive()
            samples += res.samples
            errors += res.errors
    return ReadResult(samples, errors)


class Loop:
    """A SubscribeLoop as the pollers run one, and what it told its callbacks."""

    def __init__(self, device: Device, cfg: OpcuaConfig, tmp_path, endpoint: str | None = None):
        self.samples: list = []
        self.errors: list[str] = []
        self.gaps: list[tuple] = []
        self.subscribes = 0
        self.stats = Stats()
        delivered = [-1] * len(cfg.nodes)

        async def make():
            sub = subscription(endpoint or device.endpoint, cfg, tmp_path, stats=self.stats,
                               delivered=delivered)
            return await subscribed(sub)

        async def sink(res: ReadResult) -> None:
            self.samples += res.samples

        def on_subscribed(errors):
            self.subscribes += 1

        self.loop = SubscribeLoop(5.0, make, sink, on_error=self.errors.append, stats=self.stats,
                                  on_subscribed=on_subscribed,
                                  on_gap=lambda since, until: self.gaps.append((since, until)),
                                  spread=0)

    def values(self, metric: str) -> list[float]:
        return [s.value for s in self.samples if s.metric_name == metric]


# ---------------------------------------------------------------- what arrives

def test_value_changes_every_100_ms_all_arrive_with_their_source_timestamps(loop, device, tmp_path):
    cfg = config(node("Fast", sampling_interval_ms=100), publishing_interval_ms=500)
    sub = subscription(device.endpoint, cfg, tmp_path)

    async def go():
        assert await sub.connect() == []
        await receive_until(sub, lambda s, e: s)  # the initial value
        written = []

        async def write():
            for i in range(1, 31):
                written.append((float(i), await device.write("Fast", i)))
                await asyncio.sleep(0.1)
        # received as they come (a subscriber is always waiting for the next publish)
        _, got = await asyncio.gather(write(), receive_until(sub, lambda s, e: s and s[-1].value == 30.0))
        await sub.close()
        return written, got

    written, got = loop.run_until_complete(go())
    assert [(s.value, s.timestamp) for s in got.samples] == written
    assert got.errors == []
    s = got.samples[0]
    assert (s.metric_name, s.raw_tag, s.unit) == ("fast", "ns2_sSub.Fast", None)
    assert sub.stats.snapshot()["delivery_ms_max"] < 2000


def test_an_absolute_deadband_drops_jitter_and_keeps_jumps(loop, device, tmp_path):
    cfg = config(node("Noisy", sampling_interval_ms=50, deadband_absolute=1.0))
    sub = subscription(device.endpoint, cfg, tmp_path)

    async def go():
        await device.write("Noisy", 10.0)
        await sub.connect()
        await receive_until(sub, lambda s, e: s)

        async def write():
            for v in (10.2, 9.9, 10.3, 25.0, 25.4, 24.8, 5.0, 5.3, -7.0):
                await device.write("Noisy", v)
                await asyncio.sleep(0.05)
        # the last jump is the marker: anything the deadband let through came before it
        _, got = await asyncio.gather(write(), receive_until(sub, lambda s, e: s and s[-1].value == -7.0))
        await sub.close()
        return got

    assert [s.value for s in loop.run_until_complete(go()).samples] == [25.0, 5.0, -7.0]


def test_a_percent_deadband_needs_the_nodes_eurange_and_says_so(loop, device, tmp_path):
    cfg = config(node("Ranged", deadband_percent=5), node("Plain", deadband_percent=5))
    sub = subscription(device.endpoint, cfg, tmp_path)

    async def go():
        errors = await sub.connect()
        got = await receive_until(sub, lambda s, e: s)
        await sub.close()
        return errors, got

    errors, got = loop.run_until_complete(go())
    assert [e.raw_tag for e in errors] == ["ns2_sSub.Plain"]
    assert "deadband_percent is a percentage of the node's EURange" in errors[0].message
    assert "use deadband_absolute instead" in errors[0].message
    assert {s.raw_tag for s in got.samples} == {"ns2_sSub.Ranged"}


def test_unknown_nodes_and_values_that_are_not_numbers_are_point_errors(loop, device, tmp_path):
    cfg = config(node("Fast"), node("Missing"), node("Text"))
    sub = subscription(device.endpoint, cfg, tmp_path)

    async def go():
        errors = await sub.connect()
        got = await receive_until(sub, lambda s, e: s and e)
        await sub.close()
        return errors, got

    errors, got = loop.run_until_complete(go())
    assert [(e.raw_tag, e.message) for e in errors] == [
        ("ns2_sSub.Missing", "node ns=2;s=Sub.Missing does not exist on the server (BadNodeIdUnknown)")]
    assert [(e.raw_tag, e.message) for e in got.errors] == [
        ("ns2_sSub.Text", "value of type String is not numeric")]
    assert [s.raw_tag for s in got.samples] == ["ns2_sSub.Fast"]


def test_a_value_with_no_timestamps_is_stamped_when_it_arrives(tmp_path):
    sub = subscription("opc.tcp://127.0.0.1:4840", config(node("Fast")), tmp_path)
    before = time.time_ns() // 1000
    res = sub._samples([(0, 1.5, 0, None, 11)], before + 7)
    assert res.samples[0].timestamp == dt.datetime.fromtimestamp(0, UTC) + dt.timedelta(
        microseconds=before + 7)


def test_several_publish_requests_wait_at_the_server_so_a_capped_response_is_no_bottleneck(
        loop, device, tmp_path):
    # With one in flight, a server that caps a response at 1,000 notifications
    # answers at most once per round trip: at 50,000 changes a second the
    # backlog never drained (bench/README, scenario C).
    from haltless.pollers.opcua_subscription import PUBLISH_IN_FLIGHT
    sub = subscription(device.endpoint, config(node("Fast"), publishing_interval_ms=100), tmp_path)

    async def go():
        before = device.queued_publish_requests()
        await sub.connect()
        await receive_until(sub, lambda s, e: s)  # the initial value, and one more request sent
        await asyncio.sleep(0.3)  # keep-alives take none: nothing changed
        queued = device.queued_publish_requests() - before
        await sub.close()
        return queued

    assert PUBLISH_IN_FLIGHT >= 2
    assert loop.run_until_complete(go()) == PUBLISH_IN_FLIGHT


def test_closing_deletes_the_subscription_on_the_server(loop, device, tmp_path):
    sub = subscription(device.endpoint, config(node("Fast")), tmp_path)

    async def go():
        before = set(device.subscriptions())
        await sub.connect()
        mine = set(device.subscriptions()) - before
        await sub.close()
        return mine, set(device.subscriptions()) & mine

    mine, left = loop.run_until_complete(go())
    assert len(mine) == 1 and left == set()
    with pytest.raises(ReaderError, match="not subscribed"):
        loop.run_until_complete(sub.receive())


# ---------------------------------------------------------------- recovery

def run_loop(loop, device: Device, tmp_path, body, *nodes: dict, endpoint: str | None = None,
             **cfg_kw):
    """A SubscribeLoop on ``nodes`` (default: Fast) while ``body(lp)`` runs; stopped after."""
    cfg = config(*(nodes or (node("Fast"),)), **cfg_kw)
    lp = None

    async def go():
        nonlocal lp
        lp = Loop(device, cfg, tmp_path, endpoint)
        try:
            return await body(lp)
        finally:
            await lp.loop.stop()
    result = loop.run_until_complete(go())
    return lp, result


async def flowing(device: Device, lp: Loop, start: float, what: str) -> float:
    """Write ``start``, ``start + 1``, ... to Fast until one of them arrives: the last written."""
    v = start
    deadline = time.monotonic() + 30
    while True:
        if device.srv is not None:
            await device.write("Fast", v)
        if v in lp.values("fast") or any(x >= start for x in lp.values("fast")):
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"no values {what}; loop errors: {lp.errors}")
        v += 1
        await asyncio.sleep(0.1)


def test_a_restarted_server_is_subscribed_again_and_the_gap_reported(loop, tmp_path):
    dev = Device()
    loop.run_until_complete(dev.start())

    async def body(lp: Loop):
        await flowing(dev, lp, 1, "before the restart")
        await dev.stop()
        await until(lambda: lp.errors, what="the loss noticed")
        await until(lambda: lp.gaps, what="the gap's start reported")
        await dev.start()  # the same port
        await flowing(dev, lp, 100, "after the restart")
        await until(lambda: len(lp.gaps) == 2, what="the gap's end reported")

    try:
        lp, _ = run_loop(loop, dev, tmp_path, body)
    finally:
        loop.run_until_complete(dev.stop())
    (since, none), (since2, until_) = lp.gaps
    assert none is None and since2 == since and since < until_
    assert lp.subscribes == 2
    assert "lost the connection" in lp.errors[0] or "ended our subscription" in lp.errors[0], lp.errors


class Proxy:
    """A TCP relay to the device: ``cut()`` drops every connection through it
    (a dropped link), ``mute()`` keeps them open and lets nothing through (a
    link gone silent). Connections made after either work again."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.links: list[SimpleNamespace] = []
        self.server = None
        self.port = 0

    async def start(self) -> "Proxy":
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _link(self, reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        link = SimpleNamespace(muted=False, writers=(writer, up_w))
        self.links.append(link)

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    if not link.muted:
                        dst.write(data)
            except (ConnectionError, OSError):
                pass
            finally:
                if not link.muted:
                    dst.close()
        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def cut(self) -> None:
        for link in self.links:
            for w in link.writers:
                w.transport.abort()  # RST, as a dropped link looks to the client
        self.links = []

    def mute(self) -> None:
        for link in self.links:
            link.muted = True

    async def close(self) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("how", ["cut", "mute"])
def test_a_dropped_or_silent_connection_is_repaired(loop, device, tmp_path, monkeypatch, how):
    # keep-alives every 0.5 s: a silent link is noticed within ~3 s, not ~13
    monkeypatch.setattr(opcua_subscription, "KEEPALIVE_S", 0.5)
    proxy = loop.run_until_complete(Proxy(device.port).start())

    async def body(lp: Loop):
        await flowing(device, lp, 1000, "through the proxy")
        getattr(proxy, how)()
        await until(lambda: lp.errors, what="the loss noticed")
        await flowing(device, lp, 2000, "after the link came back")
        return list(lp.errors)

    try:
        lp, errors = run_loop(loop, device, tmp_path, body,
                              endpoint=endpoint_url("127.0.0.1", proxy.port), timeout_seconds=1.0)
    finally:
        loop.run_until_complete(proxy.close())
    if how == "mute":
        assert "no publish response" in errors[0] or "lost the connection" in errors[0], errors
    assert lp.subscribes == 2


def test_an_expired_session_and_a_deleted_subscription_are_made_again(loop, device, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(opcua_subscription, "KEEPALIVE_S", 0.5)

    before = set(device.subscriptions())  # orphans of earlier tests' dropped links

    async def body(lp: Loop):
        await flowing(device, lp, 3000, "at first")
        # the server forgets the subscription (BadSubscriptionIdInvalid / BadNoSubscription)
        [sid] = set(device.subscriptions()) - before
        await device.srv.iserver.subscription_service.delete_subscriptions([sid])
        await until(lambda: lp.subscribes == 2, what="a new subscription")
        await flowing(device, lp, 4000, "after the subscription was deleted")
        # the server closes the session, as when it expires
        [sid] = set(device.subscriptions()) - before
        owner = device.subscriptions()[sid].session_id
        [session] = [s for s in device.sessions() if s.session_id == owner]
        await session.close_session(True)
        await until(lambda: lp.subscribes == 3, what="a new session")
        await flowing(device, lp, 5000, "after the session was closed")
        return list(lp.errors)

    lp, errors = run_loop(loop, device, tmp_path, body, timeout_seconds=1.0)
    assert len(errors) == 2, errors
    assert set(device.subscriptions()) - before == set()  # the loop's stop deleted the last one


def test_a_resubscribe_does_not_deliver_an_unchanged_value_twice(loop, device, tmp_path, monkeypatch):
    monkeypatch.setattr(opcua_subscription, "KEEPALIVE_S", 0.5)  # the deletion noticed sooner
    before = set(device.subscriptions())

    async def body(lp: Loop):
        await until(lambda: lp.values("steady"), what="the first value")
        [sid] = set(device.subscriptions()) - before
        await device.srv.iserver.subscription_service.delete_subscriptions([sid])
        await until(lambda: lp.subscribes == 2, what="a new subscription")
        await flowing(device, lp, 6000, "after the new subscription")  # its first publish is in
        return lp.values("steady")

    lp, steady = run_loop(loop, device, tmp_path, body, node("Steady"), node("Fast"))
    assert steady == [42.0]
    assert [s.timestamp for s in lp.samples if s.metric_name == "steady"] == [STEADY]


def test_a_server_refusing_every_session_sees_attempts_spaced_further_and_further_apart(loop, tmp_path):
    dev = Device(refuse_sessions=True)
    loop.run_until_complete(dev.start())

    async def body(lp: Loop):
        await until(lambda: len(dev.session_requests) >= 5, timeout=40, what="five attempts")
        return list(dev.session_requests), list(lp.errors)

    try:
        lp, (attempts, errors) = run_loop(loop, dev, tmp_path, body)
    finally:
        loop.run_until_complete(dev.stop())
    assert "does not allow anonymous access" in errors[0]
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    # 1 s doubling, each delay drawn from its upper half: at least 0.5, 1, 2, 4 s
    for k, gap in enumerate(gaps[:4]):
        assert gap >= 0.5 * 2 ** k * 0.95, gaps
    assert lp.subscribes == 0 and lp.samples == []
