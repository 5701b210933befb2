"""The app's resource as an OTEP 4719 process context.

The traced app publishes its resource attributes (:func:`publish_process_context`)
in a mapping named OTEL_CTX; the sidecar finds that mapping in /proc/PID/maps and
reads it back (:func:`read_process_context`) to export under the app's own
resource. The payload is a ProcessContext protobuf message, encoded and decoded
by hand here so that the app needs no protobuf runtime.

The publishing half runs *inside the traced app* (Python 3.8+, stdlib only) and
must never raise into the app.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Any, Iterator, Mapping

from otel_gil.app.context import buffer_address, name_mapping, read_memory
from otel_gil.errors import TargetError

__all__ = [
    "PROCESS_CTX_SIGNATURE",
    "PROCESS_CTX_VERSION",
    "decode_process_context",
    "encode_process_context",
    "publish_process_context",
    "read_process_context",
]

PROCESS_CTX_SIGNATURE = b"OTEL_CTX"
PROCESS_CTX_VERSION = 2
_PROCESS_HEADER = struct.Struct("<8sIIQQ")  # signature, version, payload_size, published_at, ptr
_TS_OFFSET = 16
_process_mm: mmap.mmap | None = None


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


def _new_process_mapping(size: int) -> mmap.mmap:
    """memfd_create("OTEL_CTX") mapping, else an anonymous one (OTEP 4719 steps 2-5)."""
    try:
        fd = os.memfd_create("OTEL_CTX", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
    except (AttributeError, OSError):  # no memfd (seccomp, old kernel)
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    try:  # a forked child must not expose its parent's resource (service.instance.id)
        mm.madvise(mmap.MADV_DONTFORK)
    except (AttributeError, OSError):
        pass
    return mm


def publish_process_context(resource: Any) -> None:
    """Publish ``resource.attributes`` (an opentelemetry Resource) as the process's
    OTEP 4719 context; republishing updates it in place. Never raises."""
    global _process_mm
    try:
        payload = encode_process_context(dict(resource.attributes))
        needed = _PROCESS_HEADER.size + len(payload)
        mm = _process_mm
        if mm is not None and needed > len(mm):
            mm[_TS_OFFSET:_TS_OFFSET + 8] = bytes(8)  # readers mid-read retry, then move on
            mm[0:8] = bytes(8)
            mm.close()
            mm = None
        if mm is None:
            mm = _new_process_mapping(-(-needed // mmap.PAGESIZE) * mmap.PAGESIZE)
        address = buffer_address(mm)
        # Updating protocol: timestamp 0 first, then payload and fields, then the
        # signature (new mappings), and the timestamp last. Readers re-check the
        # timestamp after reading. Stores from one thread reach other CPUs in
        # order on x86-64 (TSO); elsewhere the re-check makes a torn read a retry.
        mm[_TS_OFFSET:_TS_OFFSET + 8] = bytes(8)
        mm[_PROCESS_HEADER.size:needed] = payload
        struct.pack_into("<IIQQ", mm, 8, PROCESS_CTX_VERSION, len(payload), 0,
                         address + _PROCESS_HEADER.size)
        mm[0:8] = PROCESS_CTX_SIGNATURE
        struct.pack_into("<Q", mm, _TS_OFFSET,
                         max(1, time.clock_gettime_ns(time.CLOCK_BOOTTIME)))
        name_mapping(address, len(mm), PROCESS_CTX_SIGNATURE)  # fails on memfd: fine
        _process_mm = mm
    except Exception:  # noqa: BLE001, S110 - the app must start whatever happens here
        pass


def _process_ctx_mappings(pid: int) -> list[int]:
    starts = []
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                name = parts[5].strip() if len(parts) == 6 else ""
                if name.startswith("/memfd:OTEL_CTX") or name in (
                        "[anon_shmem:OTEL_CTX]", "[anon:OTEL_CTX]"):
                    starts.append(int(parts[0].split("-")[0], 16))
    except OSError as err:
        raise TargetError(f"cannot read /proc/{pid}/maps: {err}",
                          "check the pid, and run as root or as the same user") from err
    return starts


def read_process_context(pid: int, attempts: int = 8) -> dict[str, object]:
    """The resource attributes process pid published (OTEP 4719 reading protocol);
    {} when it published none."""
    for start in _process_ctx_mappings(pid):
        for _ in range(attempts):
            header = read_memory(pid, start, _PROCESS_HEADER.size)
            signature, version, size, stamp, pointer = _PROCESS_HEADER.unpack(header)
            if signature != PROCESS_CTX_SIGNATURE or version != PROCESS_CTX_VERSION:
                break
            if stamp == 0:  # being written
                time.sleep(0.001)
                continue
            payload = read_memory(pid, pointer, size)
            if read_memory(pid, start + _TS_OFFSET, 8) == header[_TS_OFFSET:_TS_OFFSET + 8]:
                try:
                    return decode_process_context(payload)
                except (ValueError, IndexError, struct.error):
                    break
    return {}
