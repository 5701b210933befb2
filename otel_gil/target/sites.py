"""Where each probe goes in an interpreter build: the probe sites of take_gil
(its timed waits on the GIL's condition variable, the wake-ups after them, the
points where it holds the GIL) and of the releases (pthread_cond_signal calls),
each on an instruction the kernel emulates where one is found (probe_cost).
Read from the code with capstone (otel_gil/target/disasm.py), x86-64.
"""

from __future__ import annotations

from dataclasses import dataclass

from otel_gil.errors import TargetError
from otel_gil.target.disasm import (
    COND_SIGNAL,
    EMULATED,
    TIMED_WAITS,
    Function,
    Insn,
    direct_callers,
    plt_stubs,
    probe_cost,
    sweep,
)
from otel_gil.target.elf import STT_FUNC, ElfObject, Symbol


@dataclass(frozen=True)
class Site:
    """One probe point, at a link-time address of the interpreter's ELF object.

    ``role``: "held" (take_gil has the GIL), "wait" (a timed wait on gil->cond
    begins), "wake" (that wait returned; the waiter holds gil->mutex), or
    "release" (a call of pthread_cond_signal, kept when rdi is &gil->cond).
    ``result_in_rax``: at a wake site, rax still holds the wait's return value.
    """

    role: str
    function: str
    address: int
    insn: str
    cost: str
    result_in_rax: bool = False


@dataclass(frozen=True)
class ProbeSites:
    """Where the probes go in one interpreter build, and what could not be placed."""

    held: tuple[Site, ...]
    waits: tuple[Site, ...]
    wakes: tuple[Site, ...]
    releases: tuple[Site, ...]  # empty: libc's pthread_cond_signal entry is used
    notes: tuple[str, ...] = ()


_WALK_LIMIT = 64  # instructions searched around a ret or a wait for an emulated one


# Functions that never return: a branch into a straight run that calls one of
# these is a dead end (CPython's fatal-error paths in take_gil).
NORETURN = ("_Py_FatalErrorFunc", "Py_FatalError", "_Py_FatalErrorFormat",
            "_Py_FatalError_TstateNULL", "PyThread_exit_thread", "abort", "__assert_fail",
            "__stack_chk_fail")


def _site(role: str, fn: str, insn: Insn, result_in_rax: bool = False) -> Site:
    return Site(role, fn, insn.address, insn.text, probe_cost(insn.code), result_in_rax)


class _Flow:
    """The instructions of one take_gil copy and its parts, with who jumps where."""

    def __init__(self, bodies: list[list[Insn]], noreturn: set[int]) -> None:
        self.at: dict[int, tuple[int, int]] = {}
        self.bodies = bodies
        self.preds: dict[int, list[Insn]] = {}
        self.noreturn = noreturn
        for b, body in enumerate(bodies):
            for k, insn in enumerate(body):
                self.at[insn.address] = (b, k)
                if insn.kind in ("jump", "cond") and insn.target is not None:
                    self.preds.setdefault(insn.target, []).append(insn)

    def next(self, insn: Insn) -> Insn | None:
        b, k = self.at[insn.address]
        body = self.bodies[b]
        return body[k + 1] if k + 1 < len(body) and \
            body[k + 1].address == insn.address + insn.size else None

    def prev(self, insn: Insn) -> Insn | None:
        """The instruction that falls through into insn, if any."""
        b, k = self.at[insn.address]
        p = self.bodies[b][k - 1] if k else None
        if p is None or p.address + p.size != insn.address or p.kind in ("jump", "ret"):
            return None
        return p

    def dead_end(self, address: int | None) -> bool:
        """Does the code at address run straight (following jmps) into a call
        of a function that never returns?"""
        for _ in range(_WALK_LIMIT):
            if address is None or address not in self.at:
                return False
            b, k = self.at[address]
            insn = self.bodies[b][k]
            if insn.kind == "call":
                return insn.target in self.noreturn
            if insn.kind == "jump":
                address = insn.target
            elif insn.kind in ("cond", "ret"):
                return False
            else:
                nxt = self.next(insn)
                address = nxt.address if nxt is not None else None
        return False

    def covers(self, insn: Insn, toward: int) -> bool:
        """Is insn an emulated site that, each time it runs, goes on to `toward`
        (or into a dead end)?"""
        if probe_cost(insn.code) != EMULATED:
            return False
        if insn.kind == "jump":
            return insn.target == toward
        if insn.kind == "cond":
            nxt = self.next(insn)
            other = insn.target if nxt is not None and nxt.address == toward else \
                (nxt.address if nxt is not None else None)
            return self.dead_end(other)
        return insn.kind in ("call", "other")  # call rel32 returns; push falls through

    def sites_before(self, insn: Insn, seen: set[int]) -> list[Insn] | None:
        """Emulated instructions such that every path reaching insn runs exactly
        one of them, and each of them always goes on to insn (or a dead end).
        None if some path has none before it forks or within reach."""
        for _ in range(_WALK_LIMIT):
            if insn.address in seen:
                return None  # a loop with no site in it
            seen.add(insn.address)
            found: list[Insn] = []
            for jump in self.preds.get(insn.address, ()):
                if not self.covers(jump, insn.address):
                    return None  # a fork (or a single-stepped jump) into this path
                found.append(jump)
            prev = self.prev(insn)
            if prev is None:
                return found or None
            if self.covers(prev, insn.address):
                return found + [prev]
            if prev.kind == "cond":
                return None  # a fork: its other arm goes elsewhere
            if found:
                more = self.sites_before(prev, seen)
                return None if more is None else found + more
            insn = prev
        return None


def _held_sites(fn: str, flow: _Flow, ret: Insn) -> list[Site]:
    """Where the GIL is held in take_gil: emulated instructions after its last
    MUTEX_UNLOCK(gil->mutex) such that each path to the ret runs exactly one
    (a call, the unlock's at the latest, is always one). Else the ret itself,
    single-stepped."""
    found = flow.sites_before(ret, set())
    if not found:
        return [_site("held", fn, ret)]
    return [_site("held", fn, i) for i in sorted(set(found), key=lambda i: i.address)]


def _wake_site(fn: str, flow: _Flow, call: Insn) -> Site | None:
    """The first emulated instruction after the timed wait returns, reached
    straight from the call (nothing branches into the instructions between),
    or the instruction at the return address (single-stepped)."""
    rax_kept = True
    insn = flow.next(call)
    first = insn
    for _ in range(_WALK_LIMIT):
        if insn is None or flow.preds.get(insn.address):
            break
        if probe_cost(insn.code) == EMULATED:
            return _site("wake", fn, insn, rax_kept)
        if insn.kind in ("jump", "ret"):
            break
        rax_kept = rax_kept and not insn.writes_rax
        insn = flow.next(insn)
    return _site("wake", fn, first, True) if first is not None else None


def _bodies(obj: ElfObject, fn: Function, colds: list[Symbol]) -> list[list[Insn]]:
    """The instructions of a take_gil copy and of the parts its jumps leave to
    (its ``.cold`` part, by symbol or, stripped, by .eh_frame FDE)."""
    body = sweep(obj.read(fn.address, fn.size), fn.address)
    bodies = [body]
    seen: set[int] = set()
    for insn in body:
        if insn.kind not in ("jump", "cond") or insn.target is None or \
                fn.address <= insn.target < fn.address + fn.size:
            continue
        part = next(((c.value, c.size) for c in colds
                     if c.value <= insn.target < c.value + c.size), None) or \
            obj.fde_extent(insn.target)
        if part is None or part[0] in seen or not part[1]:
            continue
        seen.add(part[0])
        bodies.append(sweep(obj.read(*part), part[0]))
    return bodies


def take_gil_sites(obj: ElfObject, fn: Function, colds: list[Symbol], stubs: dict[int, str],
                   noreturn: set[int]) -> tuple[list[Site], list[Site], list[Site], list[str]]:
    """(held, wait, wake) sites of one take_gil copy, and notes on what is off."""
    flow = _Flow(_bodies(obj, fn, colds), noreturn)
    held: list[Site] = []
    waits: list[Site] = []
    wakes: list[Site] = []
    notes: list[str] = []
    if any(i.kind == "jump" and i.target is None for i in flow.bodies[0]):
        notes.append(f"{fn.name}: an indirect jump; its targets are unknown")
    for n, body in enumerate(flow.bodies):
        for insn in body:
            if insn.address in fn.ret_addresses:
                held += _held_sites(fn.name, flow, insn)
            elif n == 0 and insn.kind == "call" and stubs.get(insn.target or -1) in TIMED_WAITS:
                # The wait loop is take_gil's hot path, never in a .cold part,
                # which may be shared with unrelated code.
                waits.append(_site("wait", fn.name, insn))
                wake = _wake_site(fn.name, flow, insn)
                if wake is not None:
                    wakes.append(wake)
    if not waits:
        notes.append(f"{fn.name}: no direct call of pthread_cond_timedwait found")
    return held, waits, wakes, notes


def probe_sites(obj: ElfObject, takes: list[Function], colds: list[Symbol],
                names: ElfObject | None = None) -> ProbeSites:
    """Every probe site of one interpreter build (otel_gil/probes/loader.py attaches them).

    The release sites are the direct calls of pthread_cond_signal outside
    take_gil: take_gil itself signals gil->switch_cond on every acquisition
    (FORCE_SWITCHING, ceval_gil.[ch]), which is never the GIL's cond, so
    probing it would only add a trap per transition. (Where LTO inlined
    drop_gil into take_gil's thread-exit path, that one release is not seen:
    the thread's exit ends its hold instead.)
    """
    stubs = plt_stubs(obj, TIMED_WAITS + (COND_SIGNAL,) + NORETURN)
    syms = names or obj
    noreturn = {a for a, n in stubs.items() if n in NORETURN} | {
        s.value for s in syms.symbols(".symtab") + syms.symbols(".dynsym")
        if s.kind == STT_FUNC and s.name.split("@")[0] in NORETURN}
    held: list[Site] = []
    waits: list[Site] = []
    wakes: list[Site] = []
    notes: list[str] = []
    skip: list[tuple[int, int]] = []
    for fn in takes:
        h, w, k, n = take_gil_sites(obj, fn, colds, stubs, noreturn)
        held += h
        waits += w
        wakes += k
        notes += n
        skip.append((fn.address, fn.address + fn.size))
        skip += [(c.value, c.value + c.size) for c in colds if c.name.startswith(fn.name + ".cold")]
    if len(held) < sum(len(fn.ret_addresses) for fn in takes):
        notes.append("a ret of take_gil was not reached by the site search")
    signal = {a: n for a, n in stubs.items() if n == COND_SIGNAL}
    releases = [_site("release", _where(names or obj, i.address), i) for i in
                direct_callers(obj, signal, skip)]
    if not releases:
        notes.append("no direct call of pthread_cond_signal: libc's entry is probed instead")
    return ProbeSites(tuple(held), tuple(waits), tuple(wakes), tuple(releases), tuple(notes))


def _where(obj: ElfObject, address: int) -> str:
    """The function holding an address, for reports: its symbol, else its FDE start."""
    for sym in obj.symbols(".symtab") or obj.symbols(".dynsym"):
        # a debug file has the symbols; its .eh_frame may be absent
        if sym.kind == STT_FUNC and sym.value <= address < sym.value + max(sym.size, 1):
            return sym.name
    try:
        extent = obj.fde_extent(address)
    except TargetError:
        extent = None
    return f"code at {extent[0]:#x}" if extent else f"code at {address:#x}"
