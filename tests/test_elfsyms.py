"""ELF reading on this machine's real interpreters, checked against binutils.

objdump, nm and readelf are the independent references: the code under test
uses pyelftools and capstone, never binutils.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import subprocess

import pytest

from otel_gil.target.dwarf import dwarf_layout
from otel_gil.target.elf import ElfObject
from otel_gil.target.interpreter import inspect_binary
from otel_gil.target.layout import table_layout

PYENV = "/root/.pyenv/versions"
# version -> names of the take_gil copies that nm lists (checked on the pyenv builds)
PYENV_BUILDS: dict[str, tuple[str, ...]] = {
    "3.8.18": ("take_gil", "take_gil.constprop.0"),
    "3.9.18": ("take_gil",),
    "3.10.13": ("take_gil",),
    "3.11.7": ("take_gil",),
    "3.12.1": ("take_gil",),
    "3.13.0": ("take_gil",),
}
DEBIAN_EXE = "/usr/bin/python3.11"
DEBIAN_LIB = "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"


def libpython(version: str) -> str:
    minor = version.rsplit(".", 1)[0]
    return f"{PYENV}/{version}/lib/libpython{minor}.so.1.0"


def debian_version() -> tuple[int, int, int]:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "python3.11-minimal"],
                         capture_output=True, text=True, check=True).stdout
    major, minor, micro = re.match(r"(\d+)\.(\d+)\.(\d+)", out).groups()  # type: ignore[union-attr]
    return int(major), int(minor), int(micro)


def nm_functions(path: str, pattern: str) -> dict[str, int]:
    """name -> address of local/global text symbols matching ``pattern`` (nm, no -D)."""
    out = subprocess.run(["nm", path], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tT" and re.match(pattern, parts[2]):
            found[parts[2]] = int(parts[0], 16)
    return found


def objdump_rets(path: str, start: int, size: int) -> list[int]:
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", f"--start-address={start:#x}",
         f"--stop-address={start + size:#x}", path],
        capture_output=True, text=True, check=True,
    ).stdout
    rets = []
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(?:(?:repz|rep|bnd|notrack)\s+)?retq?\b", line)
        if m:
            rets.append(int(m.group(1), 16))
    return rets


TAKE_GIL_RE = r"^take_gil(\.(constprop|isra|lto_priv|part)\.\d+)*$"


@pytest.mark.parametrize("version", sorted(PYENV_BUILDS))
def test_pyenv_libpython_symbols_versions_and_rets(version: str) -> None:
    # GIVEN a pyenv libpython with a full .symtab
    path = libpython(version)
    # WHEN it is inspected without the cache
    interp = inspect_binary(path, cache=False)
    # THEN the version is the one pyenv installed, read from the binary
    assert interp.version == tuple(int(x) for x in version.split("."))
    assert interp.symbol_source == "symtab"
    assert not interp.static and not interp.free_threaded
    # AND the take_gil copies are exactly what nm lists, at nm's addresses
    assert {f.name: f.address for f in interp.take_gil} == nm_functions(path, TAKE_GIL_RE)
    assert tuple(sorted(f.name for f in interp.take_gil)) == PYENV_BUILDS[version]
    # AND each copy has exactly one ret, where objdump sees it
    for fn in interp.take_gil + interp.drop_gil:
        assert len(fn.ret_addresses) == 1, fn
        assert list(fn.ret_addresses) == objdump_rets(path, fn.address, fn.size)
        assert fn.notes == ()
    assert [f.name for f in interp.drop_gil] == ["drop_gil"]


@pytest.mark.parametrize("path", [DEBIAN_EXE, DEBIAN_LIB])
def test_debian_311_symbols_come_from_the_dbg_build_id_file(path: str) -> None:
    # GIVEN Debian's stripped LTO python3.11 (static exe, and the shared lib)
    with ElfObject(path) as obj:
        build_id = obj.build_id()
        assert not obj.has_section(".symtab")
    assert build_id is not None
    debug = f"/usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
    # WHEN it is inspected
    interp = inspect_binary(path, cache=False)
    # THEN the version is the installed package's, and symbols came from python3.11-dbg
    assert interp.version == debian_version()
    assert interp.symbol_source == f"debug file {debug} (build-id)"
    assert interp.static == (path == DEBIAN_EXE)
    # AND the LTO copy of take_gil is found (never its .cold part), with one ret
    assert [f.name for f in interp.take_gil] == ["take_gil.lto_priv.0"]
    assert interp.take_gil[0].address == nm_functions(debug, TAKE_GIL_RE)["take_gil.lto_priv.0"]
    for fn in interp.take_gil:
        assert len(fn.ret_addresses) == 1
        assert list(fn.ret_addresses) == objdump_rets(path, fn.address, fn.size)
        assert fn.notes == ()


@pytest.mark.parametrize("version", sorted(PYENV_BUILDS))
def test_stripped_copy_falls_back_to_pyeval_acquirelock(version: str, tmp_path: str) -> None:
    # GIVEN a `strip --strip-all` copy of a pyenv libpython, no debug files around
    original = libpython(version)
    copy = os.path.join(str(tmp_path), os.path.basename(original))
    subprocess.run(["strip", "--strip-all", "-o", copy, original], check=True)
    # WHEN it is inspected (root without /usr/lib/debug; "/" has none for pyenv)
    interp = inspect_binary(copy, root=str(tmp_path), cache=False)
    # THEN take_gil is found from PyEval_AcquireLock's branch at the symtab's address
    # (3.8: the constprop clone, which AcquireLock calls), with its symtab size
    expected = "take_gil.constprop.0" if version == "3.8.18" else "take_gil"
    truth = inspect_binary(original, cache=False)
    want = next(f for f in truth.take_gil if f.name == expected)
    assert interp.symbol_source == "no symbols: call target of PyEval_AcquireLock (capstone)"
    assert [(f.address, f.size, f.ret_addresses) for f in interp.take_gil] == [
        (want.address, want.size, want.ret_addresses)
    ]
    assert interp.drop_gil == ()
    # AND version and GIL layout still come out right without symbols
    assert interp.version == truth.version
    assert interp.runtime_address == truth.runtime_address


def test_minidebuginfo_is_read(tmp_path: str) -> None:
    # GIVEN a stripped libpython carrying its .symtab as xz'd MiniDebugInfo (Fedora-style)
    original = libpython("3.12.1")
    d = str(tmp_path)
    mini, stripped = os.path.join(d, "mini"), os.path.join(d, "libpython3.12.so.1.0")
    subprocess.run(["objcopy", "--only-keep-debug", original, mini], check=True)
    subprocess.run(["strip", "--strip-debug", mini], check=True)
    with open(mini, "rb") as f, open(mini + ".xz", "wb") as g:
        g.write(lzma.compress(f.read()))
    subprocess.run(["strip", "--strip-all", "-o", stripped, original], check=True)
    subprocess.run(["objcopy", "--add-section", f".gnu_debugdata={mini}.xz", stripped],
                   check=True)
    # WHEN it is inspected
    interp = inspect_binary(stripped, root=d, cache=False)
    # THEN the symbols come from .gnu_debugdata and match the unstripped file
    truth = inspect_binary(original, cache=False)
    assert interp.symbol_source == "minidebuginfo"
    assert interp.take_gil == tuple(
        f.__class__(f.name, f.address, f.size, f.ret_addresses, "minidebuginfo", f.notes)
        for f in truth.take_gil
    )


@pytest.mark.parametrize("version", sorted(PYENV_BUILDS))
def test_eh_frame_extent_matches_symbol_size(version: str) -> None:
    # GIVEN a pyenv libpython; WHEN the FDE of take_gil's body is looked up
    path = libpython(version)
    with ElfObject(path) as obj:
        for name, address in nm_functions(path, TAKE_GIL_RE).items():
            size = next(s.size for s in obj.symbols(".symtab") if s.name == name)
            # THEN .eh_frame gives the same extent as the symbol table
            assert obj.fde_extent(address + 7) == (address, size)


@pytest.mark.parametrize("version", ["3.8.18", "3.9.18", "3.10.13", "3.11.7", "3.12.1"])
def test_fallback_table_agrees_with_dwarf(version: str) -> None:
    # GIVEN a pyenv build with DWARF; WHEN the layout is read from DWARF and the table
    path = libpython(version)
    v = tuple(int(x) for x in version.split("."))
    with ElfObject(path) as obj:
        take = nm_functions(path, r"^take_gil$")["take_gil"]
        dwarf = dwarf_layout(obj, take, v)  # type: ignore[arg-type]
    table = table_layout(v, free_threaded=False)  # type: ignore[arg-type]
    # THEN both say the same, field for field (only `how` differs)
    assert dwarf is not None and dwarf.how == "DWARF"
    assert dwarf.__class__(**{**dwarf.__dict__, "how": table.how}) == table


def test_default_pthread_cond_signal_version() -> None:
    # GIVEN this machine's libc; WHEN the default pthread_cond_signal is looked up
    libc = "/lib/x86_64-linux-gnu/libc.so.6"
    with ElfObject(libc) as obj:
        found = obj.versioned_dynsym("pthread_cond_signal")
    out = subprocess.run(["readelf", "--dyn-syms", "-W", libc], capture_output=True,
                         text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.endswith("pthread_cond_signal@@GLIBC_2.3.2"))
    # THEN it is the @@GLIBC_2.3.2 one readelf shows, not the 2.2.5 compat symbol
    assert found is not None
    assert (found[0].value, found[1]) == (int(line.split()[1], 16), "GLIBC_2.3.2")


def test_not_an_interpreter_is_refused(tmp_path: str) -> None:
    # GIVEN an ELF that is not CPython (sleep) and a file that is not ELF
    from otel_gil.errors import TargetError

    sleep = shutil.which("sleep")
    assert sleep is not None
    text = os.path.join(str(tmp_path), "x.so")
    with open(text, "w") as f:
        f.write("not elf")
    # WHEN/THEN inspecting them raises TargetError saying why
    with pytest.raises(TargetError, match="holds no CPython interpreter"):
        inspect_binary(sleep, cache=False)
    with pytest.raises(TargetError, match="is not an ELF file"):
        inspect_binary(text, cache=False)
