"""The config of a Modbus TCP source (the ``config`` of an ingest source, and
``[source.modbus]`` of the edge agent's TOML): the msgspec types, their
defaults and the checks msgspec cannot express. Data only: no device
library is imported here (the reader is ``pollers/modbus.py``).

Defaults: ``unit_id`` 1, ``timeout_seconds`` 3.0; per register
``register_type`` "holding", ``data_type`` "int16", ``byte_order`` and
``word_order`` "big", ``scale`` 1.0, ``offset`` 0.0, ``count`` the width of
``data_type`` (16-bit types 1 register, 32-bit 2, 64-bit 4; an explicit
``count`` must equal that width).

    actual_value = raw_value * scale + offset

``byte_order`` is the order of the 2 bytes inside each register, ``word_order``
the order of the registers of a multi-register value. For a 32-bit value with
bytes A B C D (A most significant) the device holds: big/big [AB, CD],
byte little [BA, DC], word little [CD, AB], both little [DC, BA].

raw_tag: ``hr<address>`` for a holding register, ``ir<address>`` for an input
register, the start address in decimal (``hr100``, ``ir102``).
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

DataType = Literal["int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64"]

# data_type -> (registers, struct format character)
DATA_TYPES: dict[str, tuple[int, str]] = {
    "int16": (1, "h"), "uint16": (1, "H"),
    "int32": (2, "i"), "uint32": (2, "I"), "float32": (2, "f"),
    "int64": (4, "q"), "uint64": (4, "Q"), "float64": (4, "d"),
}


class ModbusRegister(msgspec.Struct, forbid_unknown_fields=True):
    address: Annotated[int, Meta(ge=0, le=65535)]
    metric_name: Annotated[str, Meta(min_length=1, max_length=200)]
    count: Annotated[int, Meta(ge=1, le=125)] | None = None
    register_type: Literal["holding", "input"] = "holding"
    unit: Annotated[str, Meta(max_length=64)] | None = None
    scale: float = 1.0
    offset: float = 0.0
    data_type: DataType = "int16"
    byte_order: Literal["big", "little"] = "big"
    word_order: Literal["big", "little"] = "big"


class ModbusConfig(msgspec.Struct, forbid_unknown_fields=True):
    registers: Annotated[list[ModbusRegister], Meta(min_length=1, max_length=1000)]
    unit_id: Annotated[int, Meta(ge=0, le=255)] = 1
    timeout_seconds: Annotated[float, Meta(gt=0, le=60)] = 3.0


def register_width(data_type: str) -> int:
    """Number of 16-bit registers a value of ``data_type`` occupies."""
    return DATA_TYPES[data_type][0]


def raw_tag(register: ModbusRegister) -> str:
    return ("hr" if register.register_type == "holding" else "ir") + str(register.address)


def validate_modbus_config(cfg: ModbusConfig) -> None:
    """Cross-field checks msgspec cannot express; ValueError names the path."""
    for i, reg in enumerate(cfg.registers):
        path = f"registers[{i}]"
        for name in ("scale", "offset"):
            if not math.isfinite(getattr(reg, name)):
                raise ValueError(f"{path}.{name}: must be a finite number")
        width = register_width(reg.data_type)
        if reg.count is not None and reg.count != width:
            raise ValueError(
                f"{path}.count: {reg.count} does not fit data_type {reg.data_type}, "
                f"which takes {width} register{'s' if width > 1 else ''}"
            )
        if reg.address + width - 1 > 65535:
            raise ValueError(
                f"{path}.address: {reg.address} + {width} registers of {reg.data_type} "
                "runs past the last register address 65535"
            )
