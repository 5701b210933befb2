"""The BPF side: compile bpf/gil.bpf.c, attach it to targets, read what it saw.

This is the only module that imports ``bcc`` (the OS's python3-bpfcc). Every
step (compile, configure, attach, poll, detach) fails with one ProbeError that
says what to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

from otel_gil.abi import events
from otel_gil.abi.slots import TableLocation
from otel_gil.errors import EnvironmentProblem, ProbeError
from otel_gil.probes.config import ProbeConfig, bpf_dir
from otel_gil.probes.holders import mark_target, stack_config, target_config
from otel_gil.probes.points import PROBE_FUNCTIONS, Point, in_attach_order, plan
from otel_gil.probes.tids import HostTids
from otel_gil.probes.totals import holder_totals
from otel_gil.stacks.store import StackStore
from otel_gil.target import procfs

if TYPE_CHECKING:
    from otel_gil.target.process import Target

STACK_KIND = struct.pack("<I", events.GIL_EVENT_STACK)  # a ring record that is a holder stack


def _import_bcc() -> Any:
    try:
        import bcc  # noqa: PLC0415 - only here, so the package imports without BCC
    except ImportError as exc:
        raise EnvironmentProblem(
            f"cannot import the BCC Python module ({exc})",
            "install Debian's python3-bpfcc and run scripts/setup.sh, which links it into "
            ".venv; never `pip install bcc`, an unrelated package",
        ) from None
    return bcc


@contextlib.contextmanager
def _libbcc_quiet() -> Iterator[None]:
    """libbcc prints its own line ("cannot attach uprobe, ...") to fd 2 before
    BCC raises; we say what happened ourselves, once, with the remedy."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _recent_kernel_log() -> str:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return "\n".join(out.splitlines()[-20:])


TRACEFS = Path("/sys/kernel/tracing")


def ensure_tracefs() -> None:
    """BCC attaches tracepoints through tracefs, which a fresh VM or container
    may not have mounted. Mount it (we are root) or say how."""
    if (TRACEFS / "events").is_dir():
        return
    try:
        subprocess.run(["mount", "-t", "tracefs", "tracefs", str(TRACEFS)],
                       check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pass
    if not (TRACEFS / "events").is_dir():
        raise EnvironmentProblem(
            f"tracefs is not mounted at {TRACEFS}",
            f"run `mount -t tracefs tracefs {TRACEFS}` as root (in a container, "
            "bind-mount the host's /sys/kernel/tracing)",
        )


class Probes:
    """One loaded BPF program; targets are added and removed while it runs."""

    def __init__(self, config: ProbeConfig, on_event: Callable[[events.Interval], None]) -> None:
        bcc = _import_bcc()
        ensure_tracefs()
        self.config = config
        self._on_event = on_event
        self.undecodable = 0
        # Set: a wait event with no sampled span is not decoded but given to
        # it, as (pid, in a span) (events.unparented_wait): the sidecar only
        # counts those.
        self.on_unparented: Optional[Callable[[int, bool], None]] = None
        self._attached: Dict[int, List[Tuple[str, int]]] = {}
        self.plans: Dict[int, List[Point]] = {}
        self._ns_translate: Dict[int, bool] = {}
        self._host_tids = HostTids()
        try:
            self._bpf = bcc.BPF(src_file=str(bpf_dir() / "gil.bpf.c"),
                                cflags=config.cflags() + [f"-I{bpf_dir()}",
                                                          # TRACEPOINT_PROBE's own struct
                                                          "-Wno-visibility"])
        except Exception as exc:  # BCC raises bare Exception
            raise ProbeError(
                f"compiling the BPF program failed: {exc}",
                "check that /lib/modules/$(uname -r)/build has kernel headers "
                "(scripts/setup.sh links them) and that you are root",
            ) from None
        try:
            # Load every probe now, so a verifier rejection is reported as such.
            for fn_name in PROBE_FUNCTIONS[config.probes]:
                self._bpf.load_func(fn_name, bcc.BPF.KPROBE)
        except Exception as exc:
            raise ProbeError(f"the kernel's verifier rejected the BPF program: {exc}",
                             "report this with the output of `otel-gil doctor`") from None
        self._attach_stack_sampler(bcc)
        self._targets = self._bpf["targets"]
        self._threads = self._bpf["threads"]
        self._holders = self._bpf["holders"]
        self._batch: Optional[_BatchReader] = _BatchReader(bcc, self._threads.map_fd)
        self.stacks = StackStore(self._fp_walk)
        self._bpf["events"].open_ring_buffer(self._ring_callback)

    def _attach_stack_sampler(self, bcc: Any) -> None:
        """The CPU-clock sampler that takes the stacks of holders that keep the
        CPU (bpf/gil.bpf.c on_sample); holders that block are seen at
        sched_switch, attached with the program."""
        if not self.config.stacks or not self.config.stack_sample_hz:
            return
        try:
            self._bpf.attach_perf_event(
                ev_type=bcc.PerfType.SOFTWARE, ev_config=bcc.PerfSWConfig.CPU_CLOCK,
                fn_name="on_sample", sample_freq=self.config.stack_sample_hz)
        except Exception as exc:
            raise ProbeError(f"attaching the stack sampler (a CPU-clock perf event) failed: {exc}",
                             "run with --no-stacks, or check perf_event_open is allowed "
                             "(kernel.perf_event_paranoid, seccomp)") from None

    # ----------------------------------------------------------------- targets

    def add(self, target: Target, ctx_table: Optional[TableLocation] = None) -> None:
        """Configure the target in the kernel, then attach its probes (pid-filtered,
        so other processes using the same libpython pay nothing)."""
        points = plan(target, self.config.probes)
        cfg = target_config(target, ctx_table)
        if self.config.stacks:
            self.stacks.add_target(target)
            stack_config(cfg, target)
        self._targets[ctypes.c_uint32(target.pid)] = cfg
        mark_target(self._bpf["target_pids"], target.pid, True)
        self._ns_translate[target.pid] = len(target.nspid) > 1
        attached: List[Tuple[str, int]] = []
        self._attached[target.pid] = attached
        self.plans[target.pid] = points
        for point in in_attach_order(points):
            try:
                with _libbcc_quiet():
                    self._bpf.attach_uprobe(name=point.path, addr=point.address,
                                            fn_name=point.fn_name, pid=target.pid)
            except Exception:
                self.remove(target.pid)
                raise self._attach_error(point.path, point.address, target.pid) from None
            attached.append((point.path, point.address))

    def _attach_error(self, path: str, addr: int, pid: int) -> ProbeError:
        log = _recent_kernel_log()
        if "ref_ctr_offset mismatch" in log:
            return ProbeError(
                f"another tracer already has a uprobe at {path}+{addr:#x} (pid {pid}): the "
                "kernel refuses a second one with a different reference counter "
                "('ref_ctr_offset mismatch' in dmesg)",
                "stop the other tracer's probe on take_gil / pthread_cond_signal "
                "(perf probe -d, or end the bpftrace session), then retry",
            )
        return ProbeError(
            f"attaching a uprobe at {path}+{addr:#x} in pid {pid} failed",
            "check that the process is still running and that you are root; dmesg may say more",
        )

    def remove(self, pid: int) -> None:
        """Detach a target's probes; its thread entries stay until drained."""
        for path, addr in self._attached.pop(pid, []):
            try:
                self._bpf.detach_uprobe(name=path, addr=addr, pid=pid)
            except Exception:  # noqa: S110 - the process is gone: nothing left to detach
                pass
        self._drop_unfinished(pid)  # a thread exiting later would end its hold at exit
        self.stacks.remove(pid, self.target_state(pid))  # its last stack counts first
        try:
            del self._targets[ctypes.c_uint32(pid)]
        except KeyError:
            pass
        mark_target(self._bpf["target_pids"], pid, False)
        self._ns_translate.pop(pid, None)
        self._host_tids.forget(pid)

    def target_state(self, pid: int) -> Optional[events.TargetState]:
        try:
            raw = self._targets[ctypes.c_uint32(pid)]
        except KeyError:
            return None
        return events.TargetState.from_buffer_copy(bytes(raw))

    @property
    def pids(self) -> List[int]:
        return list(self._attached)

    # ------------------------------------------------------------------ reading

    def host_tid(self, pid: int, ns_tid: int) -> int:
        """Our tid of a thread the probes know by its tid in the target's PID
        namespace (a holder read from its PyThreadState); ns_tid if unknown."""
        return self._host_tids.translate(pid, ns_tid) if self._ns_translate.get(pid) else ns_tid

    def _ring_callback(self, _ctx: Any, data: Any, size: int) -> int:
        raw = ctypes.string_at(data, size)
        if raw[:4] == STACK_KIND:
            self.stacks.on_record(raw)
            return 0
        if self.on_unparented is not None:
            unparented = events.unparented_wait(raw)
            if unparented is not None:
                self.on_unparented(*unparented)
                return 0
        try:
            interval = events.decode_event(raw, self.host_tid)
        except ValueError:
            self.undecodable += 1
            return 0
        self._on_event(self.stacks.attach(interval) if interval.stack_seqs else interval)
        return 0

    def _fp_walk(self, stack_id: int) -> Tuple[int, ...]:
        """The kernel's frame-pointer walk of a holder stack, freed once read."""
        table = self._bpf["stacks"]
        try:
            pcs = tuple(table.walk(stack_id))
            del table[ctypes.c_int(stack_id)]
        except (KeyError, OSError):
            return ()
        return pcs

    def poll(self, timeout_ms: int) -> None:
        """Wait timeout_ms, then deliver every pending event to on_event.

        The probes submit events without waking us (BPF_RB_NO_WAKEUP): the
        wake-up is an irq_work IPI from the traced thread, a VM exit under KVM
        that made a contended hand-off ~20 µs slower there. So the events are
        consumed on our own schedule: the step loop's period."""
        if timeout_ms > 0:
            self._bpf.ring_buffer_poll(timeout_ms)
        self._bpf.ring_buffer_consume()

    def skipped_runs(self) -> int:
        """Probe hits whose BPF program the kernel did not run: a uprobe program
        preempted on a CPU blocks others there (bpf_prog_active), and those are
        skipped and counted as recursion_misses (Linux 5.12+, in fdinfo). The
        state machine survives a skipped hit (the interval is dropped and the
        thread's `unmatched` counts it), but the count is reported as lost."""
        total = 0
        for fn_name in PROBE_FUNCTIONS[self.config.probes]:
            fd = self._bpf.funcs[fn_name.encode()].fd
            try:
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("recursion_misses:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total

    def threads(self) -> Dict[int, events.ThreadStats]:
        """Every tracked thread's totals, by host tid: one BPF_MAP_LOOKUP_BATCH
        syscall per chunk (Linux 5.6+), else one lookup per key as before."""
        if self._batch is not None:
            try:
                return self._batch.read()
            except OSError:
                self._batch = None  # not supported here: per key from now on
        return {k.value: events.ThreadStats.from_buffer_copy(bytes(v))
                for k, v in self._threads.items()}

    def holders(self) -> Dict[Tuple[int, int], events.HolderStats]:
        """Contended set: per (pid, tid in the target's namespace), how long each
        thread held the GIL while another waited (the map, then the slots)."""
        entries = [events.HolderStats.from_buffer_copy(bytes(v)) for v in self._holders.values()]
        states = {pid: self.target_state(pid) for pid in self._attached}
        return holder_totals(entries, {p: s for p, s in states.items() if s is not None})

    def forget_holders(self, pid: int, ns_tids: Optional[List[int]] = None) -> None:
        """Delete the holder entries of a process (all, or those of ns_tids)."""
        for k, v in list(self._holders.items()):
            if v.pid == pid and (ns_tids is None or v.ns_tid in ns_tids):
                with contextlib.suppress(KeyError):
                    del self._holders[k]
        self._host_tids.forget(pid, ns_tids)

    def read_switch_number(self, pid: int) -> Optional[int]:
        """CPython's own count of hand-offs (gil->switch_number), read from the
        process: exact, whatever probes are attached."""
        cfg = self.target_state(pid)
        if cfg is None or not cfg.gil_addr:
            return None
        data = procfs.peek_memory(pid, cfg.gil_addr + cfg.off_switch, 8)
        return int.from_bytes(data, "little") if len(data) == 8 else None

    def thread(self, tid: int) -> Optional[events.ThreadStats]:
        """One thread's totals (a single lookup), None if the kernel has no entry."""
        try:
            raw = self._threads[ctypes.c_uint32(tid)]
        except KeyError:
            return None
        return events.ThreadStats.from_buffer_copy(bytes(raw))

    def _drop_unfinished(self, pid: int) -> None:
        """Threads of a process traced before keep their totals, not the wait or
        hold they were in when its probes came off (its end went unseen): each
        is dropped as its probes come off, and counted as unmatched (seen at
        the next refresh, if the process is attached again), as at attach."""
        for tid, seen in self.threads().items():  # one batch read, then the few to mend
            if seen.pid != pid or seen.exited or not (seen.wait_start or seen.hold_start
                                                      or seen.in_timed_wait or seen.free_at):
                continue
            key = ctypes.c_uint32(tid)
            raw = self._threads.get(key)
            if raw is None:
                continue
            raw.unmatched += bool(raw.wait_start) + bool(raw.hold_start)
            raw.wait_start = raw.hold_start = raw.free_at = raw.in_timed_wait = 0
            self._threads[key] = raw
            if not procfs.thread_alive(pid, tid):  # exited meanwhile: keep it reapable
                raw.exited = 1
                self._threads[key] = raw

    def forget_threads(self, tids: List[int]) -> None:
        """Delete the entries of exited threads (by our tids)."""
        for tid in tids:
            with contextlib.suppress(KeyError):
                del self._threads[ctypes.c_uint32(tid)]

    def close(self) -> None:
        for pid in list(self._attached):
            self.remove(pid)
        self._bpf.cleanup()


class _BatchReader:
    """Reads the whole `threads` hash map with BPF_MAP_LOOKUP_BATCH, into buffers
    kept between calls. BCC 0.26's items_lookup_batch() allocates buffers for
    max_entries (8192 x 1136 bytes) on every call and passes one variable as both
    the batch cursor and the count (bcc/table.py), so it is not used."""

    def __init__(self, bcc: Any, map_fd: int, capacity: int = 256) -> None:
        self._lib = bcc.libbcc.lib
        self._fd = map_fd
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        self._capacity = capacity
        self._keys = (ctypes.c_uint32 * capacity)()
        self._values = (events.ThreadStats * capacity)()

    def read(self) -> Dict[int, events.ThreadStats]:
        out: Dict[int, events.ThreadStats] = {}
        cursor, next_cursor = ctypes.c_uint32(0), ctypes.c_uint32(0)
        first = True
        while True:
            count = ctypes.c_uint32(self._capacity)
            rc = self._lib.bpf_lookup_batch(
                self._fd, None if first else ctypes.byref(cursor), ctypes.byref(next_cursor),
                self._keys, self._values, ctypes.byref(count))
            err = ctypes.get_errno() if rc else 0
            if rc and err == errno.ENOSPC and count.value == 0:
                self._grow(self._capacity * 2)  # a hash bucket larger than the buffer
                continue
            if rc and err != errno.ENOENT:
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
            for i in range(count.value):
                out[self._keys[i]] = events.ThreadStats.from_buffer_copy(self._values[i])
            if rc:  # ENOENT: that was the last chunk
                return out
            cursor.value, first = next_cursor.value, False
