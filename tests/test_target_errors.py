"""Every way target discovery can refuse, each on a real binary or process.

Each refusal is one line on stderr, the exit status README's "At a terminal"
gives (2: not a Python otel-gil can trace), and the remedy. The programs are
real: /bin/sleep; small C programs built here with gcc or musl-gcc (an
embedder of pyenv's libpython that waits before Py_Initialize(), a musl-linked
program); pyenv's CPython 3.7; bookworm's 32-bit python3.11 in a chroot
(tests/targets.py i386_target); and copies of pyenv's 3.13 libpython that say
they are a CPython 3.16 this otel-gil does not know (tests/vendor.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from targets import PythonTarget, i386_target, require, spawn
from vendor import PYENV_313_BIN, patched_libpython

PYENV = Path("/root/.pyenv/versions")
UNKNOWN = "CPython 3.16.0 is newer than this otel-gil knows (3.8 to 3.15)"
UPGRADE = ("upgrade otel-gil; if this is its newest release, report the interpreter with "
           "the output of `otel-gil doctor --python PATH --json`")

# Waits for a line on stdin before it starts the interpreter, then for another.
EMBED_C = r"""
#include <Python.h>
#include <stdio.h>
int main(void) {
    char line[16];
    printf("{\"ready\": true}\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    Py_Initialize();
    printf("{\"initialised\": true}\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    return Py_FinalizeEx() < 0;
}
"""
MUSL_C = r"""
#include <stdio.h>
int main(void) { char line[16]; puts("{\"ready\": true}"); fflush(stdout);
                 return fgets(line, sizeof line, stdin) == NULL; }
"""


def _cli(*args: str, env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otel_gil", *args], capture_output=True,
                          text=True, timeout=180, env={**os.environ, **(env or {})})


def _one_line_error(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    """The single stderr line of a refused command, without its prefix."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("otel-gil: error: ")
    return lines[0][len("otel-gil: error: "):]


def _doctor_target_check(path: str, env: Dict[str, str] | None = None) -> Dict[str, Any]:
    proc = _cli("doctor", "--python", path, "--json", env=env)
    assert proc.stderr == "" and "Traceback" not in proc.stdout
    doc: Dict[str, Any] = json.loads(proc.stdout)
    doc["exit"] = proc.returncode
    (check,) = [c for c in doc["checks"] if c["name"] == "target"]
    doc["check"] = check
    return doc


class Program:
    """A started program that prints JSON lines and waits on stdin."""

    def __init__(self, argv: List[str], env: Dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env=env)

    def read(self) -> Dict[str, Any]:
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        assert line, f"{self.popen.args} exited with {self.popen.poll()}"
        value: Dict[str, Any] = json.loads(line)
        return value

    def send(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write("go\n")
        self.popen.stdin.flush()

    def close(self) -> None:
        self.popen.kill()
        self.popen.wait(timeout=10)


@pytest.fixture
def program() -> Iterator[Any]:
    started: List[Program] = []

    def start(argv: List[str], env: Dict[str, str] | None = None) -> Program:
        started.append(Program(argv, env))
        return started[-1]

    yield start
    for p in started:
        p.close()


def _embedder(tmp_path: Path, version: str, rpath: bool = True) -> Path:
    """A C program that embeds pyenv's CPython `version` (shared libpython)."""
    prefix = PYENV / version
    minor = ".".join(version.split(".")[:2])
    exe = tmp_path / f"embed{minor}{'' if rpath else '-norpath'}"
    source = tmp_path / "embed.c"
    source.write_text(EMBED_C)
    flags = [f"-Wl,-rpath,{prefix}/lib"] if rpath else []
    subprocess.run(["gcc", "-O1", f"-I{prefix}/include/python{minor}", str(source), "-o",
                    str(exe), f"-L{prefix}/lib", f"-lpython{minor}", *flags],
                   check=True, capture_output=True)
    return exe


# ----------------------------------------------------------------- no libpython


@pytest.mark.ebpf
def test_a_process_without_python(program: Any) -> None:
    # GIVEN a running program that holds no CPython (no libpython, no _PyRuntime)
    sleeper = program(["sleep", "60"])
    time.sleep(0.1)  # let exec replace the forked image
    pid = sleeper.popen.pid
    # WHEN record is pointed at it THEN one line says so and what to do, exit 2
    assert _one_line_error(_cli("record", "--pid", str(pid))) == (
        f"pid {pid} (sleep) is not a Python process: no libpython3.X is mapped into it, and "
        "/usr/bin/sleep holds no CPython (no _PyRuntime) (give the pid of a CPython 3.8 to "
        "3.15 process)")


@pytest.mark.ebpf
def test_a_process_whose_name_and_path_hold_escape_sequences(program: Any,
                                                             tmp_path: Path) -> None:
    # GIVEN a program copied to a directory whose name holds a terminal escape
    # sequence, that then names itself with another one (its comm)
    hostile = tmp_path / "\x1b]0;pwned\x07"
    hostile.mkdir()
    shutil.copy("/bin/bash", hostile / "bash")
    code = ('printf "\\033[2J\\033]0;x\\007" > /proc/self/comm; echo \'{"ready": true}\'; '
            'read line')
    sh = program([str(hostile / "bash"), "-c", code])
    assert sh.read() == {"ready": True}
    pid = str(sh.popen.pid)
    # WHEN record and doctor are pointed at it
    record = _cli("record", "--pid", pid)
    doctor = _cli("doctor", "--pid", pid)
    # THEN they refuse as for any program without Python, in one line, and
    # print neither sequence: each control character is a '?'
    line = _one_line_error(record)
    assert line.startswith(f"pid {pid} (?[2J?]0;x?) is not a Python process"), line
    assert "?]0;pwned?/bash holds no CPython" in line, line
    assert doctor.returncode != 0 and "FAIL] target" in doctor.stdout, doctor
    for out in (record.stdout, record.stderr, doctor.stdout, doctor.stderr):
        assert "\x1b" not in out and "\x07" not in out, out


def test_a_launcher_whose_libpython_is_not_found(tmp_path: Path) -> None:
    # GIVEN a program linked to libpython3.12 without a RUNPATH to find it by
    exe = _embedder(tmp_path, "3.12.1", rpath=False)
    # WHEN doctor is given it THEN the target check names the library, where
    # it was looked for, and the remedy; tracing would not work (exit 1)
    doc = _doctor_target_check(str(exe), env={"LD_LIBRARY_PATH": ""})
    assert doc["exit"] == 1 and doc["verdict"] == "tracing would NOT work (target)"
    assert doc["check"]["detail"].startswith(f"{exe} needs libpython3.12.so.1.0, found in none "
                                             "of ")
    assert doc["check"]["remedy"] == ("set LD_LIBRARY_PATH as the program runs with, or give "
                                      "its pid")


# ----------------------------------------------------------------- not initialised


@pytest.mark.ebpf
@pytest.mark.parametrize("version, why", [
    ("3.11.7", "the interpreter is not initialised yet (its GIL, inline in _PyRuntime, is all "
               "zeros)"),
    ("3.12.1", "the interpreter is not initialised yet (no main interpreter in _PyRuntime), "
               "so it has no GIL"),
    ("3.13.0", "the interpreter is not initialised yet (no main interpreter in _PyRuntime), "
               "so it has no GIL"),
])
def test_a_python_that_has_not_initialised_its_gil(program: Any, tmp_path: Path,
                                                   version: str, why: str) -> None:
    # GIVEN a program that has libpython mapped but has not called Py_Initialize()
    embed = program([str(_embedder(tmp_path, version))])
    assert embed.read() == {"ready": True}
    pid = embed.popen.pid
    # WHEN record is pointed at it THEN one line says why, and when to attach, exit 2
    assert _one_line_error(_cli("record", "--pid", str(pid))) == (
        f"pid {pid}: {why} (attach once Py_Initialize() has run; `otel-gil run` and "
        "otel_gil.instrument() wait for that themselves)")
    # WHEN it has initialised THEN the same program can be traced
    embed.send()
    assert embed.read() == {"initialised": True}
    doc = json.loads(_cli("doctor", "--pid", str(pid), "--json").stdout)
    assert doc["ok"] is True, doc


# ----------------------------------------------------------------- versions


@pytest.mark.ebpf
def test_a_python_too_old(program: Any) -> None:
    exe = PYENV / "3.7.16" / "bin" / "python3.7"
    if not exe.exists():
        pytest.skip(f"{exe} is not on this machine")
    # GIVEN a running CPython 3.7 (pyenv, libpython3.7m.so)
    old = program([str(exe), "-c", "print('{}', flush=True); input()"])
    assert old.read() == {}
    pid = old.popen.pid
    # WHEN record is pointed at it THEN one line gives the version, the range, the remedy
    assert _one_line_error(_cli("record", "--pid", str(pid))) == (
        f"pid {pid} (python3.7): {PYENV}/3.7.16/lib/libpython3.7m.so.1.0: CPython 3.7.16 is "
        "too old: otel-gil supports 3.8 to 3.15 (run the app on CPython 3.8 or newer)")


def test_an_unknown_python_whose_debug_offsets_work(tmp_path: Path) -> None:
    # GIVEN a libpython that says it is CPython 3.16.0a1 (tests/vendor.py)
    lib = patched_libpython(tmp_path)
    # WHEN doctor is given it THEN tracing would work, and it says how, unverified
    doc = _doctor_target_check(str(lib))
    assert doc["exit"] == 0 and doc["verdict"] == "tracing would work"
    unverified = (f"{UNKNOWN}: unverified; the GIL was located through its _Py_DebugOffsets, "
                  "its fields read from DWARF, take_gil found via symtab")
    assert doc["target"]["unverified"] == unverified
    assert doc["check"]["detail"].endswith(f"via symtab; WARNING: {unverified}")
    assert doc["target"]["version"] == "3.16.0"


@pytest.mark.ebpf
def test_an_unknown_python_is_traced_with_a_warning(tmp_path: Path) -> None:
    # GIVEN pyenv's python3.13 running on that 3.16-looking libpython
    lib = patched_libpython(tmp_path)
    target = PythonTarget(
        name="vendor-3.16", version=(3, 13), binary=str(PYENV_313_BIN), expect_gil=True,
        interpreter_elf=str(lib), symbols="symtab", env=(("LD_LIBRARY_PATH", str(tmp_path)),))
    require(target)
    code = ("import json, os, sys, threading\n"
            "def burn():\n    [sum(range(100)) for _ in range(20000)]\n"
            "print(json.dumps({'pid': os.getpid()}), flush=True)\nsys.stdin.readline()\n"
            "ts = [threading.Thread(target=burn) for _ in range(2)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n")
    with spawn(target, code) as child:
        child.read_json(timeout=60)
        # WHEN record traces it
        record = subprocess.Popen(
            [sys.executable, "-m", "otel_gil", "record", "--pid", str(child.host_pid),
             "--duration", "60", "--output", str(tmp_path / "out.json")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert record.stderr is not None
        first = record.stderr.readline()
        warning = record.stderr.readline()
        child.send("go")
        assert child.popen.wait(timeout=60) == 0
        assert record.wait(timeout=60) == 0
    # THEN it says it traces, and warns once that the layout is unverified
    assert first.startswith(f"otel-gil: tracing pid {child.host_pid} (CPython 3.16.0, ")
    assert warning == f"otel-gil: warning: {UNKNOWN}: unverified; the GIL was located " \
                      "through its _Py_DebugOffsets, its fields read from DWARF, take_gil " \
                      "found via symtab\n"
    # AND the probes saw the two threads take turns
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["processes"][0]["version"] == "3.16.0"
    assert sum(t["acquisitions"] for t in doc["threads"]) > 2


@pytest.mark.parametrize("spoil, why", [
    ({"cookie": False}, "its _PyRuntime does not start with _Py_DebugOffsets (no 'xdebugpy' "
                        "cookie)"),
    ({"gil_table": False}, "its _Py_DebugOffsets have a layout this otel-gil does not know "
                           "(no GIL fields that line up)"),
])
def test_an_unknown_python_whose_debug_offsets_do_not_help(tmp_path: Path, spoil: Dict[str, bool],
                                                           why: str) -> None:
    # GIVEN a 3.16-looking libpython whose _Py_DebugOffsets are gone or changed
    lib = patched_libpython(tmp_path, **spoil)
    # WHEN doctor is given it THEN the target check says which check failed, and what to do
    doc = _doctor_target_check(str(lib))
    assert doc["exit"] == 1
    assert doc["check"]["detail"] == f"{lib}: {UNKNOWN}, and {why}, so the GIL cannot be located"
    assert doc["check"]["remedy"] == UPGRADE
    assert "not a Python" not in json.dumps(doc)


# ----------------------------------------------------------------- musl, 32-bit


@pytest.mark.ebpf
def test_a_musl_linked_program(program: Any, tmp_path: Path) -> None:
    if shutil.which("musl-gcc") is None:
        pytest.fail("musl-gcc is missing: scripts/test.sh installs musl-tools")
    # GIVEN a running program linked against musl libc (a real CPython built on
    # musl, Alpine's, cannot be fetched here: only Debian's archive can)
    source = tmp_path / "musl.c"
    source.write_text(MUSL_C)
    exe = tmp_path / "python3.13"
    subprocess.run(["musl-gcc", str(source), "-o", str(exe)], check=True, capture_output=True)
    musl = program([str(exe)])
    assert musl.read() == {"ready": True}
    pid = musl.popen.pid
    remedy = ("run the app on a glibc-based image (Debian, Ubuntu, Fedora, RHEL, "
              "python:*-slim), not Alpine")
    # WHEN record is pointed at it THEN one line names musl and the remedy, exit 2
    assert _one_line_error(_cli("record", "--pid", str(pid))) == (
        f"pid {pid} (python3.13) runs on musl libc (/usr/lib/x86_64-linux-musl/libc.so): "
        f"otel-gil supports glibc only ({remedy})")
    # AND doctor --python says the same of the file
    doc = _doctor_target_check(str(exe))
    assert doc["exit"] == 1
    assert doc["check"]["detail"] == (f"{exe} is linked against musl libc "
                                      "(/lib/ld-musl-x86_64.so.1): otel-gil supports glibc only")
    assert doc["check"]["remedy"] == remedy


@pytest.mark.ebpf
def test_a_32_bit_python() -> None:
    target = i386_target()
    require(target)
    remedy = "run the app with a 64-bit x86-64 Python"
    # GIVEN bookworm's 32-bit CPython 3.11, running chrooted
    # (python3.11-minimal has no json module: the line is printed by hand)
    with spawn(target, "import struct, sys; print('{\"bits\": %d}' % (8 * struct.calcsize('P'))"
                       ", flush=True); sys.stdin.readline()") as child:
        assert child.read_json(timeout=60) == {"bits": 32}
        pid = child.host_pid
        # WHEN record is pointed at it THEN one line says 32-bit and the remedy,
        # exit 2 (the file named as its maps show it: our path, it is chrooted below us)
        assert _one_line_error(_cli("record", "--pid", str(pid))) == (
            f"pid {pid} (python3.11): {target.binary} is a 32-bit x86 program: otel-gil "
            f"traces x86-64 (64-bit) CPython only ({remedy})")
    # AND doctor --python says the same of the file
    doc = _doctor_target_check(target.binary)
    assert doc["exit"] == 1
    assert doc["check"]["detail"] == (f"{target.binary} is a 32-bit x86 program: otel-gil "
                                      "traces x86-64 (64-bit) CPython only")
    assert doc["check"]["remedy"] == remedy
