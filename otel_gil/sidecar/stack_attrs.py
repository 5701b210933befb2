"""Holder stacks on spans and links (names in otel_gil/names.py, stacks from
otel_gil/stacks/store.py). Kept apart from spans.py, which calls these."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from otel_gil import names
from otel_gil.abi.events import Interval
from otel_gil.config import DEFAULT_STACK_THRESHOLD_MS
from otel_gil.export import spanwire
from otel_gil.stacks.store import HolderStack, main_holder_stack, python_label, stack_of_hold

DEFAULT_STACK_THRESHOLD_NS = int(DEFAULT_STACK_THRESHOLD_MS * 1e6)  # ProbeConfig's default


def stack_attributes(stack: HolderStack, on_hold: bool) -> Dict[str, Any]:
    """The attributes of a span that carries a holder's stack."""
    attrs: Dict[str, Any] = {
        names.CODE_STACKTRACE.name: stack.traceback(),
        names.STACK_PY_FUNCTIONS.name: [f.function for f in stack.python],
        names.STACK_PY_FILES.name: [f.file for f in stack.python],
        names.STACK_PY_LINES.name: [f.line if f.line is not None else f.first_line
                                    for f in stack.python],
        names.STACK_NATIVE_FUNCTIONS.name: [n.function for n in stack.native],
        names.STACK_NATIVE_OBJECTS.name: [n.object for n in stack.native],
        names.STACK_TAKEN.name: stack.taken,
        names.STACK_UNWIND.name: stack.native_unwind,
    }
    top = stack.top_python
    if on_hold and top is not None:  # the span's own thread: code.* describe it
        attrs[names.CODE_FUNCTION_NAME.name] = top.function
        attrs[names.CODE_FILE_PATH.name] = top.file
        attrs[names.CODE_LINE_NUMBER.name] = top.line if top.line is not None else top.first_line
    return attrs


def hold_attributes(iv: Interval) -> Dict[str, Any]:
    stack = main_holder_stack(iv)
    return {} if stack is None else stack_attributes(stack, on_hold=True)


def wait_attributes(iv: Interval, threshold_ns: int) -> Dict[str, Any]:
    """A long wait's holder stack (that of the hold it overlapped most)."""
    if iv.duration_ns < threshold_ns or not iv.stacks:
        return {}
    stack = main_holder_stack(iv)
    if stack is None:
        return {}
    attrs = stack_attributes(stack, on_hold=False)
    holder = next((h.tid for i, h in enumerate(iv.holds) if stack_of_hold(iv, i) is stack), None)
    if holder is not None:
        attrs[names.STACK_THREAD.name] = holder
    return attrs


def link_extra(iv: Interval, trace_id: int, span_id: int) -> bytes:
    """The holder link's stack attributes: the top Python and native function of
    the first hold in that span that has a stack (b"" if none)."""
    for i, h in enumerate(iv.holds):
        span = h.span
        if span is None or span.trace_id != trace_id or span.span_id != span_id:
            continue
        stack: Optional[HolderStack] = stack_of_hold(iv, i)
        if stack is None:
            continue
        attrs: Dict[str, Any] = {}
        if stack.top_python is not None:
            attrs[names.LINK_PY_FUNCTION.name] = python_label(stack.top_python)
        if stack.top_native is not None:
            native = stack.top_native
            attrs[names.LINK_NATIVE_FUNCTION.name] = (
                f"{native.function} ({os.path.basename(native.object)})")
        return spanwire.link_attributes(attrs)
    return b""


