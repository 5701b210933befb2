"""The app's side of tracing: find or start a sidecar and register with it, in
the background. Never raises into the app; a failure is one log line, then
nothing. Runs inside the traced app (Python 3.8+, stdlib only here).
Where the registration goes, and how forked workers follow: otel_gil.app.plan.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from otel_gil.app import plan as plans
from otel_gil.app import protocol
from otel_gil.app.plan import Plan
from otel_gil.config import Options

log = logging.getLogger("otel_gil")

# Joining a sidecar that is not listening yet (or whose backlog is full): retry
# with doubling waits, up to the start deadline (options.start_timeout_s).
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 1.0
RETRY_ERRNOS = (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN, errno.ETIMEDOUT)
MIN_REPLY_S = 5.0  # a join that connected near its deadline still waits this long
_PARENTS_SIDECARS: List[subprocess.Popen[bytes]] = []  # in a forked child: not its to reap


# What a spawned sidecar's interpreter runs, instead of `-m otel_gil`: both `-m`
# and `-c` put the working directory first on sys.path, and a root app may run
# in a directory that other users can write. The bootstrap drops it, makes the
# app's own otel_gil importable (argv[1], code the app already runs as root;
# appended, so an install the interpreter finds itself keeps its own finders),
# loads the OS's bcc from its root-owned directory if need be (otel_gil.trust),
# then runs the CLI. Nothing is read from a path another user could prepare.
BOOTSTRAP = (
    "import sys\n"
    "sys.path[:] = [p for p in sys.path if p not in ('', '.')]\n"
    "sys.path.append(sys.argv.pop(1))\n"
    "from otel_gil.trust import import_os_bcc\n"
    "why = import_os_bcc()\n"
    "if why:\n"
    "    sys.exit('otel-gil sidecar: error: ' + why)\n"
    "from otel_gil.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def package_parent() -> str:
    """The directory this otel_gil package was imported from."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sidecar_command(options: Options, owner_fd: int, listen_fd: int) -> List[str]:
    python = options.sidecar_python or sys.executable
    return [python, "-c", BOOTSTRAP, package_parent(), "sidecar", "--owner-fd", str(owner_fd),
            "--listen-fd", str(listen_fd), "--wait-threshold-ms", str(options.wait_threshold_ms),
            "--hold-threshold-ms", str(options.hold_threshold_ms),
            "--stack-threshold-ms", str(options.stack_threshold_ms),
            "--prometheus-port", str(options.prometheus_port),
            "--max-thread-labels", str(options.max_thread_labels),
            "--ringbuf-pages", str(options.ringbuf_pages), "--probes", options.probes]


def sidecar_env(cwd: Optional[str] = None) -> Dict[str, str]:
    """The app's environment (so OTEL_EXPORTER_OTLP_* apply), with a PYTHONPATH
    that means what it meant to the app although the sidecar runs in /: empty
    entries (the working directory) dropped, relative ones made absolute."""
    env = dict(os.environ)
    # Under `opentelemetry-instrument`, PYTHONPATH carries its sitecustomize,
    # which would instrument the sidecar too, and so spawn a sidecar of its
    # own, and so on: the sidecar is never traced itself.
    env["OTEL_PYTHON_GIL_MODE"] = "off"
    base = cwd if cwd is not None else os.getcwd()
    paths = [os.path.join(base, p) for p in env.get("PYTHONPATH", "").split(os.pathsep)
             if p and "auto_instrumentation" not in p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONSAFEPATH"] = "1"  # 3.11+: no script or working directory on sys.path
    return env


class Agent:
    """One registration of this process with a sidecar, made in a daemon thread."""

    def __init__(self, options: Options, registration: Dict[str, Any],
                 plan: Optional[Plan] = None) -> None:
        self.options = options
        self.registration = registration
        self.plan = plan if plan is not None else plans.plan_for(options)
        self.live = threading.Event()
        self.done = threading.Event()
        self.error: Optional[str] = None
        self.sidecar: Optional[subprocess.Popen[bytes]] = None
        self._sock: Optional[socket.socket] = None
        self._stopping = False
        # How far the thread got, for a child forked meanwhile (child_plan).
        self._reached_shared = False
        self._chose_private = False
        self._owned: List[socket.socket] = []  # every socket we made, open or not
        self._listener: Optional[socket.socket] = None
        if self.plan.committed_to_spawn:
            self._bind_early()
        self._thread = threading.Thread(target=self._run, name="otel-gil-agent", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.options.start_timeout_s
        try:
            self._sock = self._open(deadline)
            if self._sock is None:
                return
            message = dict(self.registration, token=self.plan.token) if self.plan.token \
                else self.registration
            self._sock.sendall(protocol.encode(message))
            reply = protocol.read_message(self._sock,
                                          max(deadline - time.monotonic(), MIN_REPLY_S))
            if not reply.get("ok"):
                self._fail(f"the sidecar refused: {reply.get('error', '?')}")
                return
            if reply.get("watching"):
                # A free-threaded app whose GIL is off: said once, here; the
                # sidecar attaches the probes if the GIL is enabled later.
                log.warning("otel-gil: %s: nothing to measure yet; the sidecar traces from "
                            "the moment the GIL is enabled", reply["watching"])
            self.live.set()
            self._sock.settimeout(None)
            while self._sock.recv(4096):
                pass  # the sidecar never talks after the reply; EOF means it is gone
            if not self._stopping:
                self._fail("the sidecar went away; GIL tracing stopped, the app carries on")
        except Exception as exc:  # noqa: BLE001 - never raise into the app
            if not self._stopping:
                self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            self.done.set()

    def _fail(self, why: str) -> None:
        self.error = why
        log.warning("otel-gil: GIL tracing off: %s", why)

    def _open(self, deadline: float) -> Optional[socket.socket]:
        plan, why = self.plan, f"no sidecar at {self.options.socket}"
        if plan.shared:
            try:
                sock = self._connect(plan.shared, deadline if plan.patient else None)
                self._reached_shared = True
                return sock
            except OSError as exc:
                why = f"cannot connect to the sidecar at {plan.shared} ({_reason(exc)})"
        if plan.private is None:
            self._fail(why + plan.no_spawn)
            return None
        self._chose_private = True  # from here on, a forked child joins plan.private
        if plan.spawn:
            return self._spawn()
        try:
            return self._connect(plan.private, deadline, refused_is_final=plan.bound)
        except OSError as exc:
            gone = plan.bound and exc.errno == errno.ECONNREFUSED
            if gone and plan.inherited and plans.may_use_ebpf():
                # Our ancestor's sidecar is gone (a stale PARENT_SOCKET): our own, then.
                self.plan = Plan(private=plans.private_address(), spawn=True)
                return self._spawn()
            how = f"no answer within {self.options.start_timeout_s:g} s"
            if gone:
                how = "it is gone" + (plans.NO_EBPF if plan.inherited else "")
            self._fail(f"cannot join the sidecar of the process that started this one, at "
                       f"{plan.private}: {how} ({_reason(exc)})")
            return None

    def _own(self, sock: socket.socket) -> socket.socket:
        """Record a socket just made (call under plans.hold_forks())."""
        self._owned = [s for s in self._owned if s.fileno() >= 0] + [sock]
        return sock

    def _connect(self, path: str, deadline: Optional[float],
                 refused_is_final: bool = False) -> socket.socket:
        """Connect; with a deadline, retry (doubling waits) while the sidecar is
        not listening yet or its backlog is full."""
        delay = RETRY_FIRST_S
        while True:
            with plans.hold_forks():
                sock = self._own(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            try:
                sock.settimeout(5)
                sock.connect(protocol.unix_address(path))
                return sock
            except OSError as exc:
                sock.close()
                if (deadline is None or self._stopping or not _retryable(exc)
                        or (refused_is_final and exc.errno == errno.ECONNREFUSED)
                        or time.monotonic() + delay > deadline):
                    raise
            time.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_S)

    def _bind_early(self) -> None:
        """Bind the private sidecar's address now, in instrument(): a worker
        forked from here on can connect at once. On failure _spawn tries again
        and reports it."""
        assert self.plan.private is not None
        with plans.hold_forks():
            try:
                self._listener = self._own(plans.bind_private(self.plan.private))
            except OSError:
                self._listener = None

    def _spawn(self) -> socket.socket:
        assert self.plan.private is not None
        env = sidecar_env()
        env[plans.OWNER_TOKEN] = self.plan.token
        with plans.hold_forks():
            if self._listener is None:
                self._listener = self._own(plans.bind_private(self.plan.private))
            listener = self._listener
            ours, theirs = (self._own(s) for s in
                            socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM))
            cmd = sidecar_command(self.options, theirs.fileno(), listener.fileno())
            try:
                self.sidecar = subprocess.Popen(
                    cmd, pass_fds=[theirs.fileno(), listener.fileno()], env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
                    cwd="/")
            except BaseException:
                ours.close()
                raise
            finally:
                # The sidecar has its copies. Ours of the listener would keep
                # connects queueing once the sidecar is gone, instead of failing.
                theirs.close()
                listener.close()
                self._listener = None
        return ours

    def stop(self) -> None:
        """Close our end: the sidecar detaches (a spawned one flushes and exits).

        Never waits for the sidecar: one that is stopped (SIGSTOP, a debugger)
        or slow to flush to an unreachable endpoint must not hold up the app's
        uninstrument() or exit. Closing a Unix socket does not block, and a
        spawned sidecar is reaped by a daemon thread whenever it ends (if we
        exit first, it is re-parented and reaped by init)."""
        self._stopping = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self.sidecar is not None:
            try:
                threading.Thread(target=self.sidecar.wait, name="otel-gil-reaper",
                                 daemon=True).start()
            except RuntimeError:
                pass  # at interpreter shutdown no thread can start: init reaps it

    def child_plan(self) -> Optional[Plan]:
        """In a forked child: where its own registration goes (None: the parent's
        tracing is off or over, and the parent already said why)."""
        if self.error is not None or self.done.is_set():
            return None
        bound = self._listener is not None or self.sidecar is not None or self.plan.bound
        return plans.child_plan(self.plan, self._reached_shared, self._chose_private, bound)

    def forget_in_child(self) -> None:
        """After fork, in the child: drop the inherited sockets without touching
        the parent's registration (closing our copy of an fd does not close it),
        and the parent's sidecar, which is not the child's to wait for."""
        self._stopping = True
        plans.close_copies(self._owned)
        self._owned = []
        self._sock = self._listener = None
        if self.sidecar is not None:  # kept, never polled: a collected Popen would try to reap it
            _PARENTS_SIDECARS.append(self.sidecar)
        self.sidecar = None


def _retryable(exc: OSError) -> bool:
    return isinstance(exc, socket.timeout) or exc.errno in RETRY_ERRNOS


def _reason(exc: OSError) -> str:
    return str(exc.strerror or exc)
