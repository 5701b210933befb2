"""The CPython builds the tests run against, and how to start a workload under one.

The matrix is the one of shared/reference/test-targets.md: the pyenv builds
already on the machine, plus what scripts/targets.sh builds into
$OTEL_GIL_TARGETS (Debian's python3.11 with its -dbg symbols, free-threaded
3.13, 3.14 and 3.15 where the archive has their sources, sid's 3.14 and 3.15
in chroot trees, a stripped copy of pyenv 3.11, sid's 3.15 fully stripped).
i386_target() is a 32-bit CPython, kept apart: it is one otel-gil refuses.

A test picks targets with `all_targets()` (those buildable here), calls
`require(target)` (skip, or fail under CI=true), then `spawn(target, code)`
and talks to the child through its stdin/stdout, typically one JSON line each
way.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Self

import pytest

REPO = Path(__file__).resolve().parent.parent
TARGETS_SCRIPT = REPO / "scripts" / "targets.sh"
TARGETS_DIR = Path(os.environ.get("OTEL_GIL_TARGETS", "/var/cache/otel-gil/targets"))
PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"


@dataclass(frozen=True)
class PythonTarget:
    name: str
    version: tuple[int, int]
    binary: str  # host path of the python executable
    expect_gil: bool
    # Host path of the ELF object that holds the interpreter (take_gil): the
    # libpython .so for --enable-shared builds, the executable for Debian's.
    interpreter_elf: str
    # Where take_gil's symbol is found: "symtab" (in interpreter_elf itself),
    # "build-id" (a .debug file under <root>/usr/lib/debug/.build-id), "none".
    symbols: str
    root: str | None = None  # chroot directory; binary lies inside it
    env: tuple[tuple[str, str], ...] = ()  # what the target needs to run
    stamp: str | None = None  # written by scripts/targets.sh once built
    free_threaded: bool = False

    @property
    def unbuildable(self) -> str | None:
        """Why scripts/targets.sh could not build this target here (its
        <name>.unavailable file: e.g. the archive had no such source), or None."""
        if self.stamp is None:
            return None
        marker = self.stamp[: -len(".stamp")] + ".unavailable"
        try:
            with open(marker) as f:
                return f.read().strip() or "scripts/targets.sh could not build it"
        except OSError:
            return None

    @property
    def debug_file(self) -> str | None:
        """The .debug file whose build-id matches interpreter_elf, if symbols == "build-id"."""
        if self.symbols != "build-id" or not os.path.exists(self.interpreter_elf):
            return None
        bid = build_id(self.interpreter_elf)
        return f"{self.root or ''}/usr/lib/debug/.build-id/{bid[:2]}/{bid[2:]}.debug"

    def why_unavailable(self) -> str | None:
        for path in (self.binary, self.interpreter_elf, self.stamp):
            if path is not None and not os.path.exists(path):
                return f"{path} is missing (run scripts/targets.sh as root)"
        debug = self.debug_file
        if debug is not None and not os.path.exists(debug):
            return f"{debug} is missing: the -dbg package does not match {self.interpreter_elf}"
        return None

    def available(self) -> bool:
        return self.why_unavailable() is None


def build_id(path: str) -> str:
    """The GNU build-id of an ELF file, as hex (binutils' readelf)."""
    out = subprocess.run(["readelf", "-n", path], capture_output=True, text=True, check=True)
    match = re.search(r"Build ID: ([0-9a-f]+)", out.stdout)
    if match is None:
        raise ValueError(f"{path} has no build-id note")
    return match.group(1)


def _pyenv(minor: int) -> PythonTarget:
    # The newest 3.<minor>.<patch> (pyenv also names builds like 3.13.0t).
    found = sorted(
        (p for p in PYENV_VERSIONS.glob(f"3.{minor}.*") if re.fullmatch(r"3\.\d+\.\d+", p.name)),
        key=lambda p: int(p.name.split(".")[2]),
    )
    prefix = found[-1] if found else PYENV_VERSIONS / f"3.{minor}"
    return PythonTarget(
        name=f"pyenv-3.{minor}",
        version=(3, minor),
        binary=f"{prefix}/bin/python3.{minor}",
        expect_gil=True,
        interpreter_elf=f"{prefix}/lib/libpython3.{minor}.so.1.0",
        symbols="symtab",
    )


def _freethreaded(minor: int) -> list[PythonTarget]:
    """py3XXt-gil (PYTHON_GIL=1) and py3XXt-nogil (PYTHON_GIL=0) of one build.
    PYTHON_GIL is read at startup by free-threaded builds (3.13 Python/initconfig.c)."""
    t = str(TARGETS_DIR)
    name = f"py3{minor}t"
    gil = PythonTarget(
        name=f"{name}-gil", version=(3, minor), binary=f"{t}/{name}/bin/python3.{minor}t",
        expect_gil=True, interpreter_elf=f"{t}/{name}/lib/libpython3.{minor}t.so.1.0",
        symbols="symtab", env=(("PYTHON_GIL", "1"),), stamp=f"{t}/{name}.stamp",
        free_threaded=True,
    )  # fmt: skip
    return [gil, replace(gil, name=f"{name}-nogil", expect_gil=False, env=(("PYTHON_GIL", "0"),))]


def _sid(minor: int) -> PythonTarget:
    sid = f"{TARGETS_DIR}/sid-3.{minor}"
    return PythonTarget(
        name=f"sid-3.{minor}", version=(3, minor), binary=f"{sid}/usr/bin/python3.{minor}",
        expect_gil=True, interpreter_elf=f"{sid}/usr/bin/python3.{minor}", symbols="build-id",
        root=sid, stamp=f"{TARGETS_DIR}/sid-3.{minor}.stamp",
    )  # fmt: skip


def all_targets() -> list[PythonTarget]:
    """Every target this machine can have, in a stable order (pyenv ones
    first, by version). A target scripts/targets.sh recorded it cannot build
    here (its source is not in the archive: see untestable_targets) yields no
    test case at all, rather than a skip that CI would count as a failure of
    otel-gil; conftest.py names each such target in the run's summary."""
    return [t for t in declared_targets() if t.unbuildable is None]


def untestable_targets() -> list[PythonTarget]:
    """The declared targets that scripts/targets.sh could not build here."""
    return [t for t in declared_targets() if t.unbuildable is not None]


def declared_targets() -> list[PythonTarget]:
    """Every target of the matrix, buildable here or not."""
    t = str(TARGETS_DIR)
    stripped = f"{t}/stripped-3.11"
    stripped_315 = f"{t}/stripped-3.15"
    return [_pyenv(minor) for minor in range(8, 14)] + [
        PythonTarget(
            name="debian-3.11", version=(3, 11), binary="/usr/bin/python3.11",
            expect_gil=True, interpreter_elf="/usr/bin/python3.11", symbols="build-id",
        ),
        *_freethreaded(13),
        *_freethreaded(14),
        *_freethreaded(15),
        _sid(14),
        _sid(15),
        # The executable's RUNPATH still names the pyenv prefix: LD_LIBRARY_PATH
        # is searched first (ld.so(8)), so the stripped copy is the one loaded.
        PythonTarget(
            name="stripped-3.11", version=(3, 11), binary=f"{stripped}/bin/python3.11",
            expect_gil=True, interpreter_elf=f"{stripped}/lib/libpython3.11.so.1.0",
            symbols="none", env=(("LD_LIBRARY_PATH", f"{stripped}/lib"),),
            stamp=f"{t}/stripped-3.11.stamp",
        ),
        # sid's 3.15 with no .symtab, no .gnu_debuglink and no debug files.
        PythonTarget(
            name="stripped-3.15", version=(3, 15), binary=f"{stripped_315}/usr/bin/python3.15",
            expect_gil=True, interpreter_elf=f"{stripped_315}/usr/bin/python3.15",
            symbols="none", root=stripped_315, stamp=f"{t}/stripped-3.15.stamp",
        ),
    ]  # fmt: skip


def i386_target() -> PythonTarget:
    """A 32-bit CPython (bookworm's i386 python3.11) in a chroot: one otel-gil refuses."""
    root = f"{TARGETS_DIR}/i386-3.11"
    return PythonTarget(
        name="i386-3.11", version=(3, 11), binary=f"{root}/usr/bin/python3.11", expect_gil=True,
        interpreter_elf=f"{root}/usr/bin/python3.11", symbols="none", root=root,
        stamp=f"{TARGETS_DIR}/i386-3.11.stamp",
    )  # fmt: skip


_ensure_error: str | None = None
_ensured = False


def ensure_targets() -> None:
    """Run scripts/targets.sh (once per session) if a target it builds is missing.

    Raises RuntimeError when it cannot run or fails; the outcome is cached.
    """
    global _ensured, _ensure_error
    if not _ensured:
        _ensured = True
        built_here = [t for t in all_targets() + [i386_target()]
                      if not t.name.startswith("pyenv-")]
        if not all(t.available() for t in built_here):
            _ensure_error = _run_targets_script()
    if _ensure_error is not None:
        raise RuntimeError(_ensure_error)


def _run_targets_script() -> str | None:
    if os.geteuid() != 0:
        return f"{TARGETS_SCRIPT} needs root to build the missing targets"
    # Echo its progress lines as they come (a first build takes minutes) and
    # keep the last ones for the error message.
    last: deque[str] = deque(maxlen=20)
    with subprocess.Popen(["bash", str(TARGETS_SCRIPT)], stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            last.append(line)
    if proc.returncode != 0:
        return f"{TARGETS_SCRIPT} failed ({proc.returncode}): {''.join(last).strip()}"
    return None


def require(target: PythonTarget) -> None:
    """Skip the calling test if target is missing; under CI=true fail instead.

    A skip in CI would hide a broken setup. Tries scripts/targets.sh first.
    A target that scripts/targets.sh recorded it could not build from the
    archive (target.unbuildable) is skipped even in CI, with that reason.
    """
    unbuildable = target.unbuildable
    if unbuildable is not None:
        pytest.skip(f"target {target.name} cannot be built on this machine: {unbuildable}")
    reason = target.why_unavailable()
    if reason is not None:
        try:
            ensure_targets()
        except RuntimeError as exc:
            reason = f"{reason}; {exc}"
        else:
            reason = target.why_unavailable()
    if reason is None:
        return
    message = f"target {target.name} is not available: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Child:
    popen: subprocess.Popen[str]
    host_pid: int  # the Python process, in the host PID namespace
    ns_pid: int  # the same process as it sees itself (os.getpid())
    _lines: queue.Queue[str | None] = field(repr=False)
    _stderr: IO[str] = field(repr=False)

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line if line.endswith("\n") else line + "\n")
        self.popen.stdin.flush()

    def read_json(self, timeout: float) -> dict[str, Any]:
        """The next stdout line, parsed as a JSON object."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no line from pid {self.host_pid} in {timeout} s{self._tail()}"
            ) from None
        if line is None:
            raise EOFError(
                f"pid {self.host_pid} closed stdout (exit {self.popen.poll()}){self._tail()}"
            )
        value = json.loads(line)
        if not isinstance(value, dict):
            raise TypeError(f"expected a JSON object from pid {self.host_pid}, got {line!r}")
        return value

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def _tail(self) -> str:
        text = self.stderr().strip()
        return f"; stderr: {text[-2000:]}" if text else ""

    def close(self) -> None:
        """Kill the child if it still runs, and reap it."""
        if self.popen.poll() is None:
            # Under unshare the Python process is a grandchild (PID 1 of its
            # namespace). Kill it alone: unshare then reaps it and exits with
            # its status. Killing unshare too would leave it a zombie for init.
            try:
                os.kill(self.host_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.popen.wait(timeout=10)
        for stream in (self.popen.stdin, self.popen.stdout, self._stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass  # a broken pipe to a dead child

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spawn(
    target: PythonTarget, code: str, env: dict[str, str] | None = None, own_pidns: bool = False
) -> Child:
    """Start `python -c code` under target; return once that Python has exec'd.

    The child inherits this environment less PYTHON* and VIRTUAL_ENV (the test
    runner's own), plus the target's variables, PYTHONUNBUFFERED=1 and `env`.
    sid-3.14 always runs in its own PID namespace, chrooted into its tree;
    own_pidns=True gives any other target its own PID namespace too.
    """
    argv = [target.binary, "-c", code]
    proc_dir = "/proc"
    if target.root is not None:
        argv = ["chroot", target.root, "/" + os.path.relpath(target.binary, target.root)] + argv[1:]
        proc_dir = os.path.join(target.root, "proc")
    if target.root is not None or own_pidns:
        # --mount-proc mounts the new namespace's /proc, in a private mount
        # namespace, at the path the child will see as /proc.
        unshare = ["unshare", "--pid", "--fork", f"--mount-proc={proc_dir}", "--kill-child"]
        argv = unshare + argv
    child_env = {
        k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"
    }
    child_env.update(target.env)
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env.update(env or {})
    # A file, not a pipe: nobody reads stderr while the child runs, and a full
    # pipe would block it. Child.close() closes it.
    stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
    popen = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        text=True, bufsize=1, env=child_env,
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(popen.stdout, lines), daemon=True).start()
    child = Child(popen, popen.pid, popen.pid, lines, stderr)
    try:
        child.host_pid = _find_python(popen, target.binary, timeout=10.0)
        child.ns_pid = _ns_pid(child.host_pid)
    except (RuntimeError, TimeoutError) as exc:
        tail = child._tail()
        child.close()
        raise RuntimeError(f"{target.name}: {exc}{tail}") from exc
    except BaseException:
        child.close()
        raise
    return child


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _find_python(popen: subprocess.Popen[str], binary: str, timeout: float) -> int:
    """The pid of the process under popen whose /proc/PID/exe is binary (exec done)."""
    want = os.stat(binary)
    deadline = time.monotonic() + timeout
    while True:
        for pid in _descendants(popen.pid):
            try:
                exe = os.stat(f"/proc/{pid}/exe")
            except OSError:
                continue  # gone, or a zombie
            if (exe.st_dev, exe.st_ino) == (want.st_dev, want.st_ino):
                return pid
        if popen.poll() is not None:
            raise RuntimeError(f"{popen.args!r} exited with {popen.returncode} before starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no process running {binary} under pid {popen.pid}")
        time.sleep(0.005)


def _descendants(root: int) -> list[int]:
    """root and every process below it, parents first (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 is the ppid; comm (field 2) may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    order = [root]
    for pid in order:
        order.extend(children.get(pid, []))
    return order


def _ns_pid(host_pid: int) -> int:
    """The pid in the process's innermost PID namespace (last NSpid field)."""
    with open(f"/proc/{host_pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise RuntimeError(f"/proc/{host_pid}/status has no NSpid line")
