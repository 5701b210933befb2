"""Copies of a real libpython made to look like a CPython otel-gil does not know yet.

A vendor build or a 3.16 alpha cannot be downloaded here, so the tests take
pyenv's 3.13.0 libpython, a real interpreter that still runs, and rewrite the
few bytes that say what it is: the exported ``Py_Version`` (PY_VERSION_HEX),
the version in its ``_Py_DebugOffsets``, and its GNU build-id (a different
build must not hit the original's cache entry). Optionally the debug offsets'
cookie or their interpreter_state table are spoiled, as a build that changed
them would.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

from elftools.elf.elffile import ELFFile

PYENV_313_LIB = Path("/root/.pyenv/versions/3.13.0/lib/libpython3.13.so.1.0")
PYENV_313_BIN = Path("/root/.pyenv/versions/3.13.0/bin/python3.13")
HEX_3_16_0A1 = 0x031000A1  # Include/patchlevel.h: 3.16.0 alpha 1


def _file_offset(elf: ELFFile, vaddr: int) -> int:
    for seg in elf.iter_segments("PT_LOAD"):
        if seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
            return int(seg["p_offset"] + vaddr - seg["p_vaddr"])
    raise ValueError(f"{vaddr:#x} is not in the file")


def _symbol(elf: ELFFile, name: str) -> int:
    for section in (".dynsym", ".symtab"):
        table = elf.get_section_by_name(section)
        if table is None:
            continue
        found = table.get_symbol_by_name(name)  # type: ignore[attr-defined]
        if found:
            return int(found[0]["st_value"])
    raise KeyError(name)


def _build_id_offset(elf: ELFFile) -> int:
    for seg in elf.iter_segments("PT_NOTE"):
        for note in seg.iter_notes():  # type: ignore[attr-defined]
            if note["n_type"] == "NT_GNU_BUILD_ID":
                name_size = (note["n_namesz"] + 3) & ~3
                return int(note["n_offset"] + 12 + name_size)
    raise ValueError("no build-id note")


def patched_libpython(directory: Path, hexversion: int = HEX_3_16_0A1, *,
                      cookie: bool = True, gil_table: bool = True) -> Path:
    """A copy of pyenv 3.13.0's libpython in ``directory`` (same file name, so
    LD_LIBRARY_PATH loads it) that says it is ``hexversion``."""
    dst = directory / PYENV_313_LIB.name
    shutil.copyfile(PYENV_313_LIB, dst)
    with open(PYENV_313_LIB, "rb") as f:
        elf = ELFFile(f)
        py_version = _file_offset(elf, _symbol(elf, "Py_Version"))
        runtime = _file_offset(elf, _symbol(elf, "_PyRuntime"))
        build_id = _build_id_offset(elf)
    with open(dst, "r+b") as f:
        f.seek(py_version)
        f.write(struct.pack("<I", hexversion))
        f.seek(runtime + 8)  # _Py_DebugOffsets: char cookie[8], uint64_t version
        f.write(struct.pack("<Q", hexversion))
        f.seek(build_id)
        f.write(b"\x16\x00")  # another build
        if not cookie:
            f.seek(runtime)
            f.write(b"vendorxx")
        if not gil_table:
            # interpreter_state {size, id, next, threads_head, ...} starts at
            # uint64 index 5 after the cookie; zero everything after `next`.
            f.seek(runtime + 8 + 8 * (5 + 3))
            f.write(bytes(8 * 14))
    return dst
