"""Reading an app's OTEP 4719 process context back from outside, as a reader
following the OTEP would: the tests' check of what otel_gil/app/process_context.py
publishes (otel-gil's sidecar gets the resource in the registration instead)."""

from __future__ import annotations

import struct
import time

from otel_gil.abi.process_context import (
    PROCESS_CTX_SIGNATURE,
    PROCESS_CTX_VERSION,
    PROCESS_HEADER,
    TS_OFFSET,
    decode_process_context,
)
from otel_gil.errors import TargetError
from otel_gil.target.procfs import read_memory


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
            header = read_memory(pid, start, PROCESS_HEADER.size)
            signature, version, size, stamp, pointer = PROCESS_HEADER.unpack(header)
            if signature != PROCESS_CTX_SIGNATURE or version != PROCESS_CTX_VERSION:
                break
            if stamp == 0:  # being written
                time.sleep(0.001)
                continue
            payload = read_memory(pid, pointer, size)
            if read_memory(pid, start + TS_OFFSET, 8) == header[TS_OFFSET:TS_OFFSET + 8]:
                try:
                    return decode_process_context(payload)
                except (ValueError, IndexError, struct.error):
                    break
    return {}
