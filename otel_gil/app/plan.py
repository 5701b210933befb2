"""Where a process's registration goes, and how that passes to the processes it forks.

Three places a sidecar can be (docs/deployment.md, "Pre-fork servers"):
- shared: a long-running `otel-gil sidecar --listen PATH`;
- private, our own: the app spawns one; its abstract address `@otel-gil-PID-RANDOM`
  is chosen *and bound* by the app before anything is forked, then the listening
  socket is handed to the sidecar. A worker forked at any moment (before, during
  or after the sidecar's start) can therefore connect at once: the kernel queues
  it until the sidecar, done compiling, accepts;
- private, an ancestor's: a forked child joins its parent's; an exec'd
  descendant (multiprocessing's spawn and forkserver, a re-exec'd gunicorn
  master) finds it in PARENT_SOCKET, which the app that spawned it exports.

Runs inside the traced app: stdlib only, nothing here blocks or raises into it.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import List, Mapping, Optional

from otel_gil.config import Options

# Set by an app that spawned a private sidecar, for its exec'd descendants.
PARENT_SOCKET = "OTEL_PYTHON_GIL_PARENT_SOCKET"
# The secret that admits a process to that sidecar (the address itself is listed
# in /proc/net/unix for anyone to read). Forked children inherit it in memory,
# exec'd ones in this variable; the sidecar gets it in its environment, which
# only its own user can read (docs/security.md).
PARENT_TOKEN = "OTEL_PYTHON_GIL_PARENT_TOKEN"
OWNER_TOKEN = "OTEL_PYTHON_GIL_OWNER_TOKEN"
CAP_PERFMON, CAP_BPF = 38, 39
NO_EBPF = (", and this process may not use eBPF to start its own (that needs root, or "
           "CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN); run `otel-gil sidecar --listen PATH` "
           "as root and set OTEL_PYTHON_GIL_SOCKET=PATH")
# A fork waits this long at most for the agent thread to finish creating (and
# recording) a socket or starting the sidecar: see hold_forks().
FORK_WAIT_S = 1.0


@dataclass(frozen=True)
class Plan:
    """shared: a long-running sidecar's socket, tried first (once; with retries
    when patient). private: a private sidecar's abstract address. spawn: we
    start that sidecar; otherwise we join it, retrying until the start deadline.
    bound: private was bound before this process started, so nothing there
    means that sidecar is gone: no retrying. inherited: private came from
    PARENT_SOCKET; if that sidecar is gone, spawn our own when we may (a forked
    child never does). no_spawn: why we may not spawn one, appended to a
    failure to reach shared."""

    shared: Optional[str] = None
    private: Optional[str] = None
    spawn: bool = False
    patient: bool = False
    bound: bool = False
    inherited: bool = False
    no_spawn: str = ""
    token: str = ""  # admits us to the private sidecar (PARENT_TOKEN)

    @property
    def committed_to_spawn(self) -> bool:
        return self.spawn and self.private is not None and self.shared is None


def private_address() -> str:
    return f"@otel-gil-{os.getpid()}-{secrets.token_hex(8)}"


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


def plan_for(options: Options, environ: Optional[Mapping[str, str]] = None) -> Plan:
    """The plan of a process that calls instrument() itself (not a forked child)."""
    env = os.environ if environ is None else environ
    if options.mode == "connect":
        return Plan(shared=options.socket)
    inherited = env.get(PARENT_SOCKET, "")
    if not inherited.startswith("@"):
        inherited = ""
    shared = None
    if options.mode == "auto" and (options.socket_configured or options.socket.startswith("@")
                                   or os.path.exists(options.socket)):
        shared = options.socket
    if inherited:  # an ancestor's private sidecar: joining needs no privilege
        return Plan(shared=shared, private=inherited, bound=True, inherited=True,
                    token=env.get(PARENT_TOKEN, ""))
    if may_use_ebpf():
        return Plan(shared=shared, private=private_address(), spawn=True,
                    token=secrets.token_hex(16))
    return Plan(shared=shared, no_spawn=NO_EBPF)


def child_plan(plan: Plan, reached_shared: bool, chose_private: bool,
               bound: bool) -> Optional[Plan]:
    """A forked child's plan, from its parent's plan and how far the parent got
    (the child inherits a snapshot: the parent's agent thread may be anywhere;
    bound: the parent had bound plan.private, or joins a bound one). The child
    never spawns: it joins whatever its parent uses or will use."""
    if reached_shared:
        return Plan(shared=plan.shared, patient=True)
    if chose_private or plan.shared is None:
        return Plan(private=plan.private, bound=bound, token=plan.token) if plan.private else None
    # The parent is still trying the shared socket: try it too, then the private one.
    return Plan(shared=plan.shared, private=plan.private, patient=plan.patient,
                no_spawn=plan.no_spawn, token=plan.token)


def bind_private(address: str) -> socket.socket:
    """The private sidecar's listening socket, bound by the app. An abstract
    name (unix(7)) has no file, hence no permissions: workers that change user
    (gunicorn --user) still reach it; the sidecar decides whom it accepts."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + address[1:])
        sock.listen(socket.SOMAXCONN)  # every worker of a large server may queue at once
    except OSError:
        sock.close()
        raise
    return sock


# ----------------------------------------------------------- forks vs our sockets
#
# os.fork() in another thread copies every descriptor. A child must close its
# copies of ours: the owner connection (else the sidecar cannot see the owner
# exit), the listening socket (else, once the sidecar is gone, connects queue
# instead of failing). And a fork while subprocess.Popen runs copies Popen's
# exec-status pipe, so Popen waits until the *child* exits (CPython
# Lib/subprocess.py, _execute_child: os.read(errpipe_read) until every write end
# closes). So: sockets are created and recorded, and the sidecar is started,
# under _FORK_LOCK, which os.fork() takes for at most FORK_WAIT_S.

_FORK_LOCK = threading.Lock()
_held_for_fork = False


def hold_forks() -> threading.Lock:
    """The lock under which the agent creates descriptors a fork must not split."""
    return _FORK_LOCK


def _before_fork() -> None:
    global _held_for_fork
    _held_for_fork = _FORK_LOCK.acquire(timeout=FORK_WAIT_S)


def _after_fork() -> None:
    global _held_for_fork
    if _held_for_fork:
        _held_for_fork = False
        _FORK_LOCK.release()


def close_copies(socks: List[socket.socket]) -> None:
    """In a forked child: close our copies without shutting the connections down
    (close() of a copy leaves the parent's end of the connection intact)."""
    for s in socks:
        try:
            fd = s.detach()
            if fd >= 0:
                os.close(fd)
        except OSError:
            pass


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork,
                    after_in_child=_after_fork)
