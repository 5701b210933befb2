"""The OTEP 4719 process context's bytes: a header in a mapping named OTEL_CTX,
pointing to a ProcessContext protobuf message with the app's resource.

Encoded and decoded by hand here (opentelemetry-proto's common.proto field
numbers) so that the app needs no protobuf runtime. Stdlib only: the traced app
imports this (otel_gil/app/process_context.py publishes it).
"""

from __future__ import annotations

import struct
from typing import Any, Iterator, Mapping

__all__ = [
    "PROCESS_CTX_SIGNATURE",
    "PROCESS_CTX_VERSION",
    "decode_process_context",
    "encode_process_context",
]

PROCESS_CTX_SIGNATURE = b"OTEL_CTX"
PROCESS_CTX_VERSION = 2
PROCESS_HEADER = struct.Struct("<8sIIQQ")  # signature, version, payload_size, published_at, ptr
TS_OFFSET = 16  # published_at, within PROCESS_HEADER


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _len_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _any_value(value: object) -> bytes:
    """opentelemetry.proto.common.v1.AnyValue (common.proto field numbers)."""
    if isinstance(value, bool):  # before int: bool is an int
        return _varint(2 << 3) + _varint(int(value))
    if isinstance(value, int):  # int64: negative values as 64-bit two's complement
        return _varint(3 << 3) + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return _varint(4 << 3 | 1) + struct.pack("<d", value)
    if isinstance(value, bytes):
        return _len_field(7, value)
    if isinstance(value, (list, tuple)):  # ArrayValue{repeated AnyValue values = 1}
        return _len_field(5, b"".join(_len_field(1, _any_value(v)) for v in value))
    return _len_field(1, str(value).encode("utf-8"))


def encode_process_context(attributes: Mapping[str, object]) -> bytes:
    """ProcessContext{Resource resource = 1}, Resource{repeated KeyValue attributes = 1},
    KeyValue{string key = 1; AnyValue value = 2}, encoded by hand so the app needs
    no protobuf runtime."""
    resource = b"".join(
        _len_field(1, _len_field(1, key.encode("utf-8")) + _len_field(2, _any_value(value)))
        for key, value in attributes.items())
    return _len_field(1, resource)


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def _decode_any(data: bytes) -> object:
    for number, _, value in _fields(data):
        if number == 1:
            return bytes(value).decode("utf-8", "replace")
        if number == 2:
            return bool(value)
        if number == 3:
            return value - (1 << 64) if value >> 63 else value
        if number == 4:
            return struct.unpack("<d", value)[0]
        if number == 5:
            return [_decode_any(v) for n, _, v in _fields(value) if n == 1]
        if number == 7:
            return bytes(value)
    return None


def decode_process_context(payload: bytes) -> dict[str, object]:
    """The resource attributes of an encoded ProcessContext."""
    attributes: dict[str, object] = {}
    for number, _, resource in _fields(payload):
        if number != 1:
            continue
        for field, _, key_value in _fields(resource):
            if field != 1:
                continue
            parts = {n: v for n, _, v in _fields(key_value)}
            attributes[bytes(parts.get(1, b"")).decode("utf-8", "replace")] = \
                _decode_any(parts.get(2, b""))
    return attributes
