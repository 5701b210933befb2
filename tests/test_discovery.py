"""inspect_process / inspect_binary on live interpreters of this machine.

Each target is a real child process that signals "ready" on a pipe once a
second thread is spinning, so the GIL exists and changes hands.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import time
from typing import Iterator

import pytest

from otel_gil import discovery
from otel_gil.discovery import Target, inspect_binary, inspect_process, require_gil
from otel_gil.errors import GilDisabledError, TargetError

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
        with pytest.raises(TargetError, match=f"^no process with pid {missing}$"):
            inspect_process(missing)
        with pytest.raises(TargetError, match=rf"^pid {sleep.pid} \(sleep\) is not a Python process$"):
            inspect_process(sleep.pid)
    finally:
        sleep.kill()
        sleep.wait()


def test_require_gil_raises_when_disabled() -> None:
    # GIVEN a real target whose GIL we pretend is disabled (free-threaded, PYTHON_GIL=0)
    proc = spawn([pyenv_exe("3.13.0")])
    try:
        target = inspect_process(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    off = dataclasses.replace(target, gil=dataclasses.replace(target.gil, enabled=False))
    # WHEN/THEN require_gil refuses it, with the remedy
    with pytest.raises(GilDisabledError) as err:
        require_gil(off)
    assert str(err.value) == ("GIL disabled: nothing to measure "
                              "(run with PYTHON_GIL=1 to measure the GIL)")


# ----------------------------------------------------------------- extra targets


def need(path: str) -> None:
    """Skip when a scripts/targets.sh target is absent; in CI it must be there."""
    if not os.path.exists(path):
        message = f"{path} absent: run scripts/targets.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
