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
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

from otel_gil import events
from otel_gil.disasm import EMULATED, Site
from otel_gil.elfsyms import ElfObject
from otel_gil.errors import EnvironmentProblem, ProbeError, TargetError
from otel_gil.stacks import StackStore

if TYPE_CHECKING:
    from otel_gil.discovery import Interpreter, Target

PROBE_SETS = ("contended", "all")
STACK_KIND = struct.pack("<I", events.GIL_EVENT_STACK)  # a ring record that is a holder stack
DEFAULT_PROBE_SET = "contended"


@dataclass(frozen=True)
class ProbeConfig:
    wait_threshold_ns: int = 1_000_000  # waits at or above this become events
    hold_threshold_ns: int = 50_000_000  # holds at or above this become events
    max_threads: int = 8192
    max_targets: int = 256
    # 4 MiB: ~2 s of events at the 64-thread soak's rate, for a sidecar that
    # shares a busy machine's CPUs (kernel memory, not RssAnon).
    ringbuf_pages: int = 1024
    empty: bool = False  # probes that return at once: the overhead floor (bench/)
    probes: str = DEFAULT_PROBE_SET  # "contended" or "all" (bpf/gil.bpf.c)
    # Holder stacks (otel_gil/stacks.py): a holder's stack is taken as it blocks
    # holding the GIL, or at a CPU sample once its hold lasted stack_threshold_ns;
    # waits at or above it carry their holders' stacks on spans.
    stacks: bool = True
    stack_threshold_ns: int = 10_000_000
    stack_sample_hz: int = 99  # CPU-clock samples per CPU (0: only blocked holders)

    def __post_init__(self) -> None:
        if self.probes not in PROBE_SETS:
            raise ValueError(f"unknown probe set {self.probes!r}: use one of "
                             f"{', '.join(PROBE_SETS)}")

    def cflags(self) -> List[str]:
        flags = ["-DEMPTY_PROBES"] if self.empty else []
        if self.probes == "all":
            flags.append("-DPROBES_ALL")
        if not self.stacks:
            flags.append("-DNO_STACKS")
        pidns = own_pid_namespace()
        if pidns is not None:
            flags += [f"-DSIDECAR_PIDNS_DEV={pidns[0]}ULL", f"-DSIDECAR_PIDNS_INO={pidns[1]}ULL"]
        return flags + [
            f"-DWAIT_THRESHOLD_NS={self.wait_threshold_ns}ULL",
            f"-DHOLD_THRESHOLD_NS={self.hold_threshold_ns}ULL",
            f"-DSTACK_THRESHOLD_NS={self.stack_threshold_ns}ULL",
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


def ns_tid_map(pid: int) -> Dict[int, int]:
    """tid in the target's own PID namespace -> our tid, for its live threads."""
    out: Dict[int, int] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("NSpid:"):
                        out[int(line.split()[-1])] = int(task)
                        break
        except (OSError, ValueError):
            continue
    return out


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
# The BPF functions of each probe set (bpf/gil.bpf.c).
PROBE_FUNCTIONS = {"contended": ("on_wait", "on_wake"),
                   "all": ("on_wait", "on_wake", "on_held", "on_release", "on_take_gil")}


@dataclass(frozen=True)
class Point:
    """One uprobe of a plan: which program, where, on what instruction."""

    fn_name: str
    path: str  # as BCC will open it (proc_path); "" before a process is known
    address: int  # link-time address BCC attaches at; libc's entry: its symbol's
    role: str  # held, wait, wake, release, entry
    where: str  # function it sits in
    insn: str
    cost: str  # disasm.EMULATED / SINGLE_STEPPED, or "entry" (a function's first instruction)

    @property
    def in_libc(self) -> bool:
        return self.where == LIBC_SIGNAL


LIBC_SIGNAL = "pthread_cond_signal (libc)"
# What one probe hit costs, by how the kernel handles the instruction, measured
# on the 2-vCPU KVM guest of bench/README.md (empty BPF program, per pid; a
# function entry is a `push`, emulated). The BPF programs add ~0.1-0.3 µs.
HIT_COST_NS = {EMULATED: 550, "single-stepped": 6800, "entry": 550}


def planned(interp: Interpreter, probe_set: str) -> List[Point]:
    """The uprobes of a probe set in an interpreter build (paths left empty),
    or ProbeError saying why the set cannot be placed.

    contended: the timed-wait call and wake sites of every take_gil copy.
    all: those, the held sites (or each ret), the release call sites (or libc's
    pthread_cond_signal entry), and take_gil's entry where no wait site exists.
    """
    sites = interp.sites
    points: List[Point] = []

    def add(fn_name: str, site: Site) -> None:
        points.append(Point(fn_name, "", site.address, site.role, site.function, site.insn,
                            site.cost))

    if sites is not None and sites.waits and len(sites.wakes) == len(sites.waits):
        for site in sites.waits:
            add("on_wait", site)
        for site in sites.wakes:
            add("on_wake", site)
    elif probe_set == "contended":
        why = "; ".join(sites.notes) if sites is not None else "its code could not be analysed"
        raise ProbeError(
            f"the contended probes cannot be placed in {interp.path}: no timed wait on the GIL "
            f"found in take_gil ({why})",
            "use --probes all (OTEL_PYTHON_GIL_PROBES=all), which probes every transition")
    else:
        points += [Point("on_take_gil", "", fn.address, "entry", fn.name, "entry", "entry")
                   for fn in interp.take_gil]
    if probe_set == "contended":
        return points
    if sites is not None and sites.held:
        for site in sites.held:
            add("on_held", site)
    else:
        points += [Point("on_held", "", r, "held", fn.name, "ret", "single-stepped")
                   for fn in interp.take_gil for r in fn.ret_addresses]
    if sites is not None and sites.releases:
        for site in sites.releases:
            add("on_release", site)
    else:
        points.append(Point("on_release", "", 0, "release", LIBC_SIGNAL, "entry", "entry"))
    return points


def plan(target: Target, probe_set: str) -> List[Point]:
    """planned() for a running target: the paths and libc's address filled in."""
    obj = proc_path(target.pid, target.object_path)
    libc_path, cond_signal = target.cond_signal
    libc = proc_path(target.pid, libc_path)
    return [replace(p, path=libc, address=cond_signal) if p.in_libc else replace(p, path=obj)
            for p in planned(target.interpreter, probe_set)]


def transition_cost(points: List[Point]) -> Dict[str, int]:
    """ns of probe hits per uncontended GIL transition (one release, one
    acquisition that finds the GIL free) and per timed wait, by this plan.

    One held site runs per acquisition: which one depends on the path through
    take_gil, so both the cheapest and the dearest are given (a single-stepped
    ret kept as a fallback may sit on a path that is rarely taken)."""
    def costs(role: str) -> List[int]:
        return [HIT_COST_NS[p.cost] for p in points if p.role == role] or [0]

    # take_gil's own signal of gil->switch_cond, on every acquisition, hits
    # libc's pthread_cond_signal too when that is the release probe.
    release = min(costs("release")) * (2 if any(p.in_libc for p in points) else 1)
    fixed = release + min(costs("entry"))
    return {"per_uncontended_transition_ns": fixed + min(costs("held")),
            "per_uncontended_transition_max_ns": fixed + max(costs("held")),
            "per_timed_wait_ns": min(costs("wait")) + min(costs("wake"))}


_PTHREAD_TID: Dict[Tuple[int, int, int], Optional[int]] = {}


def glibc_tid_offset(libc_path: str) -> Optional[int]:
    """Offset of the tid in glibc's struct pthread, from libc's own descriptor
    for libthread_db (`_thread_db_pthread_tid`: bit size, count, offset; glibc
    nptl_db/structs.def). None for a libc without it."""
    try:
        st = os.stat(libc_path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    if key not in _PTHREAD_TID:
        found = None
        try:
            with ElfObject(libc_path) as libc:
                sym = libc.lookup("_thread_db_pthread_tid", (".dynsym",))
                if sym is not None:
                    bits, count, offset = struct.unpack("<III", libc.read(sym.value, 12))
                    found = offset if (bits, count) == (32, 1) and offset < 4096 else None
        except (OSError, TargetError, struct.error):
            found = None
        _PTHREAD_TID[key] = found
    return _PTHREAD_TID[key]


def target_config(target: Target, ctx_table: Optional[ContextTable]) -> events.Target:
    """What the probes need to know about a target (struct target's configuration)."""
    cfg = events.Target()
    cfg.cond_addr = target.gil.cond_address
    cfg.interval_ns = target.gil.interval_us * 1000
    if ctx_table is not None:
        cfg.ctx_table = ctx_table.address
        cfg.ctx_slots = ctx_table.slots
    if len(target.nspid) > 1:
        cfg.ns_translate = 1
        cfg.ns_dev, cfg.ns_ino = target.pidns
    layout = target.interpreter.gil_layout
    cfg.gil_addr = target.gil.address
    if layout is not None:
        # last_holder and switch_number sit on either side of locked in struct
        # _gil_runtime_state, 3.8 to 3.14 (Include/internal/pycore_gil.h;
        # checked with gdb on every build here, free-threaded included).
        cfg.off_locked = layout.locked
        cfg.off_holder = layout.locked - 8
        cfg.off_switch = layout.locked + 8
        cfg.tid_how, cfg.off_tid, cfg.off_pthread_tid = holder_tid_source(target)
    cfg.holder_tid = 0
    return cfg


def stack_config(cfg: events.Target, target: Target) -> None:
    """Holder stacks' part of struct target: on, and where the frames are."""
    from otel_gil.stacks import frame_layout

    cfg.stacks = 1 if cfg.tid_how else 0  # a holder is known by its tstate's tid
    layout = frame_layout(target)
    if layout is None:
        cfg.off_frame = cfg.off_frame2 = events.GIL_NO_OFFSET
        return
    cfg.off_frame, cfg.off_frame2 = layout.off_frame, layout.off_frame2
    cfg.off_prev, cfg.off_code, cfg.off_instr = layout.off_prev, layout.off_code, layout.off_instr


def holder_tid_source(target: Target) -> Tuple[int, int, int]:
    """(GIL_TID_*, offset in PyThreadState, glibc's tid offset) to name a holder
    from gil->last_holder, checked on the live process; (0, 0, 0) if unknown.

    The layout's offset (DWARF, _Py_DebugOffsets, table) is tried first; the
    check is that the last holder's PyThreadState gives one of the process's
    thread ids. Where it does not (a build whose layout is not known right),
    the first 1 KiB of that PyThreadState is searched for a word that does
    (native_thread_id is the kernel tid, 3.11+). Data read from the process is
    untrusted: only a tid of the process's own threads is ever accepted.
    """
    layout = target.interpreter.gil_layout
    if layout is None:
        return 0, 0, 0
    pthread_tid = glibc_tid_offset(target.cond_signal[0])
    try:
        with open(f"/proc/{target.pid}/mem", "rb", buffering=0) as mem:
            tids = set(ns_tid_map(target.pid))
            tstate = _peek_u64(mem, target.gil.address + layout.locked - 8)
            raw = _peek_some(mem, tstate) if tstate else b""

            def native(off: int) -> bool:
                return off + 8 <= len(raw) and _u64(raw, off) in tids

            def pthread(off: int) -> bool:
                if pthread_tid is None or off + 8 > len(raw) or not _u64(raw, off):
                    return False
                return int.from_bytes(_peek(mem, _u64(raw, off) + pthread_tid, 4),
                                      "little") in tids

            if layout.tstate_native_thread_id is not None and native(
                    layout.tstate_native_thread_id):
                return events.GIL_TID_NATIVE, layout.tstate_native_thread_id, 0
            if layout.tstate_thread_id is not None and pthread(layout.tstate_thread_id):
                return events.GIL_TID_PTHREAD, layout.tstate_thread_id, pthread_tid or 0
            found = _tid_offsets(mem, tstate, raw, tids)
            if len(found) == 1:
                return events.GIL_TID_NATIVE, found[0], 0
    except (OSError, ValueError):
        pass
    return 0, 0, 0


def _tid_offsets(mem: Any, tstate: int, raw: bytes, tids: set[int]) -> list[int]:
    """Offsets in PyThreadState where this thread state and the others after it
    (its `next`, 8 bytes in, every version) each hold a distinct tid of the
    process. One thread state alone is ambiguous in a PID namespace, where the
    main thread's tid is 1 and small ints abound; a few threads settle it."""
    states = [raw]
    address = _u64(raw, 8) if len(raw) >= 16 else 0
    while address and len(states) < 8:
        more = _peek_some(mem, address)
        if len(more) < len(raw):
            break
        states.append(more)
        address = _u64(more, 8)
    found = []
    for off in range(0, len(raw) - 7, 8):
        values = [_u64(state, off) for state in states]
        if all(v in tids for v in values) and len(set(values)) == len(values):
            found.append(off)
    return found


def _peek(mem: Any, address: int, size: int) -> bytes:
    mem.seek(address)
    data = mem.read(size)
    return bytes(data) if data else b""


def _peek_some(mem: Any, address: int) -> bytes:
    """Up to 1 KiB at address: less where the mapping ends sooner."""
    for size in (1024, 512, 256):
        try:
            return _peek(mem, address, size)
        except OSError:
            continue
    return b""


def _peek_u64(mem: Any, address: int) -> int:
    data = _peek(mem, address, 8)
    return _u64(data, 0) if len(data) == 8 else 0


def _u64(data: bytes, off: int) -> int:
    return int.from_bytes(data[off:off + 8], "little")


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
        self.plans: Dict[int, List[Point]] = {}
        self._ns_translate: Dict[int, bool] = {}
        self._host_tids: Dict[int, Dict[int, int]] = {}
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

    def add(self, target: Target, ctx_table: Optional[ContextTable] = None) -> None:
        """Configure the target in the kernel, then attach its probes (pid-filtered,
        so other processes using the same libpython pay nothing)."""
        points = plan(target, self.config.probes)
        cfg = target_config(target, ctx_table)
        if self.config.stacks:
            self.stacks.add_target(target)
            stack_config(cfg, target)
        self._targets[ctypes.c_uint32(target.pid)] = cfg
        self._ns_translate[target.pid] = len(target.nspid) > 1
        attached: List[Tuple[str, int]] = []
        self._attached[target.pid] = attached
        self.plans[target.pid] = points
        for point in points:
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
        try:
            del self._targets[ctypes.c_uint32(pid)]
        except KeyError:
            pass
        self._ns_translate.pop(pid, None)
        self._host_tids.pop(pid, None)
        self.stacks.remove(pid)

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

    def host_tid(self, pid: int, ns_tid: int) -> int:
        """Our tid of a thread the probes know by its tid in the target's PID
        namespace (a holder read from its PyThreadState); ns_tid if unknown."""
        if not self._ns_translate.get(pid):
            return ns_tid
        known = self._host_tids.setdefault(pid, {})
        if ns_tid not in known:
            known.update(ns_tid_map(pid))
        return known.get(ns_tid, ns_tid)

    def _ring_callback(self, _ctx: Any, data: Any, size: int) -> int:
        raw = ctypes.string_at(data, size)
        if raw[:4] == STACK_KIND:
            self.stacks.on_record(raw)
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
        thread held the GIL while another waited."""
        out = {}
        for v in self._holders.values():
            raw = events.HolderStats.from_buffer_copy(bytes(v))
            out[(raw.pid, raw.ns_tid)] = raw
        return out

    def forget_holders(self, pid: int, ns_tids: Optional[List[int]] = None) -> None:
        """Delete the holder entries of a process (all, or those of ns_tids)."""
        for k, v in list(self._holders.items()):
            if v.pid == pid and (ns_tids is None or v.ns_tid in ns_tids):
                try:
                    del self._holders[k]
                except KeyError:
                    pass

    def read_switch_number(self, pid: int) -> Optional[int]:
        """CPython's own count of hand-offs (gil->switch_number), read from the
        process: exact, whatever probes are attached."""
        cfg = self.target_state(pid)
        if cfg is None or not cfg.gil_addr:
            return None
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except OSError:
            return None
        try:
            data = os.pread(fd, 8, cfg.gil_addr + cfg.off_switch)
        except OSError:
            return None
        finally:
            os.close(fd)
        return int.from_bytes(data, "little") if len(data) == 8 else None

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
