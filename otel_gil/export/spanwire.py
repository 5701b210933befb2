"""GIL spans straight to OTLP protobuf bytes, without the SDK's span objects (runs in the sidecar).

The sidecar emits hundreds of `gil.wait` spans a second under contention, each
with up to 16 holder links. Going through the SDK (Tracer.start_span, then the
OTLP encoder building one protobuf object per attribute, value and link) cost
~0.8 ms of CPU per span here. Here a span is written as protobuf wire format
directly (varints and length-delimited fields, opentelemetry/proto/trace/v1/
trace.proto and common/v1/common.proto), with the parts that repeat from span
to span cached: attribute keys, thread names, and whole holder links (a hold
overlaps many concurrent waits, and a hold inside a wait is linked with the
same span and duration each time). bench/README.md has the figures.

The bytes parse to exactly what opentelemetry-exporter-otlp-proto-common's
encode_spans() produces for the same span (tests/test_pipeline.py checks it):
kind INTERNAL, status unset, the remote-parent flags of the SDK's _span_flags().
A queued span is its serialized Span message; a request is those bytes framed
as ExportTraceServiceRequest > ResourceSpans > ScopeSpans.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Dict, Mapping, NamedTuple, Sequence, Union

from opentelemetry.proto.trace.v1 import trace_pb2

AttrValue = Union[bool, int, float, str, Sequence[Any]]

# trace.proto: SpanFlags (the parent and the links are remote span contexts), SpanKind.
_FLAGS = struct.pack("<I", trace_pb2.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
                     | trace_pb2.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK)
_KIND_INTERNAL = trace_pb2.Span.SPAN_KIND_INTERNAL
_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
_SMALL = tuple(bytes((i,)) for i in range(128))
_CACHE_MAX = 4096  # entries per cache below; each is cleared when full


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte(s), the length, the payload."""
    return tag + _varint(len(payload)) + payload


def _field(number: int, payload: bytes) -> bytes:
    return _ld(_varint(number << 3 | 2), payload)


# Serialized AnyValues of the ints and strings seen last (thread ids and names,
# pids, durations of holds that recur), and the same as ArrayValue elements.
_values: Dict[Union[int, str], bytes] = {}
_elements: Dict[Union[int, str], bytes] = {}


def _scalar(value: Union[int, str]) -> bytes:
    hit = _values.get(value)
    if hit is None:
        if type(value) is int:
            hit = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64, two's complement
        else:
            hit = _ld(b"\x0a", str(value).encode())
        if len(_values) >= _CACHE_MAX:
            _values.clear()
        _values[value] = hit
    return hit


def _element(value: Any) -> bytes:
    """An ArrayValue.values (1) entry."""
    if type(value) is int or type(value) is str:
        hit = _elements.get(value)
        if hit is None:
            if len(_elements) >= _CACHE_MAX:
                _elements.clear()
            hit = _elements[value] = _ld(b"\x0a", _scalar(value))
        return hit
    return _ld(b"\x0a", any_value(value))


def any_value(value: Any) -> bytes:
    """A serialized AnyValue (common.proto): string 1, bool 2, int 3, double 4,
    array 5 (ArrayValue.values 1). Exact types first (the hot path), then
    subclasses; bool before int, as bool is an int in Python."""
    kind = type(value)
    if kind is int or kind is str:
        return _scalar(value)
    if kind is list or kind is tuple:
        # _element's cache hit inlined: a span's holder arrays are ~50 elements
        get, parts = _elements.get, []
        for v in value:
            hit = get(v) if type(v) is int or type(v) is str else None
            parts.append(hit if hit is not None else _element(v))
        return _ld(b"\x2a", b"".join(parts))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, (int, str)):
        return _scalar(int(value) if isinstance(value, int) else str(value))
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, (list, tuple)):
        return _ld(b"\x2a", b"".join([_element(v) for v in value]))
    raise TypeError(f"unsupported attribute value {value!r}")


_keys: Dict[str, bytes] = {}


def key_value(key: str, value: Any) -> bytes:
    """A serialized KeyValue: key 1, value 2."""
    prefix = _keys.get(key)
    if prefix is None:
        prefix = _keys[key] = _ld(b"\x0a", key.encode())
    return prefix + _ld(b"\x12", any_value(value))


class LinkEncoder:
    """Span.links (13) entries: Link{trace_id 1, span_id 2, attributes 4, flags 6}
    whose attributes are the same on every link but one int (a holder link:
    role "holder", held_ns), the constant part encoded once."""

    def __init__(self, constant: Mapping[str, Any], int_key: str) -> None:
        self._constant = b"".join([_ld(b"\x22", key_value(k, v)) for k, v in constant.items()])
        self._key = _ld(b"\x0a", int_key.encode()) + b"\x12"

    def encode(self, trace_id: int, span_id: int, value: int, extra: bytes = b"") -> bytes:
        """extra: more attributes of this link, from link_attributes()."""
        any_int = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
        kv = self._key + _SMALL[len(any_int)] + any_int  # an int AnyValue is < 128 bytes
        body = (b"\x0a\x10" + trace_id.to_bytes(16, "big") + b"\x12\x08"
                + span_id.to_bytes(8, "big") + self._constant + _ld(b"\x22", kv) + extra
                + b"\x35" + _FLAGS)
        return _ld(b"\x6a", body)


class SpanData(NamedTuple):
    """One span the sidecar decided to emit; the parent and the links are remote
    span contexts read from the app. links: LinkEncoder results. (A NamedTuple:
    one is made per event.)"""

    name: str
    trace_id: int
    span_id: int
    parent_span_id: int
    start_ns: int  # wall clock
    end_ns: int
    attributes: Mapping[str, AttrValue]
    links: Sequence[bytes] = ()
    encoded_attributes: bytes = b""  # encode_attributes() of more, placed first

    def encode(self) -> bytes:
        """The serialized OTLP Span message (fields in trace.proto's numbering)."""
        parts = [b"\x0a\x10", self.trace_id.to_bytes(16, "big"),
                 b"\x12\x08", self.span_id.to_bytes(8, "big"),
                 b"\x22\x08", self.parent_span_id.to_bytes(8, "big"),
                 _ld(b"\x2a", self.name.encode()), b"\x30", _SMALL[_KIND_INTERNAL],
                 b"\x39", _FIXED64(self.start_ns), b"\x41", _FIXED64(self.end_ns)]
        parts.append(self.encoded_attributes)
        parts += [_ld(b"\x4a", key_value(k, v)) for k, v in self.attributes.items()]
        parts += self.links
        parts += [b"\x7a\x00", b"\x85\x01", _FLAGS]  # status {} (unset); flags (16, fixed32)
        return b"".join(parts)


def link_attributes(attributes: Mapping[str, Any]) -> bytes:
    """Link.attributes (4) entries, for LinkEncoder.encode's extra."""
    return b"".join([_ld(b"\x22", key_value(k, v)) for k, v in attributes.items()])


def encode_attributes(attributes: Mapping[str, Any]) -> bytes:
    """Span.attributes (9) entries, for SpanData.encoded_attributes."""
    return b"".join([_ld(b"\x4a", key_value(k, v)) for k, v in attributes.items()])


def encode_resource(attributes: Mapping[str, Any]) -> bytes:
    """A serialized Resource (resource.proto): attributes 1."""
    return b"".join([_ld(b"\x0a", key_value(k, v)) for k, v in attributes.items()])


def encode_scope(name: str, version: str = "") -> bytes:
    """A serialized InstrumentationScope (common.proto): name 1, version 2."""
    return _ld(b"\x0a", name.encode()) + (_ld(b"\x12", version.encode()) if version else b"")


# ----------------------------------------------------------------- framing


@dataclass(frozen=True)
class ResourceGroup:
    """The spans of one resource (one traced process), all under one scope."""

    resource: bytes  # a serialized Resource
    schema_url: str
    scope: bytes  # a serialized InstrumentationScope
    spans: Sequence[bytes]  # serialized Spans


def encode_request(groups: Sequence[ResourceGroup]) -> bytes:
    """A serialized ExportTraceServiceRequest (collector/trace/v1/trace_service.proto):
    resource_spans = 1; ResourceSpans: resource = 1, scope_spans = 2, schema_url = 3;
    ScopeSpans: scope = 1, spans = 2."""
    out = []
    for g in groups:
        scope_spans = _field(1, g.scope) + b"".join(_field(2, s) for s in g.spans)
        body = _field(1, g.resource) + _field(2, scope_spans)
        if g.schema_url:
            body += _field(3, g.schema_url.encode())
        out.append(_field(1, body))
    return b"".join(out)
