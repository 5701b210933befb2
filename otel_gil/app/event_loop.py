"""The context slot across event-loop steps and worker threads.

This module runs *inside the traced app* (Python 3.8+, stdlib only). It must be
cheap and must never raise into the app.

otel_gil/app/context.py publishes a thread's span at every OpenTelemetry
attach/detach. An event loop switches tasks with neither: it runs each step of
a task, and each callback, inside that task's own contextvars Context
(Lib/asyncio/events.py, Handle._run: ``self._context.run(self._callback,
*self._args)``). A worker thread that runs a copied Context (asyncio.to_thread,
anyio.to_thread.run_sync) does the same. Here the slot is made to follow the
thread's current Context at those switches:

- asyncio, any loop built on asyncio.BaseEventLoop, with the C or the Python
  Task: ``Handle._run`` is the one place where the loop runs a task step, a
  call_soon/call_later callback, a future's done-callback or an I/O callback
  (BaseEventLoop._run_once). It is patched on the class, so handles and tasks
  created before instrument() are covered. Before the step: the span current in
  the handle's Context; after it: the span current in the loop's own Context
  (none, unless the loop itself runs inside a span), so a wait in the loop's
  code between steps is charged to no task.
- eager tasks (3.12+, asyncio.eager_task_factory): a task's first step runs
  inside create_task, in the caller's step; create_task republishes the
  caller's span when it returns.
- uvloop: its Handle is Cython and enters the Context in C (uvloop/cbhandles.pyx),
  so Loop.call_soon, call_soon_threadsafe, call_later and call_at schedule
  _bracket with the callback as its first argument instead: every task step
  and timer, and every future callback, is scheduled through them (a handle's
  repr shows _bracket, then the callback). Callbacks uvloop builds in Cython (add_reader,
  add_writer, add_signal_handler, protocol callbacks) are not bracketed: they
  run with the loop's record (no span), and an attach/detach inside them is
  published as usual. Callbacks already scheduled when instrument() runs are
  not bracketed either.
- concurrent.futures.ThreadPoolExecutor (loop.run_in_executor, asyncio.to_thread):
  a work item that is ``functools.partial(ctx.run, ...)`` or ``ctx.run`` (what
  to_thread submits) publishes ctx's span first; every work item republishes
  the worker's own Context when it ends, so the next job does not inherit it.
- anyio worker threads (Starlette and FastAPI sync endpoints):
  AsyncIOBackend.run_sync_in_worker_thread wraps the function, which publishes
  the copied Context's span on entry and "no span" on exit.

Why not PyContext_AddWatcher (3.14+), which reports every switch: a watcher
callback may be called with an exception pending (Context.run leaving a Context
after the called function raised, Python/context.c) and must leave it intact.
A ctypes callback runs Python code with the exception still set: CPython then
raises SystemError ("returned a result with an exception set") and the app's
own exception is lost (tests/test_event_loop.py shows it on sid's 3.14).
Only a compiled callback can save and restore it, as dd-trace-py's Rust
watcher does with PyErr_GetRaisedException/PyErr_SetRaisedException; this
package ships no compiled code. The patches above therefore serve 3.14 too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread as futures_thread
import contextvars
import functools
import sys
import threading
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional

from otel_gil.abi.slots import INVALID
from otel_gil.app import import_hooks, publish
from otel_gil.app.publish import publish_current, publish_entered

__all__ = ["install", "patched", "uninstall"]

_active = False
# publish._otel_var while installed with the contextvars runtime context: the
# inlined fast path of Handle._run reads it; None means take the slow path.
_otel_var: Any = None
_NO_CONTEXT = contextvars.Context()  # publishing it publishes "no span"
_patches = import_hooks.Patches()  # every patch, for uninstall()
_replace = _patches.replace
# publish.py's objects for the inlined publishing below: publish.py mutates
# them in place and never rebinds them.
_TLS, _CACHE = publish._tls, publish._cache
_INVALID, _SPAN_KEY = INVALID, publish._SPAN_KEY  # type: ignore[attr-defined]
# .record: the record of the uvloop loop running on this thread (run_forever);
# without one (a loop already running at instrument()), "no span".
_loop_records = threading.local()


# ------------------------------------------------------------------- asyncio


def _patch_asyncio() -> None:
    handle = asyncio.events.Handle
    original_run = handle.__dict__["_run"]
    # context.py's publishing, inlined: a Python call costs ~70 ns, and this
    # runs twice per step (bench/event_loop.py). The names are bound once;
    # context.py mutates these objects in place, never rebinds them.
    tls, cache, remember, claim, failed = (_TLS, _CACHE, publish._remember,
                                           publish._claim_current, publish._failed)
    invalid, span_key = _INVALID, _SPAN_KEY

    def _run(self: Any) -> None:
        var = _otel_var
        if var is None:  # not instrumented, or not the contextvars runtime context
            if not _active:
                return original_run(self)  # type: ignore[no-any-return]
            publish_entered(self._context)
            try:
                return original_run(self)  # type: ignore[no-any-return]
            finally:
                publish_current()
        try:  # publish_entered(self._context)
            otel = self._context.get(var)
            span = None if otel is None else otel.get(span_key)
            if span is None:
                record = invalid
            else:
                hit = cache.get(id(span.get_span_context()))
                record = hit[1] if hit is not None else remember(span)
            try:
                tls.view[:] = record
            except AttributeError:
                claim()[:] = record
        except Exception:  # noqa: BLE001 - never raise into the app
            failed()
        try:
            return original_run(self)  # type: ignore[no-any-return]
        finally:
            try:  # publish_current()
                otel = var.get(None)
                span = None if otel is None else otel.get(span_key)
                if span is None:
                    record = invalid
                else:
                    hit = cache.get(id(span.get_span_context()))
                    record = hit[1] if hit is not None else remember(span)
                tls.view[:] = record
            except Exception:  # noqa: BLE001 - never raise into the app
                failed()

    _replace(handle, "_run", _run)
    if sys.version_info >= (3, 12):  # eager_task_factory: asyncio/tasks.py, 3.12+
        _wrap_create_task(asyncio.BaseEventLoop)


def _wrap_create_task(loop_class: Any) -> None:
    original = getattr(loop_class, "create_task", None)
    if original is None:
        return

    def create_task(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        finally:
            if _active:  # an eager first step may have published its own span
                publish_current()

    _replace(loop_class, "create_task", create_task)


# -------------------------------------------------------------------- uvloop


def _bracket(callback: Callable[..., Any], *args: Any) -> Any:
    """What a uvloop loop runs in place of a callback scheduled on it, with the
    callback as its first argument. uvloop calls it inside the callback's
    Context (uvloop/cbhandles.pyx, Handle._run: Context_Enter), so on entry the
    current Context is the callback's; on exit, still inside it, the loop's own
    record (taken when run_forever began, on this thread) is written back.
    A function, not an object holding the callback: no object of ours per
    callback (uvloop's args tuple grows by one), and uvloop calls it by
    vectorcall (bench/README.md)."""
    var = _otel_var
    if var is None:
        return callback(*args)
    try:  # publish_current(), inlined as in Handle._run above
        otel = var.get(None)
        span = None if otel is None else otel.get(_SPAN_KEY)
        if span is None:
            record = _INVALID
        else:
            hit = _CACHE.get(id(span.get_span_context()))
            record = hit[1] if hit is not None else publish._remember(span)
        try:
            _TLS.view[:] = record
        except AttributeError:
            publish._claim_current()[:] = record
    except Exception:  # noqa: BLE001 - never raise into the app
        publish._failed()
    try:
        return callback(*args)
    finally:
        try:
            _TLS.view[:] = getattr(_loop_records, "record", _INVALID)
        except Exception:  # noqa: BLE001 - never raise into the app
            publish._failed()


def _record_now() -> bytes:
    """The record publish_current() would write now, without writing it."""
    otel = _otel_var.get(None) if _otel_var is not None else None
    span = None if otel is None else otel.get(_SPAN_KEY)
    return _INVALID if span is None else publish._remember(span)


def _patch_uvloop(uvloop: ModuleType) -> None:
    loop_class = getattr(uvloop, "Loop", None)
    if loop_class is None or "call_soon" in _patched_names(loop_class):
        return
    call_soon = loop_class.call_soon
    call_soon_threadsafe = loop_class.call_soon_threadsafe
    call_later = loop_class.call_later
    call_at = loop_class.call_at
    run_forever = loop_class.run_forever

    # Each bracket inlined (a Python call costs ~70 ns); what is not callable
    # passes as it is, for uvloop's own TypeError.
    def soon(self: Any, callback: Any, *args: Any, context: Any = None) -> Any:
        if _otel_var is not None and callback is not _bracket and callable(callback):
            return call_soon(self, _bracket, callback, *args, context=context)
        return call_soon(self, callback, *args, context=context)

    def soon_threadsafe(self: Any, callback: Any, *args: Any, context: Any = None) -> Any:
        if _otel_var is not None and callback is not _bracket and callable(callback):
            return call_soon_threadsafe(self, _bracket, callback, *args, context=context)
        return call_soon_threadsafe(self, callback, *args, context=context)

    def later(self: Any, delay: Any, callback: Any, *args: Any, context: Any = None) -> Any:
        if _otel_var is not None and callback is not _bracket and callable(callback):
            return call_later(self, delay, _bracket, callback, *args, context=context)
        return call_later(self, delay, callback, *args, context=context)

    def at(self: Any, when: Any, callback: Any, *args: Any, context: Any = None) -> Any:
        if _otel_var is not None and callback is not _bracket and callable(callback):
            return call_at(self, when, _bracket, callback, *args, context=context)
        return call_at(self, when, callback, *args, context=context)

    def forever(self: Any) -> Any:
        # The loop's own Context does not change while it runs (its code runs
        # in no other): its record, taken now, holds until run_forever returns.
        previous = getattr(_loop_records, "record", _INVALID)
        _loop_records.record = _record_now()
        try:
            return run_forever(self)
        finally:
            _loop_records.record = previous

    for name, patch in (("call_soon", soon), ("call_soon_threadsafe", soon_threadsafe),
                        ("call_later", later), ("call_at", at), ("run_forever", forever)):
        _replace(loop_class, name, patch)
    if sys.version_info >= (3, 12):
        _wrap_create_task(loop_class)


def _patched_names(owner: Any) -> List[str]:
    return _patches.names_on(owner)


# ------------------------------------------------------------ worker threads


def _entered_by(function: Any) -> Optional[contextvars.Context]:
    """The Context a work item enters first: ``partial(ctx.run, f, ...)`` or
    ``ctx.run`` (asyncio.to_thread: Lib/asyncio/threads.py)."""
    if type(function) is functools.partial:
        function = function.func
    owner = getattr(function, "__self__", None)
    if type(owner) is contextvars.Context and getattr(function, "__name__", "") == "run":
        return owner
    return None


def _patch_executor() -> None:
    work_item = futures_thread._WorkItem
    original_run = work_item.__dict__["run"]

    def run(self: Any, *args: Any) -> None:
        if not _active:
            return original_run(self, *args)  # type: ignore[no-any-return]
        # 3.8-3.13: self.fn; 3.14: self.task = (fn, args, kwargs) (WorkerContext).
        task = getattr(self, "task", None)
        function = task[0] if type(task) is tuple and task else getattr(self, "fn", None)
        entered = _entered_by(function)
        if entered is not None:
            publish_entered(entered)
        try:
            return original_run(self, *args)  # type: ignore[no-any-return]
        finally:
            publish_current(claim=False)

    _replace(work_item, "run", run)


class _InWorker:
    """A function anyio runs in a worker thread inside a copied Context
    (anyio/_backends/_asyncio.py, WorkerThread.run: ``context.run(func, *args)``)."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def __call__(self, *args: Any) -> Any:
        if not _active:
            return self.function(*args)
        publish_current()
        try:
            return self.function(*args)
        finally:
            # The worker's own Context: empty (a thread starts with one), so
            # its code between jobs is charged to no request.
            publish_entered(_NO_CONTEXT)


def _patch_anyio(backend: ModuleType) -> None:
    cls = getattr(backend, "AsyncIOBackend", None)
    method = getattr(cls, "__dict__", {}).get("run_sync_in_worker_thread")
    if not isinstance(method, classmethod) or "run_sync_in_worker_thread" in _patched_names(cls):
        return
    original = method.__func__

    def run_sync_in_worker_thread(klass: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        if _active and callable(func) and type(func) is not _InWorker:
            func = _InWorker(func)
        return original(klass, func, *args, **kwargs)

    _replace(cls, "run_sync_in_worker_thread", classmethod(run_sync_in_worker_thread))


# ---------------------------------------------------- patching, and imports

# Modules patched when they are imported (or at once, if they already are).
_AFTER_IMPORT: Dict[str, Callable[[ModuleType], None]] = {
    "uvloop": _patch_uvloop,
    "anyio._backends._asyncio": _patch_anyio,
}


_finder = import_hooks.PatchingFinder(_AFTER_IMPORT, lambda: _active)


def install() -> None:
    """Patch asyncio and the executor now, uvloop and anyio now or when imported.
    Idempotent; never raises."""
    global _active, _otel_var
    _otel_var = publish._otel_var
    if _active:
        return
    _active = True
    try:
        if not _patches.made:
            _patch_asyncio()
            _patch_executor()
        for name, patch in _AFTER_IMPORT.items():
            module = sys.modules.get(name)
            if module is not None:
                import_hooks.run_patch(patch, module)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
    except Exception:  # noqa: BLE001, S110 - the attach/detach hook still works
        pass


def uninstall() -> None:
    """Put every patched attribute back. Callbacks wrapped meanwhile stay
    wrapped but no longer publish."""
    global _active, _otel_var
    _active = False
    _otel_var = None
    try:
        while _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        _patches.undo()
    except Exception:  # noqa: BLE001, S110 - never raise into the app
        pass


def patched() -> List[str]:
    """What is patched now, as ``module.Class.attribute`` (diagnostics, tests)."""
    return _patches.describe()
