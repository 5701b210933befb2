"""An independent count of take_gil entries, for checking otel-gil's numbers.

Deliberately not otel-gil's program or loader: a minimal BCC program with one
counter, attached to the same take_gil entry addresses for one pid.
"""

from __future__ import annotations

import ctypes
from typing import Any

from otel_gil.target.process import Target
from otel_gil.target.procfs import under_root as proc_path

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


class HitCounter:
    """Hits of uprobes at given addresses of one object, for one pid, counted
    per address by a minimal program of its own (not otel-gil's)."""

    PROGRAM = r"""
#include <uapi/linux/ptrace.h>
BPF_HASH(hits, u64, u64, 64);
int count(struct pt_regs *ctx) {
    u64 ip = PT_REGS_IP(ctx);
    u64 zero = 0, *n = hits.lookup_or_try_init(&ip, &zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""

    def __init__(self, pid: int, path: str, addresses: list[int]) -> None:
        import bcc  # noqa: PLC0415

        self._bpf: Any = bcc.BPF(text=self.PROGRAM.encode())
        for addr in addresses:
            self._bpf.attach_uprobe(name=path, addr=addr, fn_name=b"count", pid=pid)

    @property
    def total(self) -> int:
        return sum(int(v.value) for v in self._bpf["hits"].values())

    def close(self) -> None:
        self._bpf.cleanup()
