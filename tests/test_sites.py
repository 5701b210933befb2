"""Probe sites: how the kernel handles an instruction, and what discovery keeps.

The placement itself is checked on real binaries elsewhere: test_doctor.py
against objdump, test_record.py and test_probe_sets.py by running the probes
(an acquisition counted once per take_gil entry, no hit when uncontended).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from targets import all_targets, require, spawn

from otel_gil.abi import events
from otel_gil.probes.holders import holder_tid_source
from otel_gil.target import interpreter, process
from otel_gil.target.disasm import EMULATED, REFUSED, SINGLE_STEPPED, probe_cost

LIBPYTHON_311 = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0"


@pytest.mark.parametrize("code, cost", [
    ("0f8586010000", EMULATED),  # jne rel32
    ("7410", EMULATED),  # je rel8
    ("e8aabbccdd", EMULATED),  # call rel32 (a PLT call)
    ("e9aabbccdd", EMULATED),  # jmp rel32
    ("eb10", EMULATED),  # jmp rel8
    ("f2e8aabbccdd", EMULATED),  # bnd call: f2 is not a refused prefix
    ("55", EMULATED),  # push rbp
    ("4157", EMULATED),  # push r15
    ("4850", SINGLE_STEPPED),  # push rax with REX.W: only 41 is emulated
    ("66e8aabb", SINGLE_STEPPED),  # callw: branches with 66 are not emulated
    ("c3", SINGLE_STEPPED),  # ret
    ("4889c7", SINGLE_STEPPED),  # mov rdi, rax
    ("ff15aabbccdd", SINGLE_STEPPED),  # call *GOT(%rip): -fno-plt
    ("f30f1efa", SINGLE_STEPPED),  # endbr64
    ("3effe0", REFUSED),  # notrack jmp *rax: DS prefix
    ("f0480fb111", REFUSED),  # lock cmpxchg
])
def test_probe_cost_follows_the_kernel(code: str, cost: str) -> None:
    # GIVEN an instruction's bytes WHEN classified THEN as arch/x86/kernel/uprobes.c
    # handles it (branch_setup_xol_ops, push_setup_xol_ops, is_prefix_bad)
    assert probe_cost(bytes.fromhex(code)) == cost


def test_sites_survive_the_disk_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path(LIBPYTHON_311).exists():
        pytest.skip(f"{LIBPYTHON_311} is missing")
    # GIVEN an empty cache directory and a first inspection that fills it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    process.clear_memory_cache()
    first = interpreter.inspect_binary(LIBPYTHON_311)
    assert list(tmp_path.rglob("*.json"))
    # WHEN the build is inspected again from the disk cache alone
    process.clear_memory_cache()
    again = interpreter.inspect_binary(LIBPYTHON_311)
    process.clear_memory_cache()
    # THEN the probe sites and the thread-id offsets are the same
    assert first.sites is not None and first.sites.held and first.sites.waits
    assert dataclasses.asdict(again) == dataclasses.asdict(first)
    assert first.gil_layout is not None and first.gil_layout.tstate_native_thread_id == 160


@pytest.mark.ebpf
@pytest.mark.parametrize("name, how, offset", [
    ("pyenv-3.8", events.GIL_TID_PTHREAD, 176), ("pyenv-3.11", events.GIL_TID_NATIVE, 160),
    ("pyenv-3.12", events.GIL_TID_NATIVE, 144)])
def test_holders_are_named_from_the_live_tstate(name: str, how: int, offset: int) -> None:
    target = next(t for t in all_targets() if t.name == name)
    require(target)
    # GIVEN a running interpreter
    with spawn(target, "import sys; print('{}', flush=True); sys.stdin.readline()") as child:
        child.read_json(timeout=60)
        found = process.inspect_process(child.host_pid)
        # WHEN the holder's tid source is checked on it THEN it is the layout's
        assert holder_tid_source(found)[:2] == (how, offset)
        if how == events.GIL_TID_NATIVE:
            # AND with a wrong offset in the layout (a build it does not know
            # right), the live PyThreadState is searched and the right one found
            assert found.interpreter.gil_layout is not None
            wrong = dataclasses.replace(found.interpreter.gil_layout, tstate_thread_id=None,
                                        tstate_native_thread_id=offset - 72)
            off = dataclasses.replace(found, interpreter=dataclasses.replace(
                found.interpreter, gil_layout=wrong))
            assert holder_tid_source(off)[:2] == (how, offset)
