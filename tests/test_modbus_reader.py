"""ModbusReader against a real in-process pymodbus TCP server on 127.0.0.1."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import struct

import msgspec
import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from haltless.core.errors import ReaderError
from haltless.pollers.modbus import ModbusReader, PlannedRequest, plan_requests
from haltless.pollers.modbus_config import ModbusConfig, ModbusRegister, validate_modbus_config
from helpers import free_port

HOST = "127.0.0.1"


# ---------------------------------------------------------------- helpers


def encode(value, data_type: str, byte_order: str = "big", word_order: str = "big") -> list[int]:
    """Reference encoder, straight from the documented layout (not the reader's code)."""
    fmt = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f",
           "int64": "q", "uint64": "Q", "float64": "d"}[data_type]
    data = struct.pack(">" + fmt, value)  # most significant byte first
    words = [data[i:i + 2] for i in range(0, len(data), 2)]
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def _blocks(regs: dict[int, int | None]) -> list[SimData]:
    """Consecutive runs of values; None marks a register the device rejects."""
    out: list[SimData] = []
    run: list[int] = []
    start = None
    for addr in sorted(regs) + [None]:
        value = regs.get(addr) if addr is not None else None
        if run and (addr is None or value is None or addr != start + len(run)):
            out.append(SimData(start, values=run, datatype=DataType.REGISTERS))
            run = []
        if addr is None:
            break
        if value is None:
            out.append(SimData(addr, datatype=DataType.INVALID))
            continue
        if not run:
            start = addr
        run.append(value)
    return out


def device(dev_id: int, hr: dict[int, int | None], ir: dict[int, int | None] | None = None) -> SimDevice:
    bits = [SimData(0, values=False, datatype=DataType.BITS)]
    return SimDevice(dev_id, simdata=(bits, list(bits), _blocks(hr), _blocks(ir or {0: 0})))


@contextlib.asynccontextmanager
async def modbus_server(devices, port: int = 0):
    server = ModbusTcpServer(devices, address=(HOST, port))
    await server.serve_forever(background=True)
    try:
        yield server, server.transport.sockets[0].getsockname()[1]
    finally:
        await server.shutdown()
        await asyncio.sleep(0.01)  # let the server's connection transports finish closing


async def until(condition, timeout: float = 10.0) -> None:
    """Wait, on the running loop, until ``condition()`` is true (TimeoutError after ``timeout``)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def cfg(*registers: ModbusRegister, unit_id: int = 1, timeout: float = 1.0) -> ModbusConfig:
    return ModbusConfig(registers=list(registers), unit_id=unit_id, timeout_seconds=timeout)


async def read_once(port: int, config: ModbusConfig):
    reader = ModbusReader(HOST, port, config)
    await reader.connect()
    try:
        return await reader.read()
    finally:
        await reader.close()


# ------------------------------------------------------- reading values


def test_holding_and_input_registers_use_fc3_and_fc4_respectively():
    async def main():
        async with modbus_server(device(1, hr={100: 11, 101: 12}, ir={100: 21, 102: 22})) as (_, port):
            return await read_once(port, cfg(
                ModbusRegister(100, "hr_a"), ModbusRegister(101, "hr_b"),
                ModbusRegister(100, "ir_a", register_type="input"),
                ModbusRegister(102, "ir_c", register_type="input"),
            ))

    result = asyncio.run(main())
    assert result.errors == []
    assert {s.raw_tag: (s.metric_name, s.value) for s in result.samples} == {
        "hr100": ("hr_a", 11.0), "hr101": ("hr_b", 12.0),
        "ir100": ("ir_a", 21.0), "ir102": ("ir_c", 22.0),
    }


def test_sample_carries_unit_and_poll_time_as_aware_utc_timestamp():
    async def main():
        async with modbus_server(device(1, hr={5: 3})) as (_, port):
            return await read_once(port, cfg(ModbusRegister(5, "temp", unit="degC")))

    before = dt.datetime.now(dt.timezone.utc)
    result = asyncio.run(main())
    (sample,) = result.samples
    assert sample.unit == "degC" and sample.metric_name == "temp" and sample.raw_tag == "hr5"
    assert sample.timestamp.tzinfo is not None and sample.timestamp.utcoffset() == dt.timedelta(0)
    assert before <= sample.timestamp <= dt.datetime.now(dt.timezone.utc)


def test_unit_id_selects_the_device_behind_the_connection():
    async def main():
        devices = [device(1, hr={0: 111}), device(7, hr={0: 777})]
        async with modbus_server(devices) as (_, port):
            return (await read_once(port, cfg(ModbusRegister(0, "v"), unit_id=7)),
                    await read_once(port, cfg(ModbusRegister(0, "v"), unit_id=1)))

    unit7, unit1 = asyncio.run(main())
    assert [s.value for s in unit7.samples] == [777.0]
    assert [s.value for s in unit1.samples] == [111.0]


def test_scale_and_offset_follow_the_contract_raw_times_scale_plus_offset():
    async def main():
        async with modbus_server(device(1, hr={0: 725, 1: 725})) as (_, port):
            return await read_once(port, cfg(
                ModbusRegister(0, "temp", scale=0.1),
                ModbusRegister(1, "temp_c", scale=0.1, offset=-40.0),
            ))

    values = {s.metric_name: s.value for s in asyncio.run(main()).samples}
    assert values["temp"] == pytest.approx(72.5)
    assert values["temp_c"] == pytest.approx(32.5)


def test_explicit_count_equal_to_the_type_width_is_accepted_and_read():
    regs = encode(-123456, "int32")

    async def main():
        async with modbus_server(device(1, hr={10: regs[0], 11: regs[1]})) as (_, port):
            return await read_once(port, cfg(ModbusRegister(10, "e", count=2, data_type="int32")))

    assert [s.value for s in asyncio.run(main()).samples] == [-123456.0]


TYPE_VALUES = {
    "int16": -12345, "uint16": 54321,
    "int32": -123456789, "uint32": 3_000_000_000, "float32": -3.1415927,
    "int64": -1_234_567_890_123, "uint64": 2**63 + 12345, "float64": -2.718281828459045,
}
ORDERS = [("big", "big"), ("little", "big"), ("big", "little"), ("little", "little")]


@pytest.mark.parametrize("byte_order,word_order", ORDERS)
@pytest.mark.parametrize("data_type", list(TYPE_VALUES))
def test_each_data_type_decodes_in_every_byte_and_word_order(data_type, byte_order, word_order):
    value = TYPE_VALUES[data_type]
    regs = encode(value, data_type, byte_order, word_order)
    # a neighbour on each side proves the value is cut from the right offset of a merged request
    hr = {20: 0xAAAA, **{21 + i: r for i, r in enumerate(regs)}, 21 + len(regs): 0x5555}

    async def main():
        async with modbus_server(device(1, hr=hr)) as (_, port):
            return await read_once(port, cfg(
                ModbusRegister(20, "before", data_type="uint16"),
                ModbusRegister(21, "x", data_type=data_type, byte_order=byte_order, word_order=word_order),
                ModbusRegister(21 + len(regs), "after", data_type="uint16"),
            ))

    result = asyncio.run(main())
    assert result.errors == []
    samples = {s.metric_name: s.value for s in result.samples}
    expected = struct.unpack(">f", struct.pack(">f", value))[0] if data_type == "float32" else float(value)
    assert samples == {"before": 0xAAAA, "x": expected, "after": 0x5555}


def test_same_registers_decoded_two_ways_with_duplicate_metric_names_give_two_samples():
    regs = encode(-2, "int32")

    async def main():
        async with modbus_server(device(1, hr={0: regs[0], 1: regs[1]})) as (_, port):
            return await read_once(port, cfg(
                ModbusRegister(0, "m", data_type="int32"),
                ModbusRegister(0, "m", data_type="uint32"),
                ModbusRegister(1, "m", data_type="uint16"),
            ))

    result = asyncio.run(main())
    assert sorted(s.value for s in result.samples) == [-2.0, 0xFFFE, 0xFFFFFFFE]


def test_nan_float_becomes_point_error_not_a_sample():
    regs = encode(float("nan"), "float32")

    async def main():
        async with modbus_server(device(1, hr={0: regs[0], 1: regs[1], 2: 9})) as (_, port):
            return await read_once(port, cfg(ModbusRegister(0, "f", data_type="float32"),
                                             ModbusRegister(2, "ok")))

    result = asyncio.run(main())
    assert [s.value for s in result.samples] == [9.0]
    assert [(e.raw_tag, e.metric_name) for e in result.errors] == [("hr0", "f")]
    assert "finite" in result.errors[0].message


# ------------------------------------------------------- request planning


def _regs(*specs):
    return [ModbusRegister(a, f"m{a}", data_type=t, register_type=rt) for a, t, rt in specs]


def test_plan_merges_adjacent_and_overlapping_registers_into_one_request():
    regs = _regs((12, "uint16", "holding"), (10, "int32", "holding"), (11, "uint16", "holding"),
                 (13, "float64", "holding"))
    assert plan_requests(regs) == [PlannedRequest("holding", 10, 7, (1, 2, 0, 3))]


def test_plan_does_not_read_across_unconfigured_gaps():
    regs = _regs((0, "uint16", "holding"), (2, "uint16", "holding"))
    assert plan_requests(regs) == [PlannedRequest("holding", 0, 1, (0,)),
                                   PlannedRequest("holding", 2, 1, (1,))]


def test_plan_keeps_holding_and_input_registers_in_separate_requests():
    regs = _regs((0, "uint16", "holding"), (1, "uint16", "input"), (1, "uint16", "holding"))
    assert plan_requests(regs) == [PlannedRequest("holding", 0, 2, (0, 2)),
                                   PlannedRequest("input", 1, 1, (1,))]


def test_plan_splits_at_125_registers():
    regs = [ModbusRegister(a, f"m{a}") for a in range(300)]
    plan = plan_requests(regs)
    assert [(p.address, p.count) for p in plan] == [(0, 125), (125, 125), (250, 50)]
    assert [i for p in plan for i in p.indices] == list(range(300))


def test_plan_never_splits_one_multi_register_value_across_requests():
    regs = [ModbusRegister(a, f"m{a}", data_type="float32") for a in range(0, 126, 2)]  # 0..125
    plan = plan_requests(regs)
    assert [(p.address, p.count) for p in plan] == [(0, 124), (124, 2)]


def test_reader_reads_split_requests_and_gapped_registers_from_a_real_device():
    hr = {a: a for a in range(200)}
    hr[201] = None  # device rejects 201; the gap between 199 and 202 is never read
    hr[202] = 202

    async def main():
        async with modbus_server(device(1, hr=hr)) as (_, port):
            regs = [ModbusRegister(a, f"m{a}") for a in range(200)] + [ModbusRegister(202, "m202")]
            return await read_once(port, cfg(*regs))

    result = asyncio.run(main())
    assert result.errors == []
    assert sorted(s.value for s in result.samples) == [float(a) for a in range(200)] + [202.0]


# ---------------------------------------------------- partial failures


def test_modbus_exception_on_one_register_is_only_that_registers_point_error():
    async def main():
        async with modbus_server(device(1, hr={10: 1, 11: None, 12: 3})) as (_, port):
            return await read_once(port, cfg(ModbusRegister(10, "a"), ModbusRegister(11, "b"),
                                             ModbusRegister(12, "c")))

    result = asyncio.run(main())
    assert {s.raw_tag: s.value for s in result.samples} == {"hr10": 1.0, "hr12": 3.0}
    (err,) = result.errors
    assert (err.raw_tag, err.metric_name) == ("hr11", "b")
    assert err.message == "Modbus exception 2 (Illegal Data Address) reading holding register 11 on unit 1"


def test_modbus_exception_for_a_lone_input_register_names_the_register_range():
    async def main():
        async with modbus_server(device(1, hr={0: 0}, ir={0: 5})) as (_, port):
            return await read_once(port, cfg(ModbusRegister(300, "x", register_type="input",
                                                            data_type="float32"), unit_id=1))

    (err,) = asyncio.run(main()).errors
    assert err.raw_tag == "ir300"
    assert "Illegal Data Address" in err.message and "input registers 300-301" in err.message


# ---------------------------------------------------- connection failures


def test_refused_port_raises_reader_error_mentioning_refused_and_address():
    port = free_port()

    async def main():
        reader = ModbusReader(HOST, port, cfg(ModbusRegister(0, "x")))
        with pytest.raises(ReaderError) as exc:
            await reader.connect()
        await reader.close()
        return str(exc.value)

    message = asyncio.run(main())
    assert "refused" in message and f"{HOST}:{port}" in message


def test_read_before_connect_raises_reader_error_and_close_never_raises():
    async def main():
        reader = ModbusReader(HOST, 1, cfg(ModbusRegister(0, "x")))
        await reader.close()
        with pytest.raises(ReaderError, match="not connected"):
            await reader.read()
        await reader.close()
        await reader.close()

    asyncio.run(main())


def modbus_answer(request: bytes, value: int) -> bytes:
    """A Modbus TCP answer of one register to ``request`` (FC3 or FC4)."""
    tid, unit, fc = request[0:2], request[6], request[7]
    return tid + b"\x00\x00\x00\x05" + bytes([unit, fc, 2]) + value.to_bytes(2, "big")


def test_silent_server_raises_reader_error_naming_the_timeout_once_it_has_passed():
    """A device that takes the request and does not answer: the read fails
    naming the timeout, after one request (no retries hidden in the wait).
    It did wait: a reader with a longer timeout, asked first, is still
    waiting then, and reads the answer that comes after."""
    async def main():
        asked: dict[int, list[bytes]] = {}  # connection number -> requests
        writers = []

        async def silent(reader, writer):
            n = len(writers)
            writers.append(writer)
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(1024):
                    asked.setdefault(n, []).append(data)

        server = await asyncio.start_server(silent, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        patient = ModbusReader(HOST, port, cfg(ModbusRegister(0, "x"), timeout=30))
        short = ModbusReader(HOST, port, cfg(ModbusRegister(0, "x"), timeout=0.3))
        try:
            await patient.connect()  # connection 0
            await short.connect()    # connection 1
            waiting = asyncio.create_task(patient.read())
            with pytest.raises(ReaderError) as exc:
                await asyncio.wait_for(short.read(), 10)
            still_waiting = not waiting.done()
            await until(lambda: 0 in asked)
            writers[0].write(modbus_answer(asked[0][0], 42))
            late = await asyncio.wait_for(waiting, 10)
        finally:
            await patient.close()
            await short.close()
            for writer in writers:
                writer.close()
            server.close()
            await server.wait_closed()
        return str(exc.value), port, len(asked.get(1, [])), still_waiting, late

    message, port, requests, still_waiting, late = asyncio.run(main())
    assert message == f"no response from {HOST}:{port} within 0.3 s (unit 1)"
    assert requests == 1
    assert still_waiting, "the reader with a 30 s timeout had given up when the 0.3 s one did"
    assert [s.value for s in late.samples] == [42.0]


def test_device_that_goes_away_fails_the_read_and_reads_again_only_after_close_and_connect():
    async def main():
        dev = device(1, hr={0: 42})
        async with modbus_server(dev) as (_, port):
            reader = ModbusReader(HOST, port, cfg(ModbusRegister(0, "x"), timeout=0.5))
            await reader.connect()
            first = await reader.read()
            # A pymodbus client left to reconnect by itself (as the library
            # would): the clock for "ours would have reconnected by now".
            reconnecting = AsyncModbusTcpClient(HOST, port=port, retries=0, reconnect_delay=0.1,
                                                reconnect_delay_max=0.2)
            assert await reconnecting.connect()
        with pytest.raises(ReaderError) as gone:
            await reader.read()
        await reader.close()
        with pytest.raises(ReaderError, match="refused"):
            await reader.connect()
        await until(lambda: not reconnecting.connected)
        async with modbus_server(dev, port=port):
            await until(lambda: reconnecting.connected)
            reconnecting.close()
            with pytest.raises(ReaderError, match="connect"):
                await reader.read()
            await reader.close()
            await reader.connect()
            again = await reader.read()
            await reader.close()
        return first, str(gone.value), again, port

    first, gone, again, port = asyncio.run(main())
    assert [s.value for s in first.samples] == [42.0]
    assert gone == f"connection to {HOST}:{port} lost - the device closed it or went away"
    assert [s.value for s in again.samples] == [42.0]


# ---------------------------------------------------------- validation


def test_validation_rejects_non_finite_scale_naming_the_path():
    config = cfg(ModbusRegister(0, "a"), ModbusRegister(1, "b"), ModbusRegister(2, "c", scale=float("inf")))
    with pytest.raises(ValueError, match=r"^registers\[2\]\.scale: must be a finite number$"):
        validate_modbus_config(config)


def test_validation_rejects_nan_offset_naming_the_path():
    with pytest.raises(ValueError, match=r"^registers\[0\]\.offset: must be a finite number$"):
        validate_modbus_config(cfg(ModbusRegister(0, "a", offset=float("nan"))))


def test_validation_rejects_count_that_does_not_fit_the_data_type():
    with pytest.raises(ValueError) as exc:
        validate_modbus_config(cfg(ModbusRegister(0, "a", count=1, data_type="int32")))
    assert str(exc.value) == "registers[0].count: 1 does not fit data_type int32, which takes 2 registers"


def test_validation_rejects_value_running_past_the_last_address():
    validate_modbus_config(cfg(ModbusRegister(65535, "ok")))
    with pytest.raises(ValueError, match=r"^registers\[1\]\.address: 65534 "):
        validate_modbus_config(cfg(ModbusRegister(0, "a"), ModbusRegister(65534, "b", data_type="float64")))


def test_reader_refuses_an_invalid_config():
    with pytest.raises(ValueError, match=r"registers\[0\]\.count"):
        ModbusReader(HOST, 502, cfg(ModbusRegister(0, "a", count=3)))


def test_wire_config_decodes_with_documented_defaults_and_rejects_unknown_fields():
    config = msgspec.json.decode(b'{"registers": [{"address": 100, "metric_name": "t"}]}', type=ModbusConfig)
    assert (config.unit_id, config.timeout_seconds) == (1, 3.0)
    (reg,) = config.registers
    assert (reg.count, reg.register_type, reg.data_type, reg.byte_order, reg.word_order,
            reg.scale, reg.offset, reg.unit) == (None, "holding", "int16", "big", "big", 1.0, 0.0, None)
    with pytest.raises(msgspec.ValidationError, match=r"registers\[0\]"):
        msgspec.json.decode(b'{"registers": [{"address": 1, "metric_name": "t", "slave": 2}]}',
                            type=ModbusConfig)
    with pytest.raises(msgspec.ValidationError, match=r"registers\[0\]\.address"):
        msgspec.json.decode(b'{"registers": [{"address": 70000, "metric_name": "t"}]}', type=ModbusConfig)
