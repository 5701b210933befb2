"""The interpreter matrix of tests/targets.py, checked on the real builds of this machine."""

from __future__ import annotations

import os
import subprocess

import pytest
from targets import (
    PythonTarget,
    all_targets,
    build_id,
    declared_targets,
    require,
    spawn,
    untestable_targets,
)

# Prints what the interpreter says about itself, then waits for one stdin line.
REPORT = """
import json, os, sys, threading
print(json.dumps({"pid": os.getpid(), "tid": threading.get_native_id(),
                  "version": list(sys.version_info[:2]),
                  "gil": getattr(sys, "_is_gil_enabled", lambda: True)()}))
sys.stdin.readline()
"""
TARGETS = all_targets()
IDS = [t.name for t in TARGETS]


def nspid_fields(host_pid: int) -> list[int]:
    with open(f"/proc/{host_pid}/status") as f:
        line = next(line for line in f if line.startswith("NSpid:"))
    return [int(x) for x in line.split()[1:]]


def mapped_inodes(host_pid: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file mapped into the process."""
    found: set[tuple[int, int]] = set()
    for name in os.listdir(f"/proc/{host_pid}/map_files"):
        st = os.stat(f"/proc/{host_pid}/map_files/{name}")
        found.add((st.st_dev, st.st_ino))
    return found


def has_symtab(path: str) -> bool:
    out = subprocess.run(["readelf", "-SW", path], capture_output=True, text=True, check=True)
    return " .symtab " in out.stdout


def test_matrix_names_are_the_documented_ones() -> None:
    # GIVEN the matrix WHEN listed THEN it is test-targets.md's, in a stable order
    declared = declared_targets()
    assert [t.name for t in declared] == [
        "pyenv-3.8", "pyenv-3.9", "pyenv-3.10", "pyenv-3.11", "pyenv-3.12", "pyenv-3.13",
        "debian-3.11", "py313t-gil", "py313t-nogil", "py314t-gil", "py314t-nogil",
        "py315t-gil", "py315t-nogil", "sid-3.14", "sid-3.15", "stripped-3.11", "stripped-3.15",
    ]  # fmt: skip
    assert [t.name for t in declared if not t.expect_gil] == [
        "py313t-nogil", "py314t-nogil", "py315t-nogil"]
    assert [t.name for t in declared if t.free_threaded] == [
        "py313t-gil", "py313t-nogil", "py314t-gil", "py314t-nogil", "py315t-gil", "py315t-nogil"]
    # AND the tests run on every one of them but those scripts/targets.sh
    # recorded it cannot build here (each with its reason)
    untestable = untestable_targets()
    assert all(t.unbuildable for t in untestable)
    assert IDS == [t.name for t in declared if t not in untestable]


@pytest.mark.parametrize("target", TARGETS, ids=IDS)
def test_child_reports_the_target_it_runs_on(target: PythonTarget) -> None:
    require(target)
    # GIVEN the target WHEN a child prints its pid, thread id, version and GIL state
    with spawn(target, REPORT) as child:
        report = child.read_json(timeout=30)
        # THEN it is the version and GIL state the target promises
        assert report["version"] == list(target.version)
        assert report["gil"] is target.expect_gil
        # AND host_pid is that very process: its innermost NSpid is the printed pid
        assert nspid_fields(child.host_pid)[-1] == report["pid"] == child.ns_pid
        assert report["tid"] == report["pid"]  # the main thread's native id (Linux)
        # AND the object said to hold the interpreter is mapped into it (for
        # stripped-3.11 this proves LD_LIBRARY_PATH won over the RUNPATH)
        st = os.stat(target.interpreter_elf)
        assert (st.st_dev, st.st_ino) in mapped_inodes(child.host_pid)
        if target.root is not None:
            # AND a chrooted target has its own PID namespace, where it is PID 1
            assert child.host_pid != child.ns_pid
            assert child.ns_pid == 1
        else:
            assert child.host_pid == child.ns_pid == child.popen.pid
        # WHEN it is sent a line THEN it exits normally
        child.send("done")
        assert child.popen.wait(timeout=30) == 0


@pytest.mark.parametrize("target", TARGETS, ids=IDS)
def test_symbols_are_where_the_target_says(target: PythonTarget) -> None:
    require(target)
    # GIVEN the target's interpreter object WHEN its sections are read
    elf_has_symtab = has_symtab(target.interpreter_elf)
    # THEN the symbol table is where `symbols` says: in it, in a matching
    # build-id .debug file, or nowhere
    if target.symbols == "symtab":
        assert elf_has_symtab
        assert target.debug_file is None
    elif target.symbols == "build-id":
        assert not elf_has_symtab
        debug = target.debug_file
        assert debug is not None and has_symtab(debug)
        assert build_id(debug) == build_id(target.interpreter_elf)
    else:
        assert target.symbols == "none"
        assert not elf_has_symtab
        assert target.debug_file is None


def test_own_pidns_puts_any_target_in_a_new_pid_namespace() -> None:
    target = next(t for t in TARGETS if t.name == "debian-3.11")
    require(target)
    # GIVEN a host target WHEN spawned with own_pidns=True
    with spawn(target, REPORT, own_pidns=True) as child:
        report = child.read_json(timeout=30)
        # THEN the Python process is PID 1 of a new namespace, below unshare
        assert report["pid"] == child.ns_pid == 1
        assert child.host_pid != child.popen.pid
        assert nspid_fields(child.host_pid) == [child.host_pid, 1]


def test_close_kills_and_reaps_a_child_in_its_own_namespace() -> None:
    target = next(t for t in TARGETS if t.name == "sid-3.14")
    require(target)
    # GIVEN a chrooted child blocked on stdin
    child = spawn(target, REPORT)
    child.read_json(timeout=30)
    # WHEN it is closed without being told to exit
    child.close()
    # THEN both unshare and the Python process are gone
    assert child.popen.returncode is not None
    assert not os.path.exists(f"/proc/{child.host_pid}")


def test_env_reaches_the_child_and_the_runners_python_variables_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = next(t for t in TARGETS if t.name == "stripped-3.11")
    require(target)
    # GIVEN PYTHONPATH set in the test runner WHEN a child is spawned with env
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-runner-path")
    code = (
        "import json, os; print(json.dumps({k: os.environ.get(k) for k in "
        "('PYTHONPATH', 'MARK', 'LD_LIBRARY_PATH', 'PYTHONUNBUFFERED')}))"
    )
    with spawn(target, code, env={"MARK": "x"}) as child:
        report = child.read_json(timeout=30)
    # THEN the child sees env and the target's variables, not the runner's PYTHONPATH
    assert report == {
        "PYTHONPATH": None, "MARK": "x", "PYTHONUNBUFFERED": "1",
        "LD_LIBRARY_PATH": os.path.dirname(target.interpreter_elf),
    }  # fmt: skip


def test_require_skips_a_missing_target_and_fails_it_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a target whose binary does not exist
    missing = PythonTarget(
        name="missing", version=(3, 99), binary="/nonexistent/python3.99", expect_gil=True,
        interpreter_elf="/nonexistent/python3.99", symbols="none",
    )  # fmt: skip
    # WHEN require() is called outside CI THEN the test is skipped
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="/nonexistent/python3.99 is missing"):
        require(missing)
    # WHEN it is called with CI=true THEN the test fails instead
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="target missing is not available"):
        require(missing)
