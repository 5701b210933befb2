"""The app's side of tracing: find or start a sidecar and register with it, in
the background. Never raises into the app; a failure is one log line, then
nothing. Runs inside the traced app (Python 3.8+, stdlib only here).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
from typing import Any, Dict, List, Optional

from otel_gil import protocol
from otel_gil.config import Options

log = logging.getLogger("otel_gil")

CAP_PERFMON, CAP_BPF = 38, 39
OS_BCC = "/usr/lib/python3/dist-packages/bcc"


def may_use_ebpf() -> bool:
    """Root, or CAP_BPF + CAP_PERFMON in the effective set."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1)


def sidecar_command(options: Options, owner_fd: int, listen: str) -> List[str]:
    python = options.sidecar_python or sys.executable
    return [python, "-m", "otel_gil", "sidecar", "--owner-fd", str(owner_fd),
            "--listen", listen, "--wait-threshold-ms", str(options.wait_threshold_ms),
            "--hold-threshold-ms", str(options.hold_threshold_ms),
            "--prometheus-port", str(options.prometheus_port),
            "--max-thread-labels", str(options.max_thread_labels), "--probes", options.probes]


def sidecar_env() -> Dict[str, str]:
    """The app's environment (so OTEL_EXPORTER_OTLP_* apply), plus a path where
    the OS's bcc module is importable when this interpreter lacks it: bcc is pure
    Python over libbcc.so, so any Python 3 can use it, but putting all of
    dist-packages on the path could shadow the app's own packages."""
    env = dict(os.environ)
    # Under `opentelemetry-instrument`, PYTHONPATH carries its sitecustomize,
    # which would instrument the sidecar too, and so spawn a sidecar of its
    # own, and so on: the sidecar is never traced itself.
    env["OTEL_PYTHON_GIL_MODE"] = "off"
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
             if p and "auto_instrumentation" not in p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if importlib.util.find_spec("bcc") is None and os.path.isdir(OS_BCC):
        shim = os.path.join(tempfile.gettempdir(), f"otel-gil-bcc-{os.geteuid()}")
        os.makedirs(shim, exist_ok=True)
        link = os.path.join(shim, "bcc")
        if not os.path.islink(link):
            try:
                os.symlink(OS_BCC, link)
            except FileExistsError:
                pass
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [shim, env.get("PYTHONPATH")]))
    return env


class Agent:
    """One registration of this process with a sidecar, made in a daemon thread."""

    def __init__(self, options: Options, registration: Dict[str, Any]) -> None:
        self.options = options
        self.registration = registration
        self.live = threading.Event()
        self.done = threading.Event()
        self.error: Optional[str] = None
        self.listen: Optional[str] = None  # a spawned sidecar's address, for forked workers
        self.sidecar: Optional[subprocess.Popen[bytes]] = None
        self._sock: Optional[socket.socket] = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="otel-gil-agent", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._sock = self._open()
            if self._sock is None:
                return
            self._sock.sendall(protocol.encode(self.registration))
            reply = protocol.read_message(self._sock, self.options.start_timeout_s)
            if not reply.get("ok"):
                self._fail(f"the sidecar refused: {reply.get('error', '?')}")
                return
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

    def _open(self) -> Optional[socket.socket]:
        mode, opts = self.options.mode, self.options
        why = f"no sidecar at {opts.socket}"
        if mode == "connect" or (mode == "auto" and (
                opts.socket_configured or opts.socket.startswith("@")
                or os.path.exists(opts.socket))):
            try:
                return self._connect(opts.socket)
            except OSError as exc:
                why = f"cannot connect to the sidecar at {opts.socket} ({exc.strerror or exc})"
                if mode == "connect":
                    self._fail(why)
                    return None
        if may_use_ebpf():
            return self._spawn()
        self._fail(f"{why}, and this process may not use eBPF to start its own (that needs "
                   "root, or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN); run `otel-gil sidecar "
                   "--listen PATH` as root and set OTEL_PYTHON_GIL_SOCKET=PATH")
        return None

    @staticmethod
    def _connect(path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(protocol.unix_address(path))
        return sock

    def _spawn(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listen = f"@otel-gil-{os.getpid()}-{secrets.token_hex(4)}"
        cmd = sidecar_command(self.options, theirs.fileno(), self.listen)
        try:
            self.sidecar = subprocess.Popen(
                cmd, pass_fds=[theirs.fileno()], env=sidecar_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, start_new_session=True)
        finally:
            theirs.close()
        return ours

    def stop(self) -> None:
        """Close our end: the sidecar detaches (a spawned one exits)."""
        self._stopping = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self.sidecar is not None:
            try:
                self.sidecar.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.sidecar.kill()

    def forget_in_child(self) -> None:
        """After fork, in the child: drop the inherited socket without touching
        the parent's registration (closing our copy of the fd does not close it)."""
        self._stopping = True
        if self._sock is not None:
            try:
                os.close(self._sock.detach())
            except OSError:
                pass
