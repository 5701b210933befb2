"""inspect_process / inspect_binary on live interpreters of this machine.

Each target is a real child process that signals "ready" on a pipe once a
second thread is spinning, so the GIL exists and changes hands.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import subprocess
import time
from typing import Any, Iterator

import pytest

from otel_gil import discovery
from otel_gil.discovery import Target, inspect_binary, inspect_process, require_gil, x_gil_option
from otel_gil.errors import (
    GilDisabledError,
    NotPythonError,
    TargetGone,
)

PYENV = "/root/.pyenv/versions"
PYENV_VERSIONS = ["3.8.18", "3.9.18", "3.10.13", "3.11.7", "3.12.1", "3.13.0"]
TARGETS = os.environ.get("OTEL_GIL_TARGETS", "/var/cache/otel-gil/targets")
CHILD = """
import sys, threading, time
def spin():
    while True:
        sum(range(1000))
threading.Thread(target=spin, daemon=True).start()
sys.stdout.write("ready\\n"); sys.stdout.flush()
time.sleep(120)
"""


def pyenv_exe(version: str) -> str:
    return f"{PYENV}/{version}/bin/python{version.rsplit('.', 1)[0]}"


@pytest.fixture(autouse=True)
def private_cache(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with empty caches, in memory and on disk."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    discovery.clear_memory_cache()
    yield
    discovery.clear_memory_cache()


def spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:  # type: ignore[type-arg]
    proc = subprocess.Popen(argv + ["-c", CHILD], stdout=subprocess.PIPE,
                            env=env if env is not None else {"PATH": "/usr/bin:/bin"})
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    return proc


def maps_of(pid: int) -> list[tuple[int, int, str]]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[5].strip() if len(parts) > 5 else ""))
    return out


def peek_int(pid: int, address: int) -> int:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return int(struct.unpack("<i", os.pread(fd, 4, address))[0])
    finally:
        os.close(fd)


def check_live_target(target: Target, proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    maps = maps_of(proc.pid)
    object_name = os.path.basename(target.object_path)
    home = [m for m in maps if os.path.basename(m[2]) == object_name]
    # THEN the switch interval is CPython's default, 5 ms
    assert target.gil.interval_us == 5000
    # AND the cond variable lies in the object's data (or in the heap / an
    # anonymous mapping, where 3.12+ may allocate an interpreter)
    where = [m for m in maps if m[0] <= target.gil.cond_address < m[1]]
    assert len(where) == 1
    assert where[0] in home or where[0][2] in ("", "[heap]")
    assert target.gil.cond_address == target.gil.address + 32
    # AND `locked`, read independently, is 0 or 1
    assert peek_int(proc.pid, target.gil.address + 16) in (0, 1)
    # AND the load bias maps take_gil into an executable mapping of the object
    take = target.interpreter.take_gil[0].address + target.load_bias
    assert any(lo <= take < hi for lo, hi, _ in home)
    assert target.cond_signal[0].endswith("/libc.so.6")
    assert target.pidns == (os.stat(f"/proc/{proc.pid}/ns/pid").st_dev,
                            os.stat(f"/proc/{proc.pid}/ns/pid").st_ino)
    assert target.nspid == (proc.pid,)
    assert target.gil.enabled is None
    require_gil(target)  # a default build never says "GIL disabled"


@pytest.mark.parametrize("version", PYENV_VERSIONS)
def test_inspect_process_pyenv(version: str) -> None:
    # GIVEN a running pyenv interpreter with two threads
    proc = spawn([pyenv_exe(version)])
    try:
        # WHEN it is inspected
        target = inspect_process(proc.pid)
        # THEN its libpython was found, through /proc/PID/root, with the right version
        assert target.object_path == (
            f"/proc/{proc.pid}/root{PYENV}/{version}/lib/libpython{version[:version.rindex('.')]}"
            ".so.1.0"
        )
        assert target.interpreter.version == tuple(int(x) for x in version.split("."))
        assert target.load_bias != 0
        check_live_target(target, proc)
    finally:
        proc.kill()
        proc.wait()


def test_inspect_process_debian_static_311() -> None:
    # GIVEN Debian's python3.11: interpreter linked into a non-PIE executable
    proc = spawn(["/usr/bin/python3.11"])
    try:
        # WHEN it is inspected
        target = inspect_process(proc.pid)
        # THEN the executable itself is the object, with no load bias
        assert target.object_path == f"/proc/{proc.pid}/root/usr/bin/python3.11"
        assert target.interpreter.static and target.load_bias == 0
        assert target.gil.how == "_PyRuntime+360 (3.11 table)"
        check_live_target(target, proc)
    finally:
        proc.kill()
        proc.wait()


def test_second_inspect_uses_the_caches(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a live 3.12 process, inspected once (cold: nothing cached)
    proc = spawn([pyenv_exe("3.12.1")])
    try:
        t0 = time.perf_counter()
        first = inspect_process(proc.pid)
        cold = time.perf_counter() - t0
        build_id = first.interpreter.build_id
        cache_file = os.path.join(str(tmp_path), "otel-gil", "interpreters", f"{build_id}.json")
        assert os.path.isfile(cache_file)

        # WHEN it is inspected again, with ELF analysis made impossible
        def boom(*_a: object) -> None:
            raise AssertionError("re-analysed a cached interpreter")

        monkeypatch.setattr(discovery, "_inspect", boom)
        t0 = time.perf_counter()
        again = inspect_process(proc.pid)
        warm = time.perf_counter() - t0
        # THEN the memory cache answered, identically and much faster
        assert again == first
        assert warm < cold / 10, (cold, warm)

        # AND after the memory cache is gone, the JSON file on disk answers
        discovery.clear_memory_cache()
        assert inspect_process(proc.pid) == first
    finally:
        proc.kill()
        proc.wait()


def test_corrupt_disk_cache_is_ignored_and_rewritten(tmp_path: str) -> None:
    # GIVEN a corrupt cache file for pyenv 3.11's build-id
    path = f"{PYENV}/3.11.7/lib/libpython3.11.so.1.0"
    truth = inspect_binary(path, cache=False)
    directory = os.path.join(str(tmp_path), "otel-gil", "interpreters")
    os.makedirs(directory)
    cache_file = os.path.join(directory, f"{truth.build_id}.json")
    with open(cache_file, "w") as f:
        f.write('{"format": 1, "interpreter": {"path": ')
    # WHEN the binary is inspected through the cache
    got = inspect_binary(path)
    # THEN the result is right and the file now holds valid JSON of it
    assert got == truth
    with open(cache_file) as f:
        assert json.load(f)["interpreter"]["take_gil"][0]["name"] == "take_gil"


def test_missing_pid_and_non_python_pid() -> None:
    # GIVEN a pid that does not exist and a running `sleep`
    missing = 4194304 + 1  # above the kernel's pid_max limit, so never a process
    sleep = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.05)  # let exec replace the forked Python image
        # WHEN/THEN inspecting them raises TargetError with a plain message
        with pytest.raises(TargetGone, match=f"^no process with pid {missing}$"):
            inspect_process(missing)
        not_python = (rf"^pid {sleep.pid} \(sleep\) is not a Python process: no libpython3.X is "
                      r"mapped into it, and /usr/bin/sleep holds no CPython \(no _PyRuntime\) "
                      r"\(give the pid of a CPython 3.8 to 3.15 process\)$")
        with pytest.raises(NotPythonError, match=not_python):
            inspect_process(sleep.pid)
    finally:
        sleep.kill()
        sleep.wait()


@pytest.mark.parametrize("program", [["sleep", "0"], [pyenv_exe("3.12.1"), "-c", "pass"]],
                         ids=["sleep", "python"])
def test_a_process_that_exited_but_is_not_reaped_is_gone(program: list) -> None:
    # GIVEN a child that has exited but is not reaped yet: a zombie, which is what
    # `otel-gil run` inspects when its child exits between two child.poll() calls
    child = subprocess.Popen(program)
    assert not discovery.exiting(os.getpid())
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # wait, but do not reap
        assert discovery.exiting(child.pid)
        # WHEN it is inspected THEN TargetGone says so: not the OSError that the
        # first vanished /proc entry (its exe link) raised before
        with pytest.raises(TargetGone, match=rf"^pid {child.pid} exited while it was being "
                                             "inspected$"):
            inspect_process(child.pid)
    finally:
        child.wait()
    # AND once reaped, it is gone too, with the plain message
    with pytest.raises(TargetGone, match=f"^no process with pid {child.pid}$"):
        inspect_process(child.pid)
    assert discovery.exiting(child.pid)


def test_require_gil_raises_when_disabled() -> None:
    # GIVEN a real target whose GIL we pretend is disabled (free-threaded, PYTHON_GIL=0)
    proc = spawn([pyenv_exe("3.13.0")])
    try:
        target = inspect_process(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    def gil(**fields: Any) -> Any:
        return dataclasses.replace(target, gil=dataclasses.replace(target.gil, **fields))

    off = gil(enabled=False, enabled_count=0)
    # WHEN/THEN require_gil refuses it, with the remedy, unless asked to watch
    with pytest.raises(GilDisabledError) as err:
        require_gil(off)
    assert str(err.value) == ("GIL disabled: nothing to measure (run with PYTHON_GIL=1 to "
                              "measure the GIL; `otel-gil record` and the sidecar keep "
                              "watching and trace from the moment it is enabled)")
    require_gil(off, watch=True)
    # AND a GIL switched on only for an extension's init is said to be so
    with pytest.raises(GilDisabledError, match=r"^GIL enabled only transiently \(2 request"):
        require_gil(gil(enabled=False, enabled_count=2))
    # AND one switched off for good at start-up is refused even when watching
    pinned = gil(enabled=False, enabled_count=0, disabled_by="PYTHON_GIL=0")
    with pytest.raises(GilDisabledError) as err:
        require_gil(pinned, watch=True)
    assert str(err.value) == ("GIL disabled by PYTHON_GIL=0: nothing to measure "
                              "(run with PYTHON_GIL=1 to measure the GIL)")


@pytest.mark.parametrize("argv, value, ignore_env", [
    ([b"python3.13t", b"-X", b"gil=0", b"-c", b"pass"], b"0", False),
    ([b"python3.13t", b"-Xgil=1", b"app.py"], b"1", False),
    ([b"python3.13t", b"-X", b"dev", b"-Xgil=1", b"-Xgil=0", b"app.py", b"-Xgil=1"], b"0", False),
    ([b"python3.13t", b"-c", b"-Xgil=0"], None, False),
    ([b"python3.13t", b"app.py", b"-X", b"gil=0", b"-E"], None, False),
    ([b"python3.13t", b"-IB", b"app.py"], None, True),
    ([b"python3.13t", b"-E", b"-Xgil=0", b"-m", b"app"], b"0", True),
    ([b"python3.13t", b"-Wdefault", b"-X", b"importtime"], None, False),
    ([b"python3.13t", b"-W", b"error", b"-X", b"gil=0", b"app.py"], b"0", False),
    ([b"python3.13t"], None, False),
])
def test_x_gil_option_is_read_before_the_program(argv: list, value: Any, ignore_env: bool) -> None:
    # GIVEN a command line WHEN its -X gil= option and -E/-I are looked for
    # THEN only the interpreter's own options count, the last -X gil winning
    assert x_gil_option(argv) == (value, ignore_env)


# ----------------------------------------------------------------- extra targets


def need(path: str) -> None:
    """Skip when a scripts/targets.sh target is absent; in CI it must be there."""
    if not os.path.exists(path):
        message = f"{path} absent: run scripts/targets.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


PY313T = f"{TARGETS}/py313t"
SID = f"{TARGETS}/sid-3.14"
STRIPPED = f"{TARGETS}/stripped-3.11"


def test_free_threaded_313t_binary() -> None:
    # GIVEN the free-threaded 3.13 build of scripts/targets.sh
    lib = f"{PY313T}/lib/libpython3.13t.so.1.0"
    need(lib)
    # WHEN its libpython is inspected
    interp = inspect_binary(lib, cache=False)
    # THEN it is free-threaded; take_gil has its early `enabled == 0` return as a
    # second ret; drop_gil is inlined everywhere (no symbol)
    assert interp.version[:2] == (3, 13) and interp.free_threaded
    assert [f.name for f in interp.take_gil] == ["take_gil"]
    assert len(interp.take_gil[0].ret_addresses) == 2
    assert interp.drop_gil == ()
    # AND the GIL struct fields sit 8 bytes later, behind `int enabled`
    layout = interp.gil_layout
    assert layout is not None
    assert (layout.enabled, layout.interval, layout.locked, layout.cond) == (0, 8, 24, 40)


@pytest.mark.parametrize("gil_env, enabled", [(None, False), ("1", True)])
def test_free_threaded_313t_process(gil_env: str | None, enabled: bool) -> None:
    # GIVEN a running python3.13t, with the GIL off (default) or on (PYTHON_GIL=1)
    exe = f"{PY313T}/bin/python3.13t"
    need(exe)
    env = {"PATH": "/usr/bin:/bin"}
    if gil_env is not None:
        env["PYTHON_GIL"] = gil_env
    proc = spawn([exe], env=env)
    try:
        # WHEN it is inspected
        target = inspect_process(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    # THEN gil.enabled says which, the interval is the default, and require_gil
    # refuses only the GIL-less process
    assert target.interpreter.free_threaded
    assert target.gil.enabled is enabled
    assert target.gil.interval_us == 5000
    assert target.gil.cond_address == target.gil.address + 40
    if enabled:
        require_gil(target)
    else:
        with pytest.raises(GilDisabledError):
            require_gil(target)


@pytest.mark.parametrize("minor", [14, 15])
def test_sid_binary_in_its_root(minor: int) -> None:
    # GIVEN sid's stripped LTO python3.X, unpacked in a root tree with python3.X-dbg
    root = f"{TARGETS}/sid-3.{minor}"
    exe = f"{root}/usr/bin/python3.{minor}"
    need(exe)
    with discovery.ElfObject(exe) as obj:
        build_id = obj.build_id()
    assert build_id is not None
    # WHEN it is inspected with that tree as its root
    interp = inspect_binary(exe, root=root, cache=False)
    # THEN symbols come from the -dbg file inside the tree, matched by build-id
    debug = f"{root}/usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
    assert interp.symbol_source == f"debug file {debug} (build-id)"
    assert interp.version[:2] == (3, minor) and not interp.free_threaded
    assert interp.unverified == ""
    assert [f.name for f in interp.take_gil] == ["take_gil.lto_priv.0"]
    # AND drop_gil's out-of-line part, which unlocks and signals gil->cond, is
    # listed beside it (both have .cold parts, which are not)
    assert [f.name for f in interp.drop_gil] == ["drop_gil.constprop.0",
                                                 "drop_gil_impl.lto_priv.0"]
    assert all(len(f.ret_addresses) == 1 for f in interp.take_gil)
    # AND the GIL is located through _Py_DebugOffsets (3.14's threads_main layout)
    layout = interp.gil_layout
    assert layout is not None and layout.how == "_Py_DebugOffsets"
    assert (layout.locked, layout.cond) == (16, 32)
    # AND from 3.15 on they also publish PyThreadState.holds_gil/gil_requested,
    # where take_gil's code (objdump) writes them: movl $1,0x28(tstate), then
    # movq $1,0x24(tstate) once held
    if minor >= 15:
        assert (layout.tstate_holds_gil, layout.tstate_gil_requested) == (0x24, 0x28)
        take = interp.take_gil[0]
        code = objdump_text(exe, take.address, take.size)
        assert re.search(r"movl +\$0x1,0x28\(%r\w+\)", code)
        assert re.search(r"movq +\$0x1,0x24\(%r\w+\)", code)
    else:
        assert layout.tstate_holds_gil is None


def objdump_text(path: str, start: int, size: int) -> str:
    return subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", f"--start-address={start:#x}",
         f"--stop-address={start + size:#x}", path],
        capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("minor", [14, 15])
def test_sid_process_in_chroot_and_pid_namespace(minor: int) -> None:
    # GIVEN python3.X running chrooted in the sid tree, in its own PID namespace
    root = f"{TARGETS}/sid-3.{minor}"
    need(f"{root}/usr/bin/python3.{minor}")
    proc = subprocess.Popen(
        ["/usr/bin/unshare", "--pid", "--fork", f"--mount-proc={root}/proc",
         "/usr/sbin/chroot", root, f"/usr/bin/python3.{minor}", "-c", CHILD],
        stdout=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    child = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                               text=True, check=True).stdout.split()[0])
    try:
        # WHEN the python inside is inspected by its host pid
        target = inspect_process(child)
        # THEN it is pid 1 in its namespace, its GIL is found, and the libc to
        # probe is the tree's own (sid's), not the host's
        assert target.nspid == (child, 1)
        assert target.interpreter.version[:2] == (3, minor)
        assert target.gil.interval_us == 5000
        assert target.gil.cond_address == target.gil.address + 32
        assert os.path.samefile(target.cond_signal[0], f"{root}/usr/lib/x86_64-linux-gnu/libc.so.6")
        assert peek_int(child, target.gil.address + 16) in (0, 1)
    finally:
        os.kill(child, 9)
        proc.wait()


def test_stripped_315_in_its_root() -> None:
    # GIVEN sid's python3.15 stripped of everything (.symtab, .gnu_debuglink),
    # in a tree without debug files, as a slim image ships it
    exe = f"{TARGETS}/stripped-3.15/usr/bin/python3.15"
    need(exe)
    # WHEN it is inspected
    interp = inspect_binary(exe, root=f"{TARGETS}/stripped-3.15", cache=False)
    # THEN take_gil is found from PyEval_AcquireLock's tail call, at the address
    # the -dbg file gives sid's original, and the GIL through _Py_DebugOffsets
    truth = inspect_binary(f"{TARGETS}/sid-3.15/usr/bin/python3.15",
                           root=f"{TARGETS}/sid-3.15", cache=False)
    assert interp.symbol_source == discovery.FALLBACK_SOURCE
    assert [(f.address, f.size, f.ret_addresses) for f in interp.take_gil] == [
        (f.address, f.size, f.ret_addresses) for f in truth.take_gil]
    assert interp.gil_layout == truth.gil_layout


def test_stripped_311_copy() -> None:
    # GIVEN the stripped pyenv 3.11 prefix of scripts/targets.sh
    lib = f"{STRIPPED}/lib/libpython3.11.so.1.0"
    need(lib)
    # WHEN its libpython is inspected without the build-id cache
    interp = inspect_binary(lib, cache=False)
    # THEN the symbol-free fallback finds pyenv 3.11.7's take_gil
    truth = inspect_binary(f"{PYENV}/3.11.7/lib/libpython3.11.so.1.0", cache=False)
    assert interp.symbol_source == discovery.FALLBACK_SOURCE
    assert interp.take_gil[0].address == truth.take_gil[0].address
    assert interp.take_gil[0].ret_addresses == truth.take_gil[0].ret_addresses


# sid's 3.15.2 thread_state table in _Py_DebugOffsets, as read from the file:
# {size, prev, next, interp, current_frame, base_frame, last_profiled_frame,
# last_profiled_frame_seq, thread_id, native_thread_id, ...}; the -dbg DWARF
# puts thread_id at 176 and native_thread_id at 184.
TSTATE_315 = (888, 0, 8, 16, 72, 80, 88, 96, 176, 184, 256, 32, 36, 40, 136, 288)


def test_thread_ids_of_315_are_read_at_their_index() -> None:
    from otel_gil.layout import _TSTATE_ID_FIELDS, _thread_state_ids
    # GIVEN the table after 3 unrelated words WHEN read as 3.15's
    q = (1, 2, 3) + TSTATE_315
    # THEN the ids are 176/184, not the first 8-apart pair (base_frame's)
    assert _thread_state_ids(q, 0, _TSTATE_ID_FIELDS[(3, 15)]) == (176, 184)
    # AND an unknown version's search refuses the ambiguous table
    assert _thread_state_ids(q, 0) is None


class _FakeMem:
    """A process's memory for probes._tid_offsets: {address: bytes}."""

    def __init__(self, pages: dict[int, bytes]) -> None:
        self.pages, self.at = pages, 0

    def seek(self, at: int) -> None:
        self.at = at

    def read(self, size: int) -> bytes:
        for base, data in self.pages.items():
            if base <= self.at < base + len(data):
                return data[self.at - base:self.at - base + size]
        raise OSError("unmapped")


def test_holder_tid_offset_search_uses_several_thread_states() -> None:
    from otel_gil.probes import _tid_offsets

    def tstate(nxt: int, tid: int) -> bytes:
        # prev, next, then a flag word of 1 everywhere, the tid at 40
        words = [0, nxt, 1, 0, 0, tid] + [0] * 26
        return struct.pack("<32Q", *words)
    # GIVEN a PID namespace: the main thread is tid 1, like the flag word
    mem = _FakeMem({0x1000: tstate(0x2000, 1), 0x2000: tstate(0x3000, 2),
                    0x3000: tstate(0, 3)})
    raw = mem.pages[0x1000]
    # WHEN searched from the main thread's state alone, two offsets fit...
    assert [off for off in range(0, len(raw) - 7, 8)
            if int.from_bytes(raw[off:off + 8], "little") in {1, 2, 3}] == [16, 40]
    # THEN with the states after it, only the tid's offset does
    assert _tid_offsets(mem, 0x1000, raw, {1, 2, 3}) == [40]
