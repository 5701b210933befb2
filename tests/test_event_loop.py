"""otel_gil/app/event_loop.py on real loops and pools, without probes: the app's own
context slot (read back from its table) at each point where the running
contextvars Context changes with no attach/detach. Each scenario runs in a
fresh interpreter, so that patching and import order are the app's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any, Dict

import pytest
from app_site import app_paths
from targets import all_targets, require, spawn

PRELUDE = '''
import asyncio, json, sys, threading
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from otel_gil.app import context
from otel_gil.app import event_loop
trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("t")

def slot():
    """The span id in this thread's slot (hex), or None for "no span"."""
    view = getattr(context._tls, "view", None)
    if view is None or not view[24]:
        return None
    return bytes(view[16:24]).hex()

def sid(span):
    return f"{span.get_span_context().span_id:016x}"
'''


def run(body: str, python: str = sys.executable) -> Dict[str, Any]:
    code = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


TASKS = '''
class Selector(__import__("selectors").DefaultSelector):
    seen = []
    def select(self, timeout=None):
        Selector.seen.append(slot())  # the loop's own code, between steps
        return super().select(timeout)

wrong = []
async def task(i):
    with tracer.start_as_current_span(f"t{i}") as span:
        for _ in range(20):
            if slot() != sid(span):
                wrong.append(i)
            await asyncio.sleep(0.0005)

async def main():
    await asyncio.gather(*(task(i) for i in range(8)))
'''


def test_each_asyncio_step_publishes_its_tasks_span_and_the_loop_none() -> None:
    # GIVEN 8 tasks in their own spans on asyncio's loop, hooked
    out = run(TASKS + '''
context.install()
with tracer.start_as_current_span("loop") as loop_span:
    asyncio.SelectorEventLoop(Selector()).run_until_complete(main())
print(json.dumps({"wrong": wrong, "selects": sorted(set(map(str, Selector.seen))),
                  "loop": sid(loop_span)}))
''')
    # THEN in every step the slot held that task's span, and in the loop's own
    # code the loop's (the span it runs in)
    assert out["wrong"] == []
    assert out["selects"] == [out["loop"]]


def test_without_the_patch_the_last_span_entered_stays_published() -> None:
    # GIVEN the same tasks with only the attach/detach hook (the old behaviour)
    out = run(TASKS + '''
context.install()
event_loop.uninstall()
asyncio.SelectorEventLoop(Selector()).run_until_complete(main())
print(json.dumps({"wrong": len(wrong), "selects": len([s for s in Selector.seen if s])}))
''')
    # THEN steps and the loop's code see another task's span: what the patch fixes
    assert out["wrong"] > 0 and out["selects"] > 0


def test_tasks_created_before_instrument_and_call_soon_callbacks() -> None:
    out = run('''
seen = {}
async def early():
    with tracer.start_as_current_span("early") as span:
        await asyncio.sleep(0.01)  # GIVEN a task suspended in its span when install() runs
        seen["early"] = (slot(), sid(span))

def callback(name, span):
    seen[name] = (slot(), sid(span) if span else None)

async def main():
    task = asyncio.ensure_future(early())
    await asyncio.sleep(0)
    context.install()
    loop = asyncio.get_running_loop()
    with tracer.start_as_current_span("scheduler") as span:
        loop.call_soon(callback, "soon", span)  # runs in a copy of this Context
        loop.call_later(0.001, callback, "later", span)
    loop.call_soon(callback, "outside", None)
    await task
    await asyncio.sleep(0.01)

asyncio.run(main())
print(json.dumps(seen))
''')
    # THEN its next step publishes its span, and callbacks publish the span of
    # the Context they were scheduled in (or none)
    for name in ("early", "soon", "later", "outside"):
        assert out[name][0] == out[name][1], name


def test_worker_threads_publish_the_copied_context_and_drop_it_after() -> None:
    out = run('''
import anyio.to_thread
from concurrent.futures import ThreadPoolExecutor
seen = {}
def job(name):
    seen[name] = (slot(), threading.current_thread().name)

async def main():
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(1)
    with tracer.start_as_current_span("request") as span:
        seen["span"] = sid(span)
        await asyncio.to_thread(job, "to_thread")  # partial(ctx.run, job) in the default pool
        await anyio.to_thread.run_sync(job, "anyio")
        await loop.run_in_executor(pool, job, "plain")  # no Context is copied here
    await loop.run_in_executor(None, job, "after")  # the same default-pool thread, later
    await anyio.to_thread.run_sync(job, "anyio-after")
    pool.shutdown()

context.install()
asyncio.run(main())
print(json.dumps(seen))
''')
    # THEN a job run in the request's copied Context publishes its span
    assert out["to_thread"][0] == out["span"]
    assert out["anyio"][0] == out["span"]
    # AND one run in the pool thread's own Context publishes none, even on a
    # thread that ran the request's job before
    assert out["plain"][0] is None
    assert out["after"][0] is None and out["after"][1] == out["to_thread"][1]
    assert out["anyio-after"][0] is None and out["anyio-after"][1] == out["anyio"][1]


def test_uvloop_imported_after_install_is_patched_and_steps_are_exact() -> None:
    out = run(TASKS + '''
context.install()
import uvloop  # after install(): patched as it is imported
with tracer.start_as_current_span("loop") as loop_span:
    uvloop.new_event_loop().run_until_complete(main())
print(json.dumps({"wrong": wrong, "patched": event_loop.patched(),
                  "loader": type(uvloop.__loader__).__name__,
                  "spec_loader": type(uvloop.__spec__.loader).__name__}))
''')
    assert "uvloop.Loop.call_soon" in out["patched"]
    # THEN the module keeps its own loader, and every step saw its task's span
    assert out["loader"] == out["spec_loader"] == "SourceFileLoader"
    assert out["wrong"] == []


def test_patched_run_keeps_asyncio_semantics_and_uninstall_restores() -> None:
    out = run('''
import concurrent.futures.thread as cft
originals = (asyncio.events.Handle._run, cft._WorkItem.run)
context.install()
patched = (asyncio.events.Handle._run, cft._WorkItem.run)
errors = []
def boom():
    raise KeyError("x")
async def main():
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, ctx: errors.append(repr(ctx["exception"])))
    loop.call_soon(boom)
    await asyncio.sleep(0.01)
asyncio.run(main())
context.uninstall()
print(json.dumps({"errors": errors, "changed": patched != originals,
                  "restored": (asyncio.events.Handle._run, cft._WorkItem.run) == originals,
                  "finder": any(type(f).__name__ == "_Finder" for f in sys.meta_path)}))
''')
    # THEN a raising callback reaches the loop's exception handler as it is
    assert out["errors"] == ["KeyError('x')"]
    # AND uninstall() puts every patched attribute and the import hook back
    assert out["changed"] and out["restored"] and not out["finder"]


def test_a_span_that_ends_while_current_publishes_no_span() -> None:
    out = run('''
context.install()
context.watch_span_ends(None)
span = tracer.start_span("server")
with trace.use_span(span, end_on_exit=False):
    before = slot()
    span.end()  # as ASGI middleware does when the response is sent
    after_end = slot()
    with tracer.start_as_current_span("child"):
        pass
    after_child = slot()  # the detach republishes the (ended) server span
print(json.dumps({"before": before, "span": sid(span), "after_end": after_end,
                  "after_child": after_child}))
''')
    assert out["before"] == out["span"]
    assert out["after_end"] is None and out["after_child"] is None


def test_a_span_publishes_no_span_before_its_end_time_is_set() -> None:
    out = run('''
from opentelemetry.sdk.trace import SpanProcessor
seen = []
class Peek(SpanProcessor):
    """Runs before otel-gil's own processor, as a BatchSpanProcessor added first would."""
    def on_end(self, span):
        seen.append(slot())
trace.get_tracer_provider().add_span_processor(Peek())
context.install()
context.watch_span_ends(None)
span = tracer.start_span("server")
with trace.use_span(span, end_on_exit=False):
    before = slot()
    span.end()
print(json.dumps({"before": before, "span": sid(span), "at_end": seen}))
''')
    # THEN by the time the SDK has set its end time, the span is no longer published
    assert out["before"] == out["span"] and out["at_end"] == [None]


def test_a_span_end_is_marked_once() -> None:
    out = run('''
from otel_gil.app import publish
marked = []
class Marks(dict):
    def __setitem__(self, key, value):
        marked.append(key)
        super().__setitem__(key, value)
publish._ended = Marks()
context.install()
context.watch_span_ends(None)
span = tracer.start_span("plain")
with trace.use_span(span, end_on_exit=False):
    span.end()
    after = slot()
print(json.dumps({"marked": len(marked), "after": after}))
''')
    # THEN the patched Span.end marks it, and the processor that sees it after finds it done
    assert out == {"marked": 1, "after": None}


def test_a_span_ended_by_another_thread_while_it_is_cached_publishes_no_span() -> None:
    out = run('''
from otel_gil.app import publish
context.install()
context.watch_span_ends(None)

class EndsDuringTheCheck:
    """A span another thread ends just after _remember() saw it live, before
    the entry is stored: span_ended() finds nothing to mark yet."""
    def __init__(self, span):
        self.span, self.looked = span, False
    def get_span_context(self):
        return self.span.get_span_context()
    @property
    def end_time(self):
        if not self.looked:
            self.looked = True
            ended = threading.Thread(target=self.span.end)
            ended.start(); ended.join()
            return None
        return self.span.end_time

racing = EndsDuringTheCheck(tracer.start_span("racing"))
with trace.use_span(racing):
    during = slot()  # ended while it was being remembered
with trace.use_span(racing):
    after = slot()

# the cache cleared (past _CACHE_MAX) by another thread, then the span ends
kept = tracer.start_span("kept")
with trace.use_span(kept):
    cached = slot()
def fill():
    for i in range(publish._CACHE_MAX + 1):
        with tracer.start_as_current_span(f"filler{i}"):
            pass
filler = threading.Thread(target=fill); filler.start(); filler.join()
kept.end()
with trace.use_span(kept):
    after_clear = slot()

# an ended span's SpanContext shared by a span object that never ends (what the
# SDK's disabled tracer returns), remembered once the ended one's entry is cleared
shared = tracer.start_span("shared")
with trace.use_span(shared):
    pass
shared.end()
filler = threading.Thread(target=fill); filler.start(); filler.join()
with trace.use_span(trace.NonRecordingSpan(shared.get_span_context())):
    pass
with trace.use_span(shared):
    after_shared = slot()
print(json.dumps({"during": during, "after": after, "racing": sid(racing.span),
                  "cached": cached, "kept": sid(kept), "after_clear": after_clear,
                  "after_shared": after_shared}))
''')
    # THEN once it has ended, the span is never published again
    assert out["during"] is None and out["after"] is None
    assert out["cached"] == out["kept"] and out["after_clear"] is None
    assert out["after_shared"] is None


EAGER = '''
import asyncio, json, threading
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from otel_gil.app import context
trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("t")
def slot():
    view = context._tls.view
    return bytes(view[16:24]).hex() if view[24] else None
def sid(span):
    return f"{span.get_span_context().span_id:016x}"
seen = {}
async def child():
    with tracer.start_as_current_span("eager-child") as span:
        seen["child"] = (slot(), sid(span))
        await asyncio.sleep(0.001)  # suspends inside its span, in create_task
async def main():
    asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
    with tracer.start_as_current_span("parent") as span:
        task = asyncio.create_task(child())
        seen["parent"] = (slot(), sid(span))  # back in the parent's step
        await task
context.install()
asyncio.run(main())
print(json.dumps(seen))
'''


@pytest.mark.parametrize("name", ["pyenv-3.12", "sid-3.14"])
def test_eager_tasks_give_the_slot_back_to_their_creator(name: str) -> None:
    target = next(t for t in all_targets() if t.name == name)
    require(target)
    # GIVEN an eager task factory: a task's first step runs inside create_task
    with app_paths(target) as pythonpath, \
            spawn(target, EAGER, env={"PYTHONPATH": pythonpath}) as child:
        out = child.read_json(timeout=60)
    # THEN the eager step publishes its span, and its creator's comes back after
    assert out["child"][0] == out["child"][1]
    assert out["parent"][0] == out["parent"][1]


WATCHER = '''
import contextvars, ctypes, json
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.py_object)(lambda e, c: 0)
add = ctypes.pythonapi.PyContext_AddWatcher
add.argtypes, add.restype = [type(callback)], ctypes.c_int
add(callback)
def boom():
    raise KeyError("the app's own")
try:
    contextvars.copy_context().run(boom)
    raised = None
except BaseException as exc:
    raised = type(exc).__name__
print(json.dumps({"raised": raised}))
'''


def test_a_ctypes_context_watcher_would_lose_the_apps_exceptions() -> None:
    # Why 3.14 uses the patches too (otel_gil/app/event_loop.py): GIVEN a context
    # watcher written with ctypes, as a pure-Python package would have to
    target = next(t for t in all_targets() if t.name == "sid-3.14")
    require(target)
    with spawn(target, WATCHER) as child:
        out = child.read_json(timeout=60)
    # WHEN Context.run leaves a Context after the called function raised THEN
    # the app gets SystemError instead of its KeyError. If this ever fails,
    # ctypes keeps pending exceptions: the watcher becomes an option.
    assert out["raised"] == "SystemError"
