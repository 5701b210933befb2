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
from typing import Any, Dict, List

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


def peer_pid(sock: socket.socket) -> int:
    """The connecting process's pid, translated by the kernel into our PID namespace."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


def unix_address(path: str) -> str:
    """'@name' is Linux's abstract namespace (no file), as used by spawned sidecars."""
    return "\0" + path[1:] if path.startswith("@") else path
