"""`otel-gil doctor` on every interpreter of the matrix (tests/targets.py).

`--python` must find the ELF object that holds the interpreter (following a
shared build's launcher to its libpython), its version and flavour, every
take_gil copy, and how its symbols were found; `--pid` must do the same on a
live child. The expected take_gil copies come from binutils' readelf, not from
otel-gil's own ELF code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any, Dict, List, Tuple

import pytest
from targets import PythonTarget, all_targets, require, spawn

from otel_gil.target.interpreter import FALLBACK_SOURCE

PYENV_311_LIB = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0"  # stripped-3.11's origin
TAKE_GIL_RE = re.compile(r"take_gil(\.(constprop|lto_priv|isra|part)\.\d+)*")


def _doctor(*args: str, env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otel_gil", "doctor", *args],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


def _readelf_take_gil(path: str) -> List[Tuple[str, int]]:
    """(name, address) of every take_gil copy in path's .symtab, never .cold parts."""
    out = subprocess.run(["readelf", "-sW", path], capture_output=True, text=True,
                         check=True).stdout
    found = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 8 and cols[3] == "FUNC" and TAKE_GIL_RE.fullmatch(cols[7]):
            found.append((cols[7], int(cols[1], 16)))
    return sorted(found, key=lambda nv: nv[1])


def _expected(target: PythonTarget) -> Tuple[str, List[Tuple[str, int]]]:
    """(symbol source, take_gil copies) the doctor must report for target."""
    if target.symbols == "symtab":
        return "symtab", _readelf_take_gil(target.interpreter_elf)
    if target.symbols == "build-id":
        debug = target.debug_file
        assert debug is not None
        return f"debug file {debug} (build-id)", _readelf_take_gil(debug)
    # Fully stripped: found from PyEval_AcquireLock, at the address the
    # unstripped original (or its -dbg file) has in its .symtab (strip keeps
    # the code as it is).
    original = _readelf_take_gil(_stripped_original(target))
    return FALLBACK_SOURCE, [("take_gil", original[0][1])]


def _stripped_original(target: PythonTarget) -> str:
    if target.name == "stripped-3.11":
        return PYENV_311_LIB
    sid = next(t for t in all_targets() if t.name == f"sid-3.{target.version[1]}")
    assert target.name == "stripped-3.15" and sid.debug_file is not None
    return sid.debug_file


def _copies(doc: Dict[str, Any]) -> List[Tuple[str, int]]:
    return [(f["name"], int(f["address"], 16)) for f in doc["target"]["take_gil"]]


@pytest.mark.ebpf
@pytest.mark.parametrize("target", all_targets(), ids=lambda t: t.name)
def test_doctor_python_finds_interpreter(target: PythonTarget) -> None:
    require(target)
    source, copies = _expected(target)
    # GIVEN the interpreter's program path, run with the target's environment
    # (stripped-3.11 only loads its stripped libpython through LD_LIBRARY_PATH)
    # WHEN doctor inspects it
    proc = _doctor("--python", target.binary, "--json", env=dict(target.env))
    # THEN tracing would work, and the report says what and how, exactly
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["verdict"] == "tracing would work"
    found = doc["target"]
    assert os.path.samefile(found["object"], target.interpreter_elf)
    assert found["root"] == (target.root or "/")
    assert tuple(int(x) for x in found["version"].split(".")[:2]) == target.version
    assert found["flavour"] == ("free-threaded" if target.free_threaded else "default")
    assert found["symbols"] == source
    assert _copies(doc) == copies
    assert all(f["rets"] >= 1 and f["source"] == source for f in found["take_gil"])
    # AND it says where each probe set's probes sit, on which instruction (as
    # objdump decodes it), and how the kernel handles that instruction
    contended, every = found["probes"]["contended"], found["probes"]["all"]
    assert contended["usable"] and every["usable"]
    assert contended["per_uncontended_transition_ns"] == 0
    assert {s["role"] for s in contended["sites"]} == {"wait", "wake"}
    assert {s["role"] for s in every["sites"]} == {"wait", "wake", "held", "release"}
    for site in contended["sites"] + every["sites"]:
        mnemonic = objdump_insn(target.interpreter_elf, int(site["address"], 16))
        assert site["insn"].split()[0] == mnemonic, (site, mnemonic)
        emulated = mnemonic.startswith(("j", "call", "push"))  # arch/x86/kernel/uprobes.c
        assert site["handling"] == ("emulated" if emulated else "single-stepped"), site
    # (the free-threaded build's early return, taken only with the GIL off,
    # has no emulated instruction before its ret: that held site is the ret)
    stepped = [s for s in every["sites"] if s["handling"] != "emulated"]
    assert len(stepped) == (1 if target.name.startswith("py313t") else 0), stepped


def objdump_insn(path: str, address: int) -> str:
    """The mnemonic binutils decodes at a link-time address."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={address:#x}",
                          f"--stop-address={address + 16:#x}", path],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        head, _, insn = line.partition(":\t")
        if insn and head.strip() == f"{address:x}":
            return insn.split()[0]
    raise AssertionError(f"objdump decodes no instruction at {address:#x} of {path}")


def _idle_child_code() -> str:
    return "import json, os, sys; print(json.dumps({'pid': os.getpid()})); sys.stdin.readline()"


# doctor's text form is checked on these: one of each verdict, one in a PID namespace
TEXT_FORM = {"pyenv-3.11", "py313t-nogil", "sid-3.14"}


@pytest.mark.ebpf
@pytest.mark.parametrize("target", all_targets(), ids=lambda t: t.name)
def test_doctor_pid_of_live_child(target: PythonTarget) -> None:
    require(target)
    # GIVEN a live, idle child of this interpreter (sid-3.14 chrooted, in its
    # own PID namespace)
    with spawn(target, _idle_child_code()) as child:
        assert child.read_json(timeout=60)["pid"] == child.ns_pid
        # WHEN doctor inspects it by host pid (the text form too, for one target
        # of each verdict and the namespaced one: the text renders the same
        # report, and each run compiles both probe sets, ~7 s here)
        proc = _doctor("--pid", str(child.host_pid), "--json")
        text = _doctor("--pid", str(child.host_pid)) if target.name in TEXT_FORM else None
    doc = json.loads(proc.stdout)
    found = doc["target"]
    assert found["pid"] == child.host_pid and found["nspid"][-1] == child.ns_pid
    assert tuple(int(x) for x in found["version"].split(".")[:2]) == target.version
    assert "Traceback" not in proc.stderr + (text.stderr if text else "")
    if target.expect_gil:
        # THEN tracing would work, on the right object
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert doc["ok"] is True
        assert os.path.samefile(found["object"], target.interpreter_elf)
        assert found["gil"]["enabled"] is (True if target.free_threaded else None)
        assert os.path.basename(found["release_probe"]["path"]) == "libc.so.6"
        if text:
            assert text.returncode == 0 and text.stdout.endswith("verdict: tracing would work\n")
    else:
        # THEN the free-threaded build running without its GIL gets its own verdict
        assert proc.returncode == 3
        assert doc["ok"] is False and doc["verdict"] == "GIL disabled: nothing to measure"
        assert found["gil"]["enabled"] is False
        if text:
            assert text.returncode == 3
            assert text.stdout.endswith("verdict: GIL disabled: nothing to measure\n")
            assert "remedy: run with PYTHON_GIL=1 to measure the GIL" in text.stdout


@pytest.mark.ebpf
def test_doctor_pid_that_does_not_exist() -> None:
    # GIVEN a pid no process has WHEN doctor checks it
    proc = _doctor("--pid", "999999999")
    # THEN one FAIL line names it, the verdict says no, exit 1, no traceback
    assert proc.returncode == 1
    fails = [line for line in proc.stdout.splitlines() if line.startswith("[FAIL]")]
    assert fails == ["[FAIL] target: no process with pid 999999999"]
    assert proc.stdout.endswith("verdict: tracing would NOT work (target)\n")
    assert proc.stderr == ""


@pytest.mark.ebpf
@pytest.mark.parametrize("path, detail", [
    ("/bin/ls", "/bin/ls holds no CPython interpreter (no _PyRuntime)"),
    ("/nonexistent/python3", "no such file: /nonexistent/python3"),
    ("/tmp", "cannot read /tmp: Is a directory"),
])
def test_doctor_python_that_is_not_python(path: str, detail: str) -> None:
    # GIVEN a path that is no interpreter WHEN doctor checks it (as JSON)
    proc = _doctor("--python", path, "--json")
    # THEN the output parses, and the failed target check says why and what to do
    assert proc.returncode == 1 and proc.stderr == ""
    doc = json.loads(proc.stdout)
    failed = [c for c in doc["checks"] if not c["ok"]]
    assert [(c["name"], c["detail"]) for c in failed] == [("target", detail)]
    assert doc["verdict"] == "tracing would NOT work (target)" and doc["target"] == {}


def test_doctor_without_root_prints_the_remedy() -> None:
    # GIVEN an unprivileged user (nobody, when the tests run as root) WHEN doctor runs
    drop = (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            if os.geteuid() == 0 else [])
    proc = subprocess.run([*drop, sys.executable, "-m", "otel_gil", "doctor"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_CACHE_HOME": "/tmp"})
    # THEN the root check fails with its remedy, and tracing would not work
    assert proc.returncode == 1, proc.stderr
    assert "[FAIL] root: not running as root\n       remedy: run as root" in proc.stdout
    assert proc.stdout.endswith("verdict: tracing would NOT work (root)\n")
