"""otel_gil.app.plan and the agent's joining, without eBPF: where a registration goes,
what a forked child inherits, and, in real child processes, the abstract socket
bound before any sidecar exists, retries until a sidecar listens, the deadline,
a worker that changes user, and a fork that waits for the agent's descriptors.
(With the real sidecar and real servers: tests/test_prefork.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from otel_gil.app import plan as plans
from otel_gil.app.plan import PARENT_SOCKET, Plan
from otel_gil.config import Options


@pytest.fixture
def ebpf_allowed(monkeypatch: Any) -> None:
    monkeypatch.setattr(plans, "may_use_ebpf", lambda: True)


@pytest.fixture
def ebpf_denied(monkeypatch: Any) -> None:
    monkeypatch.setattr(plans, "may_use_ebpf", lambda: False)


def test_a_privileged_app_commits_to_its_own_sidecar(ebpf_allowed: None,
                                                     tmp_path: Path) -> None:
    # GIVEN no shared socket WHEN an app that may use eBPF plans
    plan = plans.plan_for(Options(socket=str(tmp_path / "absent.sock")), {})
    # THEN it spawns a private sidecar at an unguessable abstract name of its own
    assert plan.committed_to_spawn and plan.shared is None
    assert plan.private is not None and plan.private.startswith(f"@otel-gil-{os.getpid()}-")
    assert plan.private != plans.plan_for(Options(socket=str(tmp_path / "x")), {}).private


def test_a_shared_socket_comes_first_then_a_private_sidecar(ebpf_allowed: None,
                                                            tmp_path: Path) -> None:
    sock = tmp_path / "otel-gil.sock"
    sock.touch()
    plan = plans.plan_for(Options(socket=str(sock)), {})
    assert plan.shared == str(sock) and plan.spawn and plan.private
    assert not plan.committed_to_spawn  # undecided until the connect is tried


def test_connect_mode_never_spawns(ebpf_allowed: None) -> None:
    assert plans.plan_for(Options(mode="connect", socket="/x.sock"), {}) == Plan(shared="/x.sock")


def test_an_exec_d_descendant_joins_its_ancestors_sidecar(ebpf_denied: None) -> None:
    # GIVEN the variable an app that spawned a sidecar exports (even to a child
    # that may not use eBPF itself) THEN the child joins that sidecar
    env = {PARENT_SOCKET: "@otel-gil-1-abc"}
    assert plans.plan_for(Options(socket="/absent"), env) == \
        Plan(private="@otel-gil-1-abc", bound=True, inherited=True)
    assert plans.plan_for(Options(mode="spawn", socket="/absent"), env).spawn is False
    # AND an explicit connect, or a value that is not an abstract name, wins
    assert plans.plan_for(Options(mode="connect", socket="/s"), env) == Plan(shared="/s")
    assert plans.plan_for(Options(socket="/absent"), {PARENT_SOCKET: "/tmp/x"}).private is None


def test_without_ebpf_or_a_socket_the_plan_says_why(ebpf_denied: None) -> None:
    plan = plans.plan_for(Options(socket="/absent.sock"), {})
    assert plan.shared is None and plan.private is None
    assert "may not use eBPF" in plan.no_spawn


@pytest.mark.parametrize("parent, reached, chose, bound, child", [
    # the parent spawns (or will): the child joins, whatever the parent's progress;
    # once the parent has bound the address, a refusal there means it is gone
    (Plan(private="@p", spawn=True), False, False, True, Plan(private="@p", bound=True)),
    (Plan(private="@p", spawn=True), False, True, False, Plan(private="@p")),
    # the parent joins an ancestor's: so does its child (grandchildren), which
    # never spawns its own, even where its parent (exec'd, inherited) would
    (Plan(private="@p"), False, False, False, Plan(private="@p")),
    (Plan(private="@p", bound=True, inherited=True), False, True, True,
     Plan(private="@p", bound=True)),
    # the parent reached the shared sidecar: the child goes there, patiently
    (Plan(shared="/s", private="@p", spawn=True), True, False, False,
     Plan(shared="/s", patient=True)),
    # the parent gave up on the shared socket and spawns: the child joins that
    (Plan(shared="/s", private="@p", spawn=True), False, True, False, Plan(private="@p")),
    # the parent is still trying the shared socket: the child tries it, then joins
    (Plan(shared="/s", private="@p", spawn=True), False, False, False,
     Plan(shared="/s", private="@p")),
    (Plan(shared="/s", patient=True), False, False, False, Plan(shared="/s", patient=True)),
    # a parent with nowhere to go: nothing for the child either
    (Plan(no_spawn=", no eBPF"), False, False, False, None),
])
def test_a_forked_child_follows_its_parent_and_never_spawns(
        parent: Plan, reached: bool, chose: bool, bound: bool, child: Plan) -> None:
    got = plans.child_plan(parent, reached, chose, bound)
    assert got == child
    assert got is None or not (got.spawn or got.inherited)


# ------------------------------------------------------------ real processes


JOIN_LATE = textwrap.dedent('''
    import json, logging, os, socket, sys, threading, time
    from otel_gil.app import plan as plans
    from otel_gil.app import protocol
    from otel_gil.app.agent import Agent
    from otel_gil.config import Options
    logging.basicConfig(format="%(message)s")
    address, delay, user, bound = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]

    def sidecar(listener):
        # a stand-in for the sidecar: accept one registration, answer it
        conn, _ = listener.accept()
        msg = protocol.read_message(conn, 10)
        creds = protocol.peer_pid(conn)
        conn.sendall(protocol.encode({"ok": True, "host_pid": creds}))
        conn.recv(1)

    child = os.fork()
    if child == 0:
        if user == "nobody":  # as gunicorn --user does in its workers, after the fork
            os.setgid(65534); os.setuid(65534)
        agent = Agent(Options(start_timeout_s=3), {"op": "register", "pid": os.getpid()},
                      plans.Plan(private=address, bound=bound == "bound"))
        agent.start()
        deadline = time.monotonic() + 10
        while not (agent.live.is_set() or agent.done.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)
        print(json.dumps({"live": agent.live.is_set(), "error": agent.error,
                          "uid": os.getuid()}), flush=True)
        os._exit(0)
    if delay >= 0:
        time.sleep(delay)  # the sidecar is still starting: the child retries meanwhile
        listener = plans.bind_private(address)
        threading.Thread(target=sidecar, args=(listener,), daemon=True).start()
    os.waitpid(child, 0)
''')


def _join(tmp_path: Path, delay: float, user: str = "root", bound: str = "unbound") -> Any:
    script = tmp_path / "join.py"
    script.write_text(JOIN_LATE)
    address = plans.private_address()
    proc = subprocess.run([sys.executable, str(script), address, str(delay), user, bound],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr, address


def test_a_child_joins_a_sidecar_that_listens_only_later(tmp_path: Path) -> None:
    # GIVEN a forked child joining an address nobody listens on yet
    # WHEN the listener appears 0.5 s later THEN the child registers, no warning
    out, err, _ = _join(tmp_path, 0.5)
    assert out == {"live": True, "error": None, "uid": os.getuid()}
    assert err == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change user")
def test_a_worker_that_drops_root_still_reaches_the_abstract_socket(tmp_path: Path) -> None:
    # GIVEN a worker that became nobody right after its fork (an abstract socket
    # has no file permissions to refuse it)
    out, err, _ = _join(tmp_path, 0.2, "nobody")
    assert out == {"live": True, "error": None, "uid": 65534}, err


def test_a_child_gives_up_at_its_deadline_with_one_line(tmp_path: Path) -> None:
    # GIVEN no sidecar ever listens WHEN the child's 3 s start deadline passes
    out, err, address = _join(tmp_path, -1)
    # THEN it is off, and said so once, naming the address and the reason
    assert out["live"] is False
    assert out["error"] == (f"cannot join the sidecar of the process that started this one, "
                            f"at {address}: no answer within 3 s (Connection refused)")
    assert err.count("GIL tracing off") == 1, err


def test_a_child_of_a_parent_that_had_bound_gives_up_at_once(tmp_path: Path) -> None:
    # GIVEN the parent had bound the address before the fork: nothing there now
    # means its sidecar is gone WHEN the child joins THEN it says so, at once
    out, err, address = _join(tmp_path, -1, bound="bound")
    assert out["error"] == (f"cannot join the sidecar of the process that started this one, "
                            f"at {address}: it is gone (Connection refused)")
    assert err.count("GIL tracing off") == 1, err


FORK_WAITS = textwrap.dedent('''
    import json, os, sys, threading, time
    from otel_gil.app import plan as plans
    plans.FORK_WAIT_S = float(sys.argv[1])
    state = {"made": False}
    held = threading.Event()

    def agent_thread():  # makes a descriptor under the lock, slowly
        with plans.hold_forks():
            held.set()
            time.sleep(1.0)
            state["made"] = True

    threading.Thread(target=agent_thread, daemon=True).start()
    held.wait()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, json.dumps(state).encode()); os._exit(0)
    os.waitpid(pid, 0)
    print(os.read(r, 100).decode())
''')


@pytest.mark.parametrize("bound, made", [(5.0, True), (0.01, False)])
def test_a_fork_waits_for_the_agents_descriptors_but_not_forever(
        tmp_path: Path, bound: float, made: bool) -> None:
    # GIVEN the agent thread inside its locked section WHEN another thread forks
    script = tmp_path / "fork.py"
    script.write_text(FORK_WAITS)
    proc = subprocess.run([sys.executable, str(script), str(bound)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # THEN the fork happened after the section (the child saw its result); with a
    # tiny bound, it went ahead without it rather than block the app
    assert json.loads(proc.stdout) == {"made": made}


def test_a_stale_parent_socket_is_given_up_at_once_without_ebpf(tmp_path: Path) -> None:
    # GIVEN an app that may not use eBPF, started with the address of an ancestor's
    # sidecar that no longer exists (nothing is bound there)
    code = ("import logging, time, otel_gil; logging.basicConfig(); t = time.monotonic(); "
            "otel_gil.instrument(); print(otel_gil.wait_until_live(100), "
            "time.monotonic() - t < 50)")
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    env = dict(os.environ, **{PARENT_SOCKET: plans.private_address()},
               OTEL_PYTHON_GIL_SOCKET=str(tmp_path / "absent.sock"),
               OTEL_PYTHON_GIL_START_TIMEOUT_S="100")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    # THEN it does not wait out its (100 s) start deadline, and says once why tracing is off
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
    assert proc.stderr.count("GIL tracing off") == 1, proc.stderr
    assert "it is gone, and this process may not use eBPF" in proc.stderr
