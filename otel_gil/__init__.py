"""otel-gil: GIL waits and holds, measured by eBPF uprobes, inside OpenTelemetry traces.

    import otel_gil
    otel_gil.instrument()            # never raises; attaches in the background
    otel_gil.wait_until_live(10)     # optional: True once the probes are live

Options: keyword arguments or OTEL_PYTHON_GIL_* variables (otel_gil.config).
The same runs under `opentelemetry-instrument python app.py` through the
`opentelemetry_instrumentor` entry point (otel_gil.instrumentor).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Dict, Optional

__version__ = "0.1.0"
__all__ = ["instrument", "uninstrument", "wait_until_live", "status"]

log = logging.getLogger("otel_gil")
_lock = threading.Lock()
_agent: Any = None  # otel_gil.agent.Agent, imported lazily
_fork_hook = False
_exported = False  # we set otel_gil.app.plan.PARENT_SOCKET


def instrument(tracer_provider: Any = None, meter_provider: Any = None, **options: Any) -> None:
    """Publish this process's span contexts and have a sidecar trace its GIL.

    tracer_provider: its resource (service.name, ...) is given to the sidecar,
    so GIL spans land in this app's service; default: the global provider.
    meter_provider: accepted for symmetry with other instrumentations; GIL
    metrics are exported by the sidecar, under the same resource.
    Calling it twice is harmless. It never raises: a failure is one warning."""
    global _agent, _fork_hook
    try:
        from otel_gil import config  # noqa: PLC0415 - keep `import otel_gil` light

        opts = config.load(options)
        if opts.mode == "off":
            return
        with _lock:
            if _agent is not None:
                return
            from otel_gil.app import (
                context,  # noqa: PLC0415
                process_context,
            )

            table = context.install()
            context.watch_span_ends(tracer_provider)
            resource = _resource_attributes(tracer_provider)
            try:
                process_context.publish_process_context(resource)
            except Exception:  # noqa: BLE001, S110 - optional for other readers
                pass
            _agent = _start_agent(opts, table, resource)
            _export_for_descendants(_agent)
            if not _fork_hook:
                os.register_at_fork(after_in_child=_after_fork_in_child)
                _fork_hook = True
    except Exception as exc:  # noqa: BLE001 - never raise into the app
        log.warning("otel-gil: GIL tracing off: %s: %s", type(exc).__name__, exc)


def _start_agent(opts: Any, table: Any, resource: Dict[str, Any], plan: Any = None) -> Any:
    from otel_gil.app import protocol  # noqa: PLC0415
    from otel_gil.app.agent import Agent  # noqa: PLC0415

    registration = {"op": "register", "version": protocol.VERSION, "pid": os.getpid(),
                    "ctx_table": table.address, "ctx_slots": table.slots, "resource": resource}
    agent = Agent(opts, registration, plan)
    agent.start()
    return agent


def _export_for_descendants(agent: Any) -> None:
    """An app that spawns a private sidecar tells the programs it execs (the
    multiprocessing spawn and forkserver start methods, a re-exec'd server) to
    join it rather than spawn sidecars of their own (otel_gil.app.plan)."""
    global _exported
    from otel_gil.app.plan import PARENT_SOCKET, PARENT_TOKEN  # noqa: PLC0415

    if agent.plan.committed_to_spawn and not os.environ.get(PARENT_SOCKET):
        os.environ[PARENT_SOCKET] = agent.plan.private
        os.environ[PARENT_TOKEN] = agent.plan.token
        _exported = True


def _resource_attributes(tracer_provider: Any) -> Dict[str, Any]:
    if tracer_provider is None:
        from opentelemetry import trace  # noqa: PLC0415

        tracer_provider = trace.get_tracer_provider()
    resource = getattr(tracer_provider, "resource", None)
    attrs = dict(getattr(resource, "attributes", None) or {})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}


def _after_fork_in_child() -> None:
    """A forked worker (gunicorn, uwsgi, multiprocessing): register it too, with
    the sidecar its parent uses or is about to use, and leave the parent's
    registration alone. Only starts a thread: the connecting, and waiting for a
    sidecar still starting, happen there (otel_gil.app.plan)."""
    global _agent, _lock
    _lock = threading.Lock()  # another thread of the parent may have held it
    parent = _agent
    if parent is None:
        return
    try:
        plan = parent.child_plan()
        parent.forget_in_child()
        if plan is None:  # the parent's tracing is off: status() keeps saying why
            return
        from otel_gil.app import context  # noqa: PLC0415

        _agent = None
        _agent = _start_agent(parent.options, context.current_table(),
                              parent.registration["resource"], plan)
    except Exception as exc:  # noqa: BLE001 - never raise into the app
        log.warning("otel-gil: GIL tracing off in worker %s: %s", os.getpid(), exc)


def wait_until_live(timeout: float = 10.0) -> bool:
    """Block until the probes are attached to this process (True), or until it is
    clear they will not be, or the timeout passes (False)."""
    agent = _agent
    if agent is None:
        return False
    deadline = time.monotonic() + timeout
    while not agent.live.wait(0.05):
        if agent.done.is_set() or time.monotonic() >= deadline:
            return False
    return not agent.done.is_set()


def status() -> Optional[str]:
    """None while tracing is live or starting; otherwise why it is off."""
    agent = _agent
    if agent is None:
        return "not instrumented"
    error: Optional[str] = agent.error
    return error


def uninstrument() -> None:
    """Stop tracing this process and unhook the context publishing."""
    global _agent, _exported
    with _lock:
        agent, _agent = _agent, None
    try:
        if _exported:
            from otel_gil.app.plan import PARENT_SOCKET, PARENT_TOKEN  # noqa: PLC0415

            os.environ.pop(PARENT_SOCKET, None)
            os.environ.pop(PARENT_TOKEN, None)
            _exported = False
        if agent is not None:
            agent.stop()
        from otel_gil.app import context  # noqa: PLC0415

        context.uninstall()
    except Exception as exc:  # noqa: BLE001
        log.warning("otel-gil: uninstrument: %s", exc)
