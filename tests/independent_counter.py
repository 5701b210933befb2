"""An independent count of take_gil entries, for checking otel-gil's numbers.

Deliberately not otel-gil's program or loader: a minimal BCC program with one
counter, attached to the same take_gil entry addresses for one pid.
"""

from __future__ import annotations

import ctypes
from typing import Any

from otel_gil.discovery import Target
from otel_gil.probes import proc_path

PROGRAM = r"""
BPF_ARRAY(hits, u64, 1);
int count(void *ctx) {
    int zero = 0;
    u64 *n = hits.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""


class TakeGilCounter:
    def __init__(self, target: Target) -> None:
        import bcc  # noqa: PLC0415

        self._bpf: Any = bcc.BPF(text=PROGRAM.encode())
        for fn in target.interpreter.take_gil:
            self._bpf.attach_uprobe(name=proc_path(target.pid, target.object_path), addr=fn.address,
                                    fn_name=b"count", pid=target.pid)

    @property
    def hits(self) -> int:
        return int(self._bpf["hits"][ctypes.c_int(0)].value)

    def close(self) -> None:
        self._bpf.cleanup()
