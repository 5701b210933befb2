"""Where the probes go: the uprobe plan of a probe set for an interpreter build
(from the sites otel_gil/target/disasm.py found), and what its hits cost."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Dict, List

from otel_gil.errors import ProbeError
from otel_gil.target import procfs
from otel_gil.target.disasm import EMULATED
from otel_gil.target.sites import Site

if TYPE_CHECKING:
    from otel_gil.target.interpreter import Interpreter
    from otel_gil.target.process import Target


# The BPF functions of each probe set (bpf/gil.bpf.c).
PROBE_FUNCTIONS = {"contended": ("on_wait", "on_wake"),
                   "all": ("on_wait", "on_wake", "on_held", "on_release", "on_take_gil")}
# Uprobes go live one at a time, so what ends an interval is attached before
# what begins one: a wait or hold whose start a probe saw always has its end
# seen too (else the thread's next start would join on to the unseen end).
ATTACH_ORDER = ("on_release", "on_wake", "on_held", "on_wait", "on_take_gil")


def in_attach_order(points: List[Point]) -> List[Point]:
    return sorted(points, key=lambda p: ATTACH_ORDER.index(p.fn_name))


@dataclass(frozen=True)
class Point:
    """One uprobe of a plan: which program, where, on what instruction."""

    fn_name: str
    path: str  # as BCC will open it (procfs.under_root); "" before a process is known
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
    obj = procfs.under_root(target.pid, target.object_path)
    libc_path, cond_signal = target.cond_signal
    libc = procfs.under_root(target.pid, libc_path)
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
