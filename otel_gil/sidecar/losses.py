"""The sidecar's loss summary: one log line, at most once a minute, saying what
was lost since the previous line and since start.

What counts as a loss: a span dropped (by reason, otel_gil/export/delivery.py), an
event the kernel could not deliver, an app thread that found no context slot,
an exception the app's context publishing swallowed. Every one of them is also
a metric; the log line is for whoever reads the sidecar's (or the spawning
app's) stderr. The first line comes no earlier than a minute after start, so a
short run logs one line, at exit (final()), whatever went wrong.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

from otel_gil.export.delivery import EXPORTED, SpanDelivery

log = logging.getLogger("otel_gil.sidecar")

Totals = Dict[str, int]  # what -> running total, e.g. "spans dropped (queue_full)" -> 12
PERIOD_NS = 60_000_000_000


class LossLog:
    def __init__(self, totals: Callable[[], Totals], detail: Callable[[Totals], Optional[str]],
                 now_ns: int, period_ns: int = PERIOD_NS) -> None:
        """totals: the running totals now; detail(new losses): a last error worth quoting."""
        self._totals = totals
        self._detail = detail
        self._period_ns = period_ns
        self._last_ns = now_ns
        self._reported: Totals = {}
        self.lines = 0  # lines logged (for tests)

    def maybe_log(self, now_ns: int) -> bool:
        """Log if a period has passed since the last line and something was lost."""
        if now_ns - self._last_ns < self._period_ns:
            return False
        return self._log(now_ns)

    def final(self, now_ns: int) -> bool:
        """At exit: log whatever was not reported yet."""
        return self._log(now_ns)

    def _log(self, now_ns: int) -> bool:
        totals = self._totals()
        new = {k: v - self._reported.get(k, 0) for k, v in totals.items()
               if v > self._reported.get(k, 0)}
        if not new:
            return False
        seconds = (now_ns - self._last_ns) / 1e9
        detail = self._detail(new)
        since = ", ".join(f"{v} {k}" for k, v in sorted(totals.items()) if v)
        log.warning("otel-gil: lost in the last %.0f s: %s%s; since start: %s",
                    seconds, ", ".join(f"{v} {k}" for k, v in sorted(new.items())),
                    f" ({detail})" if detail else "", since)
        self._reported = dict(totals)
        self._last_ns = now_ns
        self.lines += 1
        return True


def sidecar_totals(spans: SpanDelivery, lost_events: int, context: Tuple[int, int],
                   stacks_lost: Optional[Dict[str, int]] = None) -> Totals:
    """The sidecar's losses: spans not delivered (by reason), kernel events lost,
    the app-side context table's (unplaced threads, errors), and holder stacks
    not attached (by reason)."""
    totals: Totals = {}
    for (_, _, outcome), n in spans.counts().items():
        if outcome != EXPORTED:
            key = f"spans dropped ({outcome})"
            totals[key] = totals.get(key, 0) + n
    totals["kernel events lost"] = lost_events
    totals["app threads without a context slot"], totals["app context errors"] = context
    for reason, n in (stacks_lost or {}).items():
        totals[f"holder stacks lost ({reason})"] = n
    return totals


def exporter_detail(spans: SpanDelivery, new: Totals) -> Optional[str]:
    """The exporter's last error, when spans were dropped since the last line."""
    last = spans.exporter_log.last
    if last and any(k.startswith("spans dropped") for k in new):
        return f"last exporter error: {last}"
    return None
