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
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

from otel_gil import events
from otel_gil.errors import EnvironmentProblem, ProbeError

if TYPE_CHECKING:
    from otel_gil.discovery import Target


@dataclass(frozen=True)
class ProbeConfig:
    wait_threshold_ns: int = 1_000_000  # waits at or above this become events
    hold_threshold_ns: int = 50_000_000  # holds at or above this become events
    max_threads: int = 8192
    max_targets: int = 256
    ringbuf_pages: int = 256  # 1 MiB
    empty: bool = False  # probes that return at once: the overhead floor (bench/)

    def cflags(self) -> List[str]:
        flags = ["-DEMPTY_PROBES"] if self.empty else []
        pidns = own_pid_namespace()
        if pidns is not None:
            flags += [f"-DSIDECAR_PIDNS_DEV={pidns[0]}ULL", f"-DSIDECAR_PIDNS_INO={pidns[1]}ULL"]
        return flags + [
            f"-DWAIT_THRESHOLD_NS={self.wait_threshold_ns}ULL",
            f"-DHOLD_THRESHOLD_NS={self.hold_threshold_ns}ULL",
            f"-DMAX_THREADS={self.max_threads}",
            f"-DMAX_TARGETS={self.max_targets}",
            f"-DRINGBUF_PAGES={self.ringbuf_pages}",
        ]


@dataclass(frozen=True)
class ContextTable:
    """Where a target publishes its span contexts (otel_gil/context.py)."""

    address: int
    slots: int


PROC_PID_INIT_INO = 0xEFFFFFFC  # the initial PID namespace's inode (include/linux/proc_ns.h)


def own_pid_namespace() -> Optional[Tuple[int, int]]:
    """(st_dev, st_ino) of our PID namespace when it is not the initial one,
    e.g. a sidecar container sharing its pod's PID namespace; else None."""
    st = os.stat("/proc/self/ns/pid")
    return None if st.st_ino == PROC_PID_INIT_INO else (st.st_dev, st.st_ino)


def bpf_dir() -> Path:
    return Path(str(resources.files("otel_gil.bpf")))


def program_text(config: ProbeConfig) -> str:
    """The program exactly as compiled: the -D settings, the header, the source.
    Printed by ``otel-gil record --dump-bpf``."""
    src = bpf_dir()
    defines = "".join(f"#define {f[2:].replace('=', ' ', 1)}\n" for f in config.cflags())
    return defines + (src / "gil.h").read_text() + (src / "gil.bpf.c").read_text()


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
PROBE_FUNCTIONS = ("on_take_gil", "on_take_gil_return", "on_cond_signal")


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


def proc_path(pid: int, path: str) -> str:
    """A path BCC will use as given. BCC rewrites a plain path to
    /proc/PID/root/<path>, which is wrong for a chrooted target whose
    /proc/PID/maps shows host paths (BCC then fails with "cannot attach uprobe");
    a path already under /proc/PID is left alone, so hand it one."""
    if path.startswith("/proc/"):
        return path
    root = os.path.realpath(f"/proc/{pid}/root")
    inside = path[len(root):] if root != "/" and path.startswith(root + "/") else path
    return f"/proc/{pid}/root{inside}"


class Probes:
    """One loaded BPF program; targets are added and removed while it runs."""

    def __init__(self, config: ProbeConfig, on_event: Callable[[events.Interval], None]) -> None:
        bcc = _import_bcc()
        ensure_tracefs()
        self.config = config
        self._on_event = on_event
        self.undecodable = 0
        self._attached: Dict[int, List[Tuple[str, int]]] = {}
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
            for fn_name in PROBE_FUNCTIONS:
                self._bpf.load_func(fn_name, bcc.BPF.KPROBE)
        except Exception as exc:
            raise ProbeError(f"the kernel's verifier rejected the BPF program: {exc}",
                             "report this with the output of `otel-gil doctor`") from None
        self._targets = self._bpf["targets"]
        self._threads = self._bpf["threads"]
        self._batch: Optional[_BatchReader] = _BatchReader(bcc, self._threads.map_fd)
        self._bpf["events"].open_ring_buffer(self._ring_callback)

    # ----------------------------------------------------------------- targets

    def add(self, target: Target, ctx_table: Optional[ContextTable] = None) -> None:
        """Configure the target in the kernel, then attach its probes (pid-filtered,
        so other processes using the same libpython pay nothing)."""
        cfg = events.Target()
        cfg.cond_addr = target.gil.cond_address
        cfg.interval_ns = target.gil.interval_us * 1000
        if ctx_table is not None:
            cfg.ctx_table = ctx_table.address
            cfg.ctx_slots = ctx_table.slots
        if len(target.nspid) > 1:
            cfg.ns_translate = 1
            cfg.ns_dev, cfg.ns_ino = target.pidns
        cfg.holder_tid = 0
        self._targets[ctypes.c_uint32(target.pid)] = cfg
        interp = target.interpreter
        points: List[Tuple[str, str, int]] = []
        obj = proc_path(target.pid, target.object_path)
        for fn in interp.take_gil:
            points.append(("on_take_gil", obj, fn.address))
            points += [("on_take_gil_return", obj, r) for r in fn.ret_addresses]
        libc_path, cond_signal = target.cond_signal
        points.append(("on_cond_signal", proc_path(target.pid, libc_path), cond_signal))
        attached: List[Tuple[str, int]] = []
        self._attached[target.pid] = attached
        for fn_name, path, addr in points:
            try:
                with _libbcc_quiet():
                    self._bpf.attach_uprobe(name=path, addr=addr, fn_name=fn_name,
                                            pid=target.pid)
            except Exception:
                self.remove(target.pid)
                raise self._attach_error(path, addr, target.pid) from None
            attached.append((path, addr))

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
        try:
            del self._targets[ctypes.c_uint32(pid)]
        except KeyError:
            pass

    def target_state(self, pid: int) -> Optional[events.Target]:
        try:
            raw = self._targets[ctypes.c_uint32(pid)]
        except KeyError:
            return None
        return events.Target.from_buffer_copy(bytes(raw))

    @property
    def pids(self) -> List[int]:
        return list(self._attached)

    # ------------------------------------------------------------------ reading

    def _ring_callback(self, _ctx: Any, data: Any, size: int) -> int:
        try:
            interval = events.decode_event(ctypes.string_at(data, size))
        except ValueError:
            self.undecodable += 1
            return 0
        self._on_event(interval)
        return 0

    def poll(self, timeout_ms: int) -> None:
        """Deliver pending events to on_event; waits at most timeout_ms for the first."""
        self._bpf.ring_buffer_poll(timeout_ms)

    def skipped_runs(self) -> int:
        """Probe hits whose BPF program the kernel did not run: a uprobe program
        preempted on a CPU blocks others there (bpf_prog_active), and those are
        skipped and counted as recursion_misses (Linux 5.12+, in fdinfo). The
        state machine survives a skipped hit (the interval is dropped and the
        thread's `unmatched` counts it), but the count is reported as lost."""
        total = 0
        for fn_name in PROBE_FUNCTIONS:
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

    def thread(self, tid: int) -> Optional[events.ThreadStats]:
        """One thread's totals (a single lookup), None if the kernel has no entry."""
        try:
            raw = self._threads[ctypes.c_uint32(tid)]
        except KeyError:
            return None
        return events.ThreadStats.from_buffer_copy(bytes(raw))

    def forget_threads(self, tids: List[int]) -> None:
        for tid in tids:
            try:
                del self._threads[ctypes.c_uint32(tid)]
            except KeyError:
                pass

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
