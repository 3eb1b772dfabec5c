"""OPC-UA subscriber: one session (opened as ``opcua_session.py`` opens
every session) holding one subscription with a monitored item per
configured node, report by exception (config keys: ``opcua_config.py``).

    connect: session -> CreateSubscription -> CreateMonitoredItems (<= 1,000
             per call) -> PUBLISH_IN_FLIGHT Publish requests in flight
    receive: PublishResponse bytes --haltless.fast.data_changes (asyncua
             decodes what it does not read)--> (handle, value, status,
             timestamp) per item --> Samples / PointErrors; the next
             Publish (acknowledging this one) goes out before the decode

asyncua's own subscription machinery is not used: it decodes each value
into three dataclasses (~31 us a value, 1.5 cores at 50,000 changes a
second), and its publish loop retries a dead session every second forever.
Here PUBLISH_IN_FLIGHT Publish requests are always in flight (OPC-UA Part 4
advises several: with one, a server that caps a response at 1,000
notifications sends at most one response per round trip, and at 50,000
changes a second the backlog never drained), and ``receive`` raises
ReaderError once the subscription is lost, which ``SubscribeLoop``
(``subscribe.py``) repairs by opening a new session and subscribing again:

* a closed or reset TCP connection fails the pending Publish at once;
* a connection that goes silent is noticed by asyncua's supervisor probe
  (``connection_lost_callback``), or by the publish deadline: the server
  sends at least a keep-alive every ``KEEPALIVE_S``, so no response in two
  keep-alive periods (plus the request timeout) means it is gone;
* an expired or closed session, or a deleted subscription, comes back as
  a ServiceFault of the Publish (BadSessionIdInvalid, BadNoSubscription,
  BadSubscriptionIdInvalid), a Bad acknowledgement result, or a
  StatusChangeNotification.

Every sample of every notification becomes a reading (a queue of samples
per node on the server: ``queue_size``); its time is the SourceTimestamp,
else the ServerTimestamp, else the time it arrived. After a re-subscribe
the server sends each node's current value again; a value the previous
subscription already delivered (same node, same SourceTimestamp or older)
is not delivered twice.
"""
from __future__ import annotations

import asyncio
import collections
import math
import time
from pathlib import Path

from asyncua import Client, ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import Primitives, nodeid_from_binary, struct_from_binary

from ..core.errors import ReaderError
from ..fast import data_changes
from .base import PointError, ReadResult, Sample
from .opcua_config import OpcuaConfig, publishing_interval_ms, queue_size, raw_tag, sampling_interval_ms
from .opcua_session import OpcuaEndpoint, disconnect_quietly, parse_node_id
from .opcua_values import Point, finite_error, from_us, status_error, type_error, utc
from .stats import DELIVERY_CAP_MS, Stats
from .trust import TrustStore

KEEPALIVE_S = 5.0     # the server sends at least this often, data or not
LIFETIME_S = 60.0     # a subscription nobody publishes for dies on the server after this
ITEMS_PER_CALL = 1000  # monitored items per CreateMonitoredItems (and per TranslateBrowsePaths)

_DATA_CHANGE = ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary
_STATUS_CHANGE = ua.ObjectIds.StatusChangeNotification_Encoding_DefaultBinary
PUBLISH_IN_FLIGHT = 3  # Publish requests queued at the server; it answers them in order
# Publish faults that ask only for another Publish request
_PUBLISH_AGAIN = {"BadTimeout", "BadTooManyPublishRequests"}
_DEADBAND_REFUSED = {"BadDeadbandFilterInvalid", "BadFilterNotAllowed", "BadMonitoredItemFilterUnsupported",
                     "BadMonitoredItemFilterInvalid"}
_HAS_PROPERTY = ua.NodeId(ua.ObjectIds.HasProperty)
_MAX_ITEMS_PER_CALL = ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall)


class OpcuaSubscription:
    """One subscription with one OPC-UA server (``base.Subscriber``).
    ``interval`` is the source's poll interval, the publishing interval
    unless ``publishing_interval_ms`` is configured; ``stats`` counts
    publishes, values and their delivery lag; ``delivered`` holds, per
    node, the timestamp (Unix us) of the last value delivered: a caller
    that makes a new subscriber for each reconnect passes the same list to
    each, so that a re-subscribe does not deliver a value twice."""

    def __init__(self, endpoint: str, config: OpcuaConfig, *, interval: float, pki_dir: Path,
                 trust_store: TrustStore, stats: Stats | None = None,
                 delivered: list[int] | None = None) -> None:
        self._endpoint = OpcuaEndpoint(endpoint, config, pki_dir=pki_dir, trust_store=trust_store,
                                       name="haltless OPC-UA subscriber")
        self.where, self._cfg = self._endpoint.where, config
        self.publishing_ms = publishing_interval_ms(config, interval)
        self.publishing_interval = self.publishing_ms / 1000
        self.stats = stats if stats is not None else Stats()
        self._points = [Point(n.node_id, raw_tag(n.node_id), n.metric_name, n.unit) for n in config.nodes]
        self._node_ids = [parse_node_id(n.node_id) for n in config.nodes]
        # Per node, across re-subscribes: the timestamp (Unix us) of the last
        # value delivered, and whether the next value is the first of a new
        # subscription (the server's initial value, perhaps one we have).
        if delivered is not None and len(delivered) != len(self._points):
            raise ValueError(f"delivered holds {len(delivered)} timestamps for {len(self._points)} nodes")
        self._last_us = delivered if delivered is not None else [-1] * len(self._points)
        self._fresh = [True] * len(self._points)
        self._client: Client | None = None
        self._subscription_id: int | None = None
        self._publish: collections.deque[asyncio.Task] = collections.deque()
        self._lost: asyncio.Future | None = None
        self._deadline = 0.0
        self._last_seq: int | None = None
        self.item_errors: list[PointError] = []

    # ---------------------------------------------------------------- subscribing

    async def connect(self) -> list[PointError]:
        await self.close()
        client = await self._endpoint.open()
        try:
            errors = await self._subscribe(client)
        except BaseException as exc:
            await disconnect_quietly(client, self._cfg.timeout_seconds)
            if isinstance(exc, Exception) and not isinstance(exc, ReaderError):
                raise self._endpoint.request_error(exc, "subscribing", "the subscription") from exc
            raise
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        client.connection_lost_callback = self._connection_lost
        self._client = client
        self._fresh = [True] * len(self._points)
        self._last_seq = None
        for _ in range(PUBLISH_IN_FLIGHT):
            self._send_publish([])
        self.item_errors = errors
        return errors

    async def _subscribe(self, client: Client) -> list[PointError]:
        pub = self.publishing_ms
        keepalive = max(1, math.ceil(KEEPALIVE_S * 1000 / pub))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=pub, RequestedMaxKeepAliveCount=keepalive,
            RequestedLifetimeCount=max(3 * keepalive, math.ceil(LIFETIME_S * 1000 / pub)),
            MaxNotificationsPerPublish=0, PublishingEnabled=True, Priority=0)
        request = ua.CreateSubscriptionRequest(Parameters=params)
        # Not client.create_subscription: that starts asyncua's publish loop.
        response = struct_from_binary(ua.CreateSubscriptionResponse,
                                      await client.uaclient.protocol.send_request(request))
        response.ResponseHeader.ServiceResult.check()
        result = response.Parameters
        self._subscription_id = result.SubscriptionId
        revised = (result.RevisedPublishingInterval or pub) / 1000 * max(1, result.RevisedMaxKeepAliveCount)
        self._deadline = 2 * revised + self._cfg.timeout_seconds
        per_call = await self._items_per_call(client)
        errors: list[PointError] = []
        wanted = list(range(len(self._points)))
        percent = [i for i in wanted if self._cfg.nodes[i].deadband_percent is not None]
        no_range = await self._without_eurange(client, percent, per_call)
        for i in sorted(no_range):
            errors.append(PointError(
                self._points[i].raw_tag, self._points[i].metric_name,
                f"node {self._points[i].node_id}: deadband_percent is a percentage of the node's EURange "
                "(its engineering range), and the server has no EURange for it; use deadband_absolute "
                "instead, or give the node an EURange property"))
        wanted = [i for i in wanted if i not in no_range]
        for k in range(0, len(wanted), per_call):
            batch = wanted[k:k + per_call]
            params = ua.CreateMonitoredItemsParameters(
                SubscriptionId=self._subscription_id, TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=[self._item(i) for i in batch])
            results = await client.uaclient.create_monitored_items(params)
            for i, res in zip(batch, results):
                if not res.StatusCode.is_good():
                    errors.append(self._item_error(i, res.StatusCode))
        return errors

    async def _items_per_call(self, client: Client) -> int:
        params = ua.ReadParameters(NodesToRead=[ua.ReadValueId(_MAX_ITEMS_PER_CALL, ua.AttributeIds.Value)])
        [dv] = await client.uaclient.read(params)
        limit = dv.Value.Value if dv.Value is not None and (dv.StatusCode is None or dv.StatusCode.is_good()) else 0
        return min(limit, ITEMS_PER_CALL) if isinstance(limit, int) and limit > 0 else ITEMS_PER_CALL

    async def _without_eurange(self, client: Client, which: list[int], per_call: int) -> set[int]:
        """The nodes of ``which`` that have no EURange property."""
        missing: set[int] = set()
        for k in range(0, len(which), per_call):
            batch = which[k:k + per_call]
            paths = [ua.BrowsePath(StartingNode=self._node_ids[i], RelativePath=ua.RelativePath(Elements=[
                ua.RelativePathElement(ReferenceTypeId=_HAS_PROPERTY, IsInverse=False, IncludeSubtypes=True,
                                       TargetName=ua.QualifiedName("EURange", 0))])) for i in batch]
            results = await client.uaclient.translate_browsepaths_to_nodeids(paths)
            missing.update(i for i, r in zip(batch, results) if not r.StatusCode.is_good() or not r.Targets)
        return missing

    def _item(self, i: int) -> ua.MonitoredItemCreateRequest:
        node, pub = self._cfg.nodes[i], self.publishing_ms
        flt = None
        if node.deadband_absolute is not None or node.deadband_percent is not None:
            absolute = node.deadband_absolute is not None
            flt = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=ua.DeadbandType.Absolute if absolute else ua.DeadbandType.Percent,
                DeadbandValue=node.deadband_absolute if absolute else node.deadband_percent)
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=self._node_ids[i], AttributeId=ua.AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=ua.MonitoringParameters(
                ClientHandle=i, SamplingInterval=sampling_interval_ms(node, pub), Filter=flt,
                QueueSize=queue_size(node, pub), DiscardOldest=True))

    def _item_error(self, i: int, status: ua.StatusCode) -> PointError:
        point, name = self._points[i], status.name
        if name in _DEADBAND_REFUSED:
            node = self._cfg.nodes[i]
            which = "deadband_absolute" if node.deadband_absolute is not None else "deadband_percent"
            return PointError(point.raw_tag, point.metric_name,
                              f"node {point.node_id}: the server refused its {which} ({name}); "
                              "remove the deadband, or check that the node is numeric"
                              + (" and has an EURange" if which == "deadband_percent" else ""))
        return status_error(point, status.value)

    # ---------------------------------------------------------------- publishing

    def _send_publish(self, acks: list[ua.SubscriptionAcknowledgement]) -> None:
        request = ua.PublishRequest()
        request.Parameters.SubscriptionAcknowledgements = acks
        # TimeoutHint 0 and no client timeout: the server holds the request
        # until it has something to send; the publish deadline is ours.
        protocol = self._client.uaclient.protocol
        if protocol is None:
            raise ReaderError(f"lost the connection to the OPC-UA server at {self.where}")
        task = asyncio.ensure_future(protocol.send_request(request, timeout=0))
        task.add_done_callback(_retrieve)
        self._publish.append(task)

    async def _connection_lost(self, exc: Exception) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(exc)

    async def receive(self) -> ReadResult:
        if self._client is None or not self._publish:
            raise ReaderError(f"not subscribed to {self.where}")
        while True:
            task = self._publish[0]  # the server answers its queued requests in order
            done, _ = await asyncio.wait((task, self._lost), timeout=self._deadline,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise ReaderError(f"no publish response from the OPC-UA server at {self.where} for "
                                  f"{self._deadline:.0f} s, not even a keep-alive: the connection or the "
                                  "session is gone")
            if task not in done:
                raise ReaderError(f"lost the connection to the OPC-UA server at {self.where} "
                                  f"({self._lost.result()!r})")
            self._publish.popleft()
            try:
                data = task.result()
            except ua.UaStatusCodeError as exc:
                name = ua.StatusCode(exc.code).name
                if name in _PUBLISH_AGAIN:
                    # A server that takes fewer requests than we send refuses
                    # the extra ones (BadTooManyPublishRequests): keep one fewer.
                    if name != "BadTooManyPublishRequests" or not self._publish:
                        self._send_publish([])
                    continue
                raise ReaderError(f"the OPC-UA server at {self.where} ended our subscription ({name}); "
                                  "subscribing again") from None
            except Exception as exc:
                raise self._endpoint.request_error(exc, "waiting for notifications", "the publish request") \
                    from exc
            return self._received(data)

    def _received(self, data: Buffer) -> ReadResult:
        arrival_us = time.time_ns() // 1000
        nodeid_from_binary(data)  # PublishResponse
        header = struct_from_binary(ua.ResponseHeader, data)
        if not header.ServiceResult.is_good():
            raise ReaderError(f"the OPC-UA server at {self.where} answered a publish with "
                              f"{header.ServiceResult.name}; subscribing again")
        subscription_id = Primitives.UInt32.unpack(data)
        data.skip(4 * max(0, Primitives.Int32.unpack(data)))  # AvailableSequenceNumbers
        Primitives.Boolean.unpack(data)  # MoreNotifications: the next Publish goes out anyway
        seq = Primitives.UInt32.unpack(data)
        data.skip(8)  # PublishTime
        items: list = []
        statuses: list[ua.StatusCode] = []
        for _ in range(max(0, Primitives.Int32.unpack(data))):
            type_id = nodeid_from_binary(data)
            encoding = Primitives.Byte.unpack(data)
            body = data.read(Primitives.Int32.unpack(data)) if encoding & 0x03 else b""
            if type_id.NamespaceIndex != 0:
                continue
            if type_id.Identifier == _DATA_CHANGE:
                got = data_changes(body, 0, len(body))
                items.extend(got if got is not None else _decode_slowly(body))
            elif type_id.Identifier == _STATUS_CHANGE:
                statuses.append(struct_from_binary(ua.StatusChangeNotification, Buffer(body)).Status)
        ack_results = [Primitives.UInt32.unpack(data) for _ in range(max(0, Primitives.Int32.unpack(data)))]
        # Ask for the next one first: the server can fill it while we decode.
        has_data = bool(items or statuses)
        self._send_publish([ua.SubscriptionAcknowledgement(subscription_id, seq)] if has_data else [])
        self.stats.publishes += 1
        if any(code & 0xC0000000 for code in ack_results):
            raise ReaderError(f"the OPC-UA server at {self.where} no longer knows our subscription "
                              f"({ua.StatusCode(next(c for c in ack_results if c & 0xC0000000)).name}); "
                              "subscribing again")
        if statuses:  # expired (BadTimeout), moved to another session, the server shutting down
            raise ReaderError(f"the OPC-UA server at {self.where} ended our subscription "
                              f"({statuses[0].name}); subscribing again")
        if has_data:
            if self._last_seq is not None and seq != (self._last_seq + 1) & 0xFFFFFFFF and seq > self._last_seq:
                self.stats.missed += seq - self._last_seq - 1  # messages the server skipped
            self._last_seq = seq
        return self._samples(items, arrival_us)

    def _samples(self, items: list, arrival_us: int) -> ReadResult:
        points, last, fresh = self._points, self._last_us, self._fresh
        n = len(points)
        samples: list[Sample] = []
        errors: list[PointError] = []
        lags = self.stats.delivery_ms
        prev_us, prev_dt = -1, None
        for handle, value, status, ts, vtype in items:
            if handle >= n:
                continue  # not one of ours (a server bug)
            point = points[handle]
            if fresh[handle]:
                fresh[handle] = False
                if ts is not None and ts <= last[handle]:
                    continue  # the previous subscription delivered it
            if ts is None:
                ts = arrival_us
            if status & 0xC0000000:
                errors.append(status_error(point, status))
                continue
            if value is None:
                errors.append(type_error(point, vtype & 0x3F, vtype >= 0x80))
                continue
            if not math.isfinite(value):
                errors.append(finite_error(point, value))
                continue
            last[handle] = ts
            lag = (arrival_us - ts) // 1000
            lag = 0 if lag < 0 else DELIVERY_CAP_MS if lag > DELIVERY_CAP_MS else lag
            lags[lag] = lags.get(lag, 0) + 1
            if ts != prev_us:  # values sampled together share their timestamp
                prev_us, prev_dt = ts, from_us(ts)
            samples.append(Sample(point.metric_name, point.unit, point.raw_tag, value, prev_dt))
        self.stats.notifications += len(samples) + len(errors)
        return ReadResult(samples, errors)

    # ---------------------------------------------------------------- closing

    async def close(self) -> None:
        client, self._client = self._client, None
        subscription_id, self._subscription_id = self._subscription_id, None
        publish, self._publish = self._publish, collections.deque()
        if self._lost is not None and not self._lost.done():
            self._lost.cancel()
        if client is None:
            return
        client.connection_lost_callback = None
        # Half the request timeout each for the delete and the disconnect: a
        # source being handed over holds up its process's lease renewals
        # while it closes.
        half = self._cfg.timeout_seconds / 2
        try:
            if subscription_id is not None:  # the next owner of the source (a hand-over) creates its own
                await asyncio.wait_for(client.uaclient.delete_subscriptions([subscription_id]), half + 0.5)
        except Exception:  # noqa: BLE001 - gone with the session, or at the end of its lifetime
            pass
        finally:
            await disconnect_quietly(client, half)
            for task in publish:
                if not task.done():
                    task.cancel()


def _retrieve(task: asyncio.Task) -> None:
    """A Publish nobody awaits any more (the session closed under it) must
    not log "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


def _decode_slowly(body: bytes) -> list:
    """``data_changes``' tuples, by asyncua, for a notification it does not read."""
    out = []
    for item in struct_from_binary(ua.DataChangeNotification, Buffer(body)).MonitoredItems:
        dv = item.Value
        variant = dv.Value
        value, vtype = None, 0
        if variant is not None and variant.VariantType != ua.VariantType.Null:
            vtype = variant.VariantType.value | (0x80 if variant.is_array else 0)
            if not variant.is_array and isinstance(variant.Value, (int, float)):
                value = float(variant.Value)
        ts = utc(dv.SourceTimestamp) or utc(dv.ServerTimestamp)
        out.append((item.ClientHandle, value, dv.StatusCode.value if dv.StatusCode is not None else 0,
                    None if ts is None else _us(ts), vtype))
    return out


def _us(ts) -> int:
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_EPOCH = from_us(0)
