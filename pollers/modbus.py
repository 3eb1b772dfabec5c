"""Modbus TCP reader (holding and input registers) for the Reader protocol.

Its config is ``ModbusConfig`` (``pollers/modbus_config.py``: the types,
defaults, byte and word order, raw_tag); call ``validate_modbus_config``
after decoding it.

Duplicate ``metric_name`` values are allowed (e.g. the same register decoded
two ways); each register yields its own Sample and its raw_tag tells them apart.

Registers of the same type whose ranges touch or overlap are read in one
request of at most 125 registers; unconfigured gaps are never read, because
devices answer Illegal Data Address for unmapped registers. If a merged request
gets a Modbus exception response, its registers are re-read one by one so only
the bad ones become PointErrors. A decoded NaN or infinity is a PointError too
(devices use them to flag "no valid measurement", and readings must be finite).
"""
from __future__ import annotations

import asyncio
import math
import socket
import struct
from typing import Literal, NamedTuple

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from ..core.errors import ReaderError
from .base import PointError, ReadResult, Sample, utcnow
from .modbus_config import (DATA_TYPES, ModbusConfig, ModbusRegister, raw_tag, register_width,
                            validate_modbus_config)

_isfinite = math.isfinite

MAX_REGISTERS_PER_REQUEST = 125

_EXCEPTION_NAMES = {
    1: "Illegal Function", 2: "Illegal Data Address", 3: "Illegal Data Value",
    4: "Server Device Failure", 5: "Acknowledge", 6: "Server Device Busy",
    8: "Memory Parity Error", 10: "Gateway Path Unavailable",
    11: "Gateway Target Device Failed to Respond",
}


class PlannedRequest(NamedTuple):
    """One read request; ``indices`` point into the planned register list."""

    register_type: Literal["holding", "input"]
    address: int
    count: int
    indices: tuple[int, ...]


def plan_requests(registers: list[ModbusRegister]) -> list[PlannedRequest]:
    """Merge touching/overlapping registers of one type into requests of <= 125."""
    plan: list[PlannedRequest] = []
    for rtype in ("holding", "input"):
        spans = sorted(
            (r.address, r.address + register_width(r.data_type) - 1, i)
            for i, r in enumerate(registers)
            if r.register_type == rtype
        )
        start = end = -2
        members: list[int] = []
        for first, last, i in spans:
            new_end = max(end, last)
            if members and first <= end + 1 and new_end - start < MAX_REGISTERS_PER_REQUEST:
                end = new_end
                members.append(i)
                continue
            if members:
                plan.append(PlannedRequest(rtype, start, end - start + 1, tuple(members)))
            start, end, members = first, last, [i]
        if members:
            plan.append(PlannedRequest(rtype, start, end - start + 1, tuple(members)))
    return plan


class _Point(NamedTuple):
    metric_name: str
    unit: str | None
    raw_tag: str
    holding: bool
    address: int
    width: int
    codec: struct.Struct
    swapped: bool  # decode from the byte-swapped buffer (see _compile_point)
    scale: float
    offset: float
    what: str  # "holding register 100", for messages


class _Request(NamedTuple):
    holding: bool
    address: int
    count: int
    points: tuple[tuple[int, _Point], ...]  # (byte offset in the response, point)
    pack_wire: struct.Struct
    pack_swapped: struct.Struct | None  # only if some point needs it


_STRUCTS: dict[str, struct.Struct] = {}


def _codec(fmt: str) -> struct.Struct:
    # Shared across readers: 1,000 readers hold the same handful of codecs.
    codec = _STRUCTS.get(fmt)
    if codec is None:
        codec = _STRUCTS[fmt] = struct.Struct(fmt)
    return codec


def _compile_point(reg: ModbusRegister) -> _Point:
    width, char = DATA_TYPES[reg.data_type]
    holding = reg.register_type == "holding"
    # pymodbus hands over register values, i.e. each register's bytes in wire
    # order when packed ">H". Packing "<H" swaps the bytes of every register;
    # reading the whole value "<" instead of ">" reverses the register order.
    # So byte order picks the buffer, word order the struct endianness.
    return _Point(
        reg.metric_name, reg.unit, raw_tag(reg), holding, reg.address, width,
        _codec((">" if reg.word_order == "big" else "<") + char),
        reg.byte_order != reg.word_order,
        reg.scale, reg.offset,
        f"{reg.register_type} register{'s' if width > 1 else ''} "
        f"{reg.address}{'' if width == 1 else f'-{reg.address + width - 1}'}",
    )


def _exception_text(code: int) -> str:
    return f"Modbus exception {code} ({_EXCEPTION_NAMES.get(code, 'unknown')})"


class ModbusReader:
    """Reads the configured registers of one Modbus TCP device (one unit id).

    Reconnects are the runner's job: pymodbus's own reconnect and retries are
    off, and a lost connection stays lost until close() + connect().
    """

    def __init__(self, host: str, port: int, config: ModbusConfig) -> None:
        validate_modbus_config(config)
        self.host = host
        self.port = port
        self.config = config
        self._unit = config.unit_id
        self._timeout = config.timeout_seconds
        self._where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._client: AsyncModbusTcpClient | None = None
        points = [_compile_point(r) for r in config.registers]
        self._requests = [self._compile_request(p, points) for p in plan_requests(config.registers)]

    @staticmethod
    def _compile_request(planned: PlannedRequest, points: list[_Point]) -> _Request:
        members = tuple(((points[i].address - planned.address) * 2, points[i]) for i in planned.indices)
        return _Request(
            planned.register_type == "holding", planned.address, planned.count, members,
            _codec(f">{planned.count}H"),
            _codec(f"<{planned.count}H") if any(p.swapped for _, p in members) else None,
        )

    async def connect(self) -> None:
        await self.close()
        # The client must be built inside the running loop (pymodbus binds
        # its futures and lock to it), so not in __init__.
        # reconnect_delay=0 stops pymodbus from starting its own reconnect
        # task on connection loss; retries=0 means one attempt per request.
        client = AsyncModbusTcpClient(
            self.host, port=self.port, name=f"modbus {self._where}",
            timeout=self._timeout, retries=0, reconnect_delay=0, reconnect_delay_max=0,
        )
        # pymodbus swallows the connect error and returns False; keep the
        # exception so the message can say refused vs. unreachable vs. DNS.
        failure: list[BaseException] = []
        create = getattr(client.ctx, "call_create", None)
        if create is not None:
            async def _create():
                try:
                    return await create()
                except BaseException as exc:
                    failure.append(exc)
                    raise
            client.ctx.call_create = _create
        try:
            ok = await client.connect()
        except Exception as exc:  # e.g. a malformed host
            failure.append(exc)
            ok = False
        if not ok:
            _close_quietly(client)
            raise ReaderError(self._connect_failure(failure[0] if failure else None))
        self._client = client

    def _connect_failure(self, exc: BaseException | None) -> str:
        where = self._where
        if isinstance(exc, ConnectionRefusedError):
            return f"connection refused by {where} - is the device on and listening on that port?"
        if exc is None or isinstance(exc, (asyncio.CancelledError, TimeoutError)):
            return (f"no connection to {where} within {self._timeout} s - check the "
                    "address, the network path and any firewall")
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve host {self.host!r}: {exc} - check the host name"
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"cannot connect to {where}: {detail} - check the address and the network"

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            _close_quietly(client)
            # Lets asyncio run the transport's close callback now, so the
            # socket is released even if the loop stops right after.
            await asyncio.sleep(0)

    async def read(self) -> ReadResult:
        client = self._client
        if client is None:
            raise ReaderError(f"not connected to {self._where} - connect() first")
        if not client.connected:
            raise ReaderError(f"connection to {self._where} lost - the device closed it or went away")
        timestamp = utcnow()
        samples: list[Sample] = []
        errors: list[PointError] = []
        unit = self._unit
        for req in self._requests:
            rr = await self._execute(client, req.holding, req.address, req.count)
            if rr.isError():
                if len(req.points) == 1:
                    point = req.points[0][1]
                    errors.append(self._exception_error(point, rr.exception_code))
                else:
                    await self._read_one_by_one(client, req, timestamp, samples, errors)
                continue
            regs = rr.registers
            if len(regs) != req.count:
                for _, point in req.points:
                    errors.append(PointError(point.raw_tag, point.metric_name,
                        f"device returned {len(regs)} registers for a request of {req.count} "
                        f"at {req.address} on unit {unit}"))
                continue
            wire = req.pack_wire.pack(*regs)
            swapped = req.pack_swapped.pack(*regs) if req.pack_swapped is not None else wire
            for boff, point in req.points:
                _decode(point, swapped if point.swapped else wire, boff, timestamp, samples, errors)
        return ReadResult(samples, errors)

    async def _read_one_by_one(self, client, req: _Request, timestamp, samples, errors) -> None:
        for _, point in req.points:
            rr = await self._execute(client, point.holding, point.address, point.width)
            if rr.isError():
                errors.append(self._exception_error(point, rr.exception_code))
                continue
            regs = rr.registers
            if len(regs) != point.width:
                errors.append(PointError(point.raw_tag, point.metric_name,
                    f"device returned {len(regs)} registers for {point.what}, expected {point.width}"))
                continue
            codec = _codec(f"{'<' if point.swapped else '>'}{point.width}H")
            _decode(point, codec.pack(*regs), 0, timestamp, samples, errors)

    async def _execute(self, client: AsyncModbusTcpClient, holding: bool, address: int, count: int):
        fn = client.read_holding_registers if holding else client.read_input_registers
        try:
            # pymodbus 3.16 names the unit id device_id= (older releases: slave=).
            return await fn(address, count=count, device_id=self._unit)
        except ModbusException as exc:
            raise ReaderError(self._io_failure(client, exc)) from None
        except OSError as exc:
            raise ReaderError(f"connection to {self._where} failed: {exc}") from None
        except RuntimeError as exc:
            # uvloop: writing to a transport the device already closed (a device
            # that accepts and closes at once) - "unable to perform operation".
            if "closed" not in str(exc):
                raise
            raise ReaderError(f"connection to {self._where} lost - the device closed it right "
                              "after accepting it") from None

    def _io_failure(self, client: AsyncModbusTcpClient, exc: ModbusException) -> str:
        if not client.connected:
            return f"connection to {self._where} lost - the device closed it or went away"
        if "No response" in str(exc):
            return f"no response from {self._where} within {self._timeout} s (unit {self._unit})"
        return f"bad response from {self._where} (unit {self._unit}): {exc}"

    def _exception_error(self, point: _Point, code: int) -> PointError:
        return PointError(point.raw_tag, point.metric_name,
                          f"{_exception_text(code)} reading {point.what} on unit {self._unit}")


def _decode(point: _Point, buf: bytes, boff: int, timestamp, samples: list, errors: list) -> None:
    raw = point.codec.unpack_from(buf, boff)[0]
    value = raw * point.scale + point.offset
    if _isfinite(value):
        samples.append(Sample(point.metric_name, point.unit, point.raw_tag, float(value), timestamp))
    else:
        errors.append(PointError(point.raw_tag, point.metric_name,
            f"{point.what} decoded to {value!r}, not a finite number - the device flags no valid value"))


def _close_quietly(client: AsyncModbusTcpClient) -> None:
    try:
        client.close()
    except Exception:  # close() must never raise; nothing useful to do here
        pass
