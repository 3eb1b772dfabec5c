"""OPC-UA reader: polls the Value attribute of configured nodes with asyncua,
over a session opened as ``opcua_session.py`` opens every OPC-UA session
(security, certificates, trust on first use)."""
from __future__ import annotations

from pathlib import Path

from asyncua import Client, ua

from ..core.errors import ReaderError
from .base import PointError, ReadResult, Sample, utcnow
from .opcua_config import OpcuaConfig, raw_tag
from .opcua_session import OpcuaEndpoint, disconnect_quietly, parse_node_id
from .opcua_values import Point, to_sample
from .trust import TrustStore

READ_CHUNK = 250


class OpcuaReader:
    """One session with one OPC-UA server, reading the configured nodes' values."""

    def __init__(self, endpoint: str, config: OpcuaConfig, *, pki_dir: Path, trust_store: TrustStore) -> None:
        self._endpoint = OpcuaEndpoint(endpoint, config, pki_dir=pki_dir, trust_store=trust_store)
        self._where, self._cfg = self._endpoint.where, config
        self._points = [Point(n.node_id, raw_tag(n.node_id), n.metric_name, n.unit) for n in config.nodes]
        self._read_ids = [
            ua.ReadValueId(NodeId=parse_node_id(n.node_id), AttributeId=ua.AttributeIds.Value) for n in config.nodes
        ]
        self._batches: list[ua.ReadParameters] = []
        self._client: Client | None = None
        self.max_nodes_per_read = 0  # the server's limit, read at connect; 0 = none

    async def connect(self) -> None:
        await self.close()
        client = await self._endpoint.open()
        try:
            limit_id = ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)
            params = ua.ReadParameters(NodesToRead=[ua.ReadValueId(limit_id, ua.AttributeIds.Value)])
            [dv] = await client.uaclient.read(params)
        except BaseException as exc:
            await disconnect_quietly(client, self._cfg.timeout_seconds)
            if isinstance(exc, Exception):
                raise self._endpoint.request_error(exc, "connecting", "the read of MaxNodesPerRead") from exc
            raise
        limit = dv.Value.Value if dv.Value is not None and (dv.StatusCode is None or dv.StatusCode.is_good()) else 0
        self.max_nodes_per_read = limit if isinstance(limit, int) and limit > 0 else 0  # 0/missing: no limit
        # At most READ_CHUNK nodes per request even when the server allows more:
        # decoding a response is pure Python, and a 1,000-node one holds the
        # event loop ~20 ms, delaying every other source's poll (bench/pollers).
        size = min(self.max_nodes_per_read or READ_CHUNK, READ_CHUNK)
        self._batches = [
            ua.ReadParameters(TimestampsToReturn=ua.TimestampsToReturn.Source, NodesToRead=self._read_ids[i:i + size])
            for i in range(0, len(self._read_ids), size)
        ]
        self._client = client

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
            for dv, point in zip(results, points):
                got = to_sample(dv, point, poll_time)
                (samples if type(got) is Sample else errors).append(got)
        return ReadResult(samples, errors)

    def _read_error(self, exc: Exception) -> ReaderError:
        return self._endpoint.request_error(exc, "reading", "the read")

    async def close(self) -> None:
        client, self._client = self._client, None
        self._batches = []
        if client is not None:
            await disconnect_quietly(client, self._cfg.timeout_seconds)
