"""Held while others waited: holder stack -> GIL-nanoseconds others spent
waiting behind it. Pure arithmetic, unit-tested in tests/test_views.py.

Each wait's duration is split over the holds that overlapped it, in proportion
to the overlap. The overlaps do not quite add up to the wait: between a release
and the waiter's return from take_gil the GIL is free for a few microseconds
(the waiter is being woken), and that time is charged to the holders in the
same proportion. So the weights of all stacks add up exactly to the time
threads spent in recorded waits, and one ns of wait is charged once.

Two cases are charged to synthetic stacks instead, so that nothing is invented:
a wait whose holders are not known at all (``[holder unknown]``), and the part
of a wait not covered by the holds the record kept, when more hand-offs
happened during it than the probes carry (``[holders not recorded]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from otel_gil.views.model import NOT_RECORDED, UNKNOWN_HOLDER, Recording, Slice, SliceKey, Stack

Charge = Tuple[Stack, Optional[SliceKey], int]  # (holder stack, its hold, ns charged)


def apportion(total: int, parts: Sequence[int]) -> List[int]:
    """total split in proportion to parts, in integers that add up to total
    (largest remainder: the units left over go to the largest fractions)."""
    whole = sum(parts)
    if whole <= 0:
        raise ValueError("nothing to apportion over")
    shares = [total * p // whole for p in parts]
    remainders = sorted(range(len(parts)), key=lambda i: (-(total * parts[i] % whole), i))
    for i in remainders[: total - sum(shares)]:
        shares[i] += 1
    return shares


def charges(wait: Slice) -> List[Charge]:
    """The wait's duration, charged to the holders that overlapped it."""
    total = wait.duration_ns
    shares = [s for s in wait.shares if s.held_ns > 0]
    covered = sum(s.held_ns for s in shares)
    if total <= 0:
        return []
    if covered == 0:
        return [(UNKNOWN_HOLDER, None, total)]
    if wait.truncated and covered < total:
        return [(s.stack, s.source, s.held_ns) for s in shares] + \
            [(NOT_RECORDED, None, total - covered)]
    weights = apportion(total, [s.held_ns for s in shares])
    return [(s.stack, s.source, w) for s, w in zip(shares, weights)]


@dataclass(frozen=True)
class Blamed:
    """One holder stack and what others waited behind it."""

    stack: Stack
    waited_ns: int  # GIL-ns others spent waiting while this stack held the GIL
    waits: int  # how many waits it was charged a part of


def held_while_waited(rec: Recording) -> List[Blamed]:
    """Every holder stack with the wait charged to it, most first."""
    waited: Dict[Stack, int] = {}
    count: Dict[Stack, int] = {}
    for wait in rec.waits:
        charged = charges(wait)
        for stack in {stack for stack, _, _ in charged}:
            count[stack] = count.get(stack, 0) + 1
        for stack, _, ns in charged:
            waited[stack] = waited.get(stack, 0) + ns
    return sorted((Blamed(s, ns, count[s]) for s, ns in waited.items()),
                  key=lambda b: (-b.waited_ns, [f.label() for f in b.stack]))


def caused_by_hold(rec: Recording) -> Dict[SliceKey, int]:
    """Per hold slice: the wait of others charged to it (ns)."""
    out: Dict[SliceKey, int] = {}
    for wait in rec.waits:
        for _, source, ns in charges(wait):
            if source is not None:
                out[source] = out.get(source, 0) + ns
    return out


def folded_weights(rec: Recording) -> Dict[Tuple[str, ...], int]:
    """Frame labels outermost first -> ns: the input of every flame view."""
    out: Dict[Tuple[str, ...], int] = {}
    for b in held_while_waited(rec):
        path = tuple(f.label() for f in reversed(b.stack))
        out[path] = out.get(path, 0) + b.waited_ns
    return out
