"""The app <-> sidecar wire protocol: one JSON object per line over a Unix stream socket.

app -> sidecar, once per process:
    {"op": "register", "version": 1, "pid": <pid as the app sees it>,
     "ctx_table": <address>, "ctx_slots": <n>, "resource": {<attribute>: <value>}}
sidecar -> app, when the probes are live (or not):
    {"ok": true, "host_pid": <pid in the sidecar's namespace>}
    {"ok": false, "error": "<one line>"}
The app keeps the connection open for its lifetime; the sidecar detaches when
it closes. The sidecar trusts only the kernel's SO_PEERCRED for who is asking:
a process can ask to be traced, never to trace another.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

VERSION = 1
MAX_MESSAGE = 64 * 1024


def encode(message: Dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class LineReader:
    """Accumulates bytes from a socket into complete JSON lines."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> List[Dict[str, Any]]:
        self._buf += data
        if len(self._buf) > MAX_MESSAGE:
            raise ValueError("message too long")
        lines = self._buf.split(b"\n")
        self._buf = lines.pop()
        out = []
        for line in lines:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError("message is not a JSON object")
            out.append(msg)
        return out


def read_message(sock: socket.socket, timeout: float) -> Dict[str, Any]:
    """Block for one message (raises OSError/ValueError on EOF, timeout or garbage)."""
    sock.settimeout(timeout)
    reader = LineReader()
    while True:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("connection closed")
        msgs = reader.feed(data)
        if msgs:
            return msgs[0]


def peer_credentials(sock: socket.socket) -> Tuple[int, int]:
    """(pid, uid) of the process at the other end, from the kernel (SO_PEERCRED),
    translated into our PID and user namespaces. Never what the peer claims."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


def peer_pid(sock: socket.socket) -> int:
    """The connecting process's pid, translated by the kernel into our PID namespace."""
    return peer_credentials(sock)[0]


def unix_address(path: str) -> str:
    """'@name' is Linux's abstract namespace (no file), as used by spawned sidecars."""
    return "\0" + path[1:] if path.startswith("@") else path


# Bounds on what one registration may carry: anything larger is refused.
MAX_SLOTS = 1 << 16
MAX_ADDRESS = 1 << 47  # x86-64 user space
MAX_RESOURCE_ATTRIBUTES = 128
MAX_KEY = 256
MAX_VALUE = 4096
MAX_ARRAY = 64


@dataclass(frozen=True)
class Registration:
    """A validated register message. Everything in it is the app's claim, so
    untrusted: the sidecar checks `pid` against the kernel's SO_PEERCRED and
    reads the table only in that process (docs/security.md)."""

    pid: Optional[int]
    ctx_table: int
    ctx_slots: int
    resource: Dict[str, Any]
    token: str = ""  # a forked worker's admission to its app's private sidecar


class BadRegistration(ValueError):
    """A register message that does not have the documented shape."""


def parse_registration(msg: Dict[str, Any]) -> Registration:
    if msg.get("op") != "register":
        raise BadRegistration("expected one register message")
    pid = msg.get("pid")
    if pid is not None and not _int_in(pid, 1, 1 << 31):
        raise BadRegistration("pid must be a positive integer")
    table = msg.get("ctx_table") or 0
    slots = msg.get("ctx_slots") or 0
    if not _int_in(table, 0, MAX_ADDRESS) or not _int_in(slots, 0, MAX_SLOTS):
        raise BadRegistration("ctx_table must be a user-space address and ctx_slots "
                              f"at most {MAX_SLOTS}")
    if table and (slots == 0 or slots & (slots - 1)):
        raise BadRegistration("ctx_slots must be a power of two")
    token = msg.get("token") or ""
    if not isinstance(token, str) or len(token) > 128:
        raise BadRegistration("token must be a short string")
    return Registration(pid, table, slots if table else 0, _resource(msg.get("resource")), token)


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _resource(raw: Any) -> Dict[str, Any]:
    """OpenTelemetry attribute values only: str, bool, int, float, or a list of one of them."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_RESOURCE_ATTRIBUTES:
        raise BadRegistration(f"resource must be an object of at most "
                              f"{MAX_RESOURCE_ATTRIBUTES} attributes")
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY:
            raise BadRegistration("resource attribute names must be short strings")
        items = value if isinstance(value, list) else [value]
        if len(items) > MAX_ARRAY or len({type(v) for v in items}) > 1 or \
                not all(_scalar(v) for v in items):
            raise BadRegistration(f"resource attribute {key[:40]!r} has an unsupported value")
        out[key] = value
    return out


def _scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_VALUE
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    return isinstance(value, (bool, int)) and (isinstance(value, bool) or -2**63 <= value < 2**63)
