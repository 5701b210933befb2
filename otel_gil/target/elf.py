"""Reading ELF objects without running them: symbols, debug files, code bytes.

Everything here works on files only (never on the target's Python). Symbol
tables are parsed with :mod:`struct` directly rather than through pyelftools'
per-symbol objects: Debian's python3.11 debug file has ~40k symbols and the raw
parse is about 50x faster.
"""

from __future__ import annotations

import io
import lzma
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Pattern

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from otel_gil.errors import TargetError
from otel_gil.target import procfs

# Copies GCC makes of a static function (as `nm` lists them in the pyenv and
# Debian builds: 3.8 `take_gil.constprop.0`, Debian 3.11 `take_gil.lto_priv.0`).
# `.cold` parts are matched separately.
# drop_gil_impl(tstate, gil) is the part of drop_gil that unlocks and signals
# gil->cond (3.13 free-threaded, 3.15 everywhere): sid's 3.15 has an
# out-of-line `drop_gil_impl.lto_priv.0` beside `drop_gil.constprop.0`.
GIL_FUNCTION_RE: dict[str, Pattern[str]] = {
    "take_gil": re.compile(r"^take_gil(\.(constprop|isra|lto_priv|part)\.\d+)*$"),
    "drop_gil": re.compile(r"^drop_gil(_impl)?(\.(constprop|isra|lto_priv|part)\.\d+)*$"),
}
COLD_SUFFIX_RE = re.compile(r"\.cold(\.\d+)?$")

_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size
STT_FUNC = 2
STT_OBJECT = 1
SHN_UNDEF = 0


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int
    size: int
    kind: int  # STT_*


class ElfObject:
    """One ELF file, opened for reading; ``close()`` it (or use ``with``)."""

    def __init__(self, path: str, data: bytes | None = None) -> None:
        self.path = path
        self._file: BinaryIO = (
            io.BytesIO(data) if data is not None else open(path, "rb")  # noqa: SIM115
        )
        try:
            self.elf = ELFFile(self._file)
        except ELFError as err:
            self._file.close()
            raise TargetError(f"{path} is not an ELF file: {err}") from err
        if self.elf.get_machine_arch() != "x64":
            arch = self.elf.get_machine_arch()
            bits = self.elf.elfclass
            self._file.close()
            raise TargetError(
                f"{path} is a {bits}-bit {arch} program: otel-gil traces x86-64 (64-bit) "
                "CPython only",
                remedy="run the app with a 64-bit x86-64 Python",
            )
        self._symcache: dict[str, list[Symbol]] = {}
        self._eh_frame_hdr: bytes | None = None  # fde_entry's table, read once

    def __enter__(self) -> ElfObject:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    # ------------------------------------------------------------- identity

    def build_id(self) -> str | None:
        for seg in self.elf.iter_segments("PT_NOTE"):
            for note in seg.iter_notes():  # type: ignore[attr-defined]
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
        return None

    def debuglink(self) -> tuple[str, int] | None:
        """(file name, CRC32) from ``.gnu_debuglink``, if any."""
        sec = self.elf.get_section_by_name(".gnu_debuglink")
        if sec is None:
            return None
        data = sec.data()
        end = data.index(b"\0")
        crc_at = (end + 4) & ~3  # the name is padded to 4 bytes, then a u32 CRC
        (crc,) = struct.unpack_from("<I", data, crc_at)
        return data[:end].decode(), crc

    def program_interpreter(self) -> str | None:
        """The dynamic loader named by PT_INTERP (a program's), or None."""
        for seg in self.elf.iter_segments("PT_INTERP"):
            return str(seg.get_interp_name())  # type: ignore[attr-defined]
        return None

    def is_executable(self) -> bool:
        """True for a program (has PT_INTERP), false for a shared library."""
        return any(True for _ in self.elf.iter_segments("PT_INTERP"))

    def has_section(self, name: str) -> bool:
        return self.elf.get_section_by_name(name) is not None

    def section_range(self, name: str) -> tuple[int, int] | None:
        sec = self.elf.get_section_by_name(name)
        if sec is None:
            return None
        return sec["sh_addr"], sec["sh_size"]

    # ------------------------------------------------------------- symbols

    def symbols(self, section: str) -> list[Symbol]:
        """Defined function and object symbols of ``.symtab`` or ``.dynsym``."""
        if section in self._symcache:
            return self._symcache[section]
        out: list[Symbol] = []
        sec = self.elf.get_section_by_name(section)
        if sec is not None and sec["sh_type"] != "SHT_NOBITS":
            strtab = self.elf.get_section(sec["sh_link"]).data()
            for name_off, info, _other, shndx, value, size in _SYM.iter_unpack(sec.data()):
                kind = info & 0xF
                if shndx == SHN_UNDEF or kind not in (STT_FUNC, STT_OBJECT):
                    continue
                name = strtab[name_off : strtab.index(b"\0", name_off)]
                out.append(Symbol(name.decode(errors="replace"), value, size, kind))
        self._symcache[section] = out
        return out

    def lookup(self, name: str,
               sections: tuple[str, ...] = (".dynsym", ".symtab")) -> Symbol | None:
        for section in sections:
            for sym in self.symbols(section):
                if sym.name == name:
                    return sym
        return None

    def versioned_dynsym(self, name: str) -> tuple[Symbol, str] | None:
        """The default (``@@``) version of a dynamic symbol, with its version name.

        glibc exports ``pthread_cond_signal`` twice: ``@@GLIBC_2.3.2`` (the
        default, what programs link to) and a hidden ``@GLIBC_2.2.5`` compat one.
        """
        dynsym = self.elf.get_section_by_name(".dynsym")
        versym = self.elf.get_section_by_name(".gnu.version")
        verdef = self.elf.get_section_by_name(".gnu.version_d")
        if dynsym is None:
            return None
        strtab = self.elf.get_section(dynsym["sh_link"]).data()
        versions = versym.data() if versym is not None else b""
        for index, (name_off, info, _o, shndx, value, size) in enumerate(
            _SYM.iter_unpack(dynsym.data())
        ):
            if shndx == SHN_UNDEF:
                continue
            if strtab[name_off : strtab.index(b"\0", name_off)] != name.encode():
                continue
            if not versions:
                return Symbol(name, value, size, info & 0xF), ""
            (ver,) = struct.unpack_from("<H", versions, 2 * index)
            if ver & 0x8000:  # hidden: a compat version, not the default
                continue
            label = ""
            if verdef is not None:
                got = verdef.get_version(ver & 0x7FFF)  # type: ignore[attr-defined]
                if got is not None:
                    label = next(iter(got[1])).name
            return Symbol(name, value, size, info & 0xF), label
        return None

    def exported_functions(self) -> dict[int, str]:
        return {s.value: s.name for s in self.symbols(".dynsym") if s.kind == STT_FUNC}

    # ------------------------------------------------------------- bytes

    def read(self, vaddr: int, size: int) -> bytes:
        """``size`` bytes at link-time address ``vaddr``, from the file's PT_LOADs."""
        for seg in self.elf.iter_segments("PT_LOAD"):
            start, filesz = seg["p_vaddr"], seg["p_filesz"]
            if start <= vaddr and vaddr + size <= start + filesz:
                self._file.seek(seg["p_offset"] + vaddr - start)
                return self._file.read(size)
        raise TargetError(f"{self.path}: address {vaddr:#x}+{size} is not in a loaded segment")

    def load_segments(self) -> list[tuple[int, int, int]]:
        """(p_offset, p_vaddr, p_filesz) of every PT_LOAD, in file order."""
        return [
            (s["p_offset"], s["p_vaddr"], s["p_filesz"]) for s in self.elf.iter_segments("PT_LOAD")
        ]

    def plt_ranges(self) -> list[tuple[int, int]]:
        names = (".plt", ".plt.sec", ".plt.got")
        return [r for r in (self.section_range(n) for n in names) if r is not None]

    def rodata(self) -> bytes:
        sec = self.elf.get_section_by_name(".rodata")
        return sec.data() if sec is not None else b""

    # ------------------------------------------------------------- unwind tables

    def fde_extent(self, address: int) -> tuple[int, int] | None:
        """(start, size) of the ``.eh_frame`` FDE covering ``address``.

        Uses the sorted table in ``.eh_frame_hdr`` (binary search), so it costs
        one FDE parse instead of walking every CFI entry with pyelftools.
        """
        entry = self.fde_entry(address)
        return None if entry is None else entry[1:]

    def fde_entry(self, address: int) -> tuple[int, int, int] | None:
        """(FDE address, start, size) of the FDE covering ``address`` (unwind.py)."""
        hdr = self.section_range(".eh_frame_hdr")
        if hdr is None:
            return None
        base, size = hdr
        if self._eh_frame_hdr is None:
            self._eh_frame_hdr = self.read(base, size)
        data = self._eh_frame_hdr
        version, _ptr_enc, count_enc, table_enc = data[:4]
        if version != 1 or count_enc != 0x03 or table_enc != 0x3B:
            return None  # only GCC/LLVM's usual udata4 / datarel|sdata4 table is read
        (count,) = struct.unpack_from("<I", data, 8)
        lo, hi = 0, count - 1
        found = None
        while lo <= hi:  # last entry whose initial location <= address
            mid = (lo + hi) // 2
            loc, _fde = struct.unpack_from("<ii", data, 12 + 8 * mid)
            if base + loc <= address:
                found, lo = mid, mid + 1
            else:
                hi = mid - 1
        if found is None:
            return None
        _loc, fde_rel = struct.unpack_from("<ii", data, 12 + 8 * found)
        start, length = self._parse_fde(base + fde_rel)
        return (base + fde_rel, start, length) if start <= address < start + length else None

    def _parse_fde(self, fde: int) -> tuple[int, int]:
        length, cie_rel = struct.unpack("<Ii", self.read(fde, 8))
        if length == 0xFFFFFFFF:
            raise TargetError(f"{self.path}: 64-bit .eh_frame entries are not supported")
        enc = self._cie_pointer_encoding(fde + 4 - cie_rel)
        field = fde + 8
        fmt = {0x0B: "<i", 0x03: "<I", 0x0C: "<q", 0x04: "<Q", 0x00: "<Q"}.get(enc & 0x0F)
        if fmt is None or enc & 0x70 not in (0x00, 0x10):
            raise TargetError(f"{self.path}: unsupported .eh_frame pointer encoding {enc:#x}")
        width = struct.calcsize(fmt)
        begin, pc_range = struct.unpack(fmt + fmt[1], self.read(field, 2 * width))
        if enc & 0x70 == 0x10:  # pc-relative
            begin += field
        return begin & 0xFFFFFFFFFFFFFFFF, pc_range

    def _cie_pointer_encoding(self, cie: int) -> int:
        blob = self.read(cie, 64)
        pos = 9  # length u32, CIE id u32, version u8
        aug_end = blob.index(b"\0", pos)
        aug = blob[pos:aug_end].decode()
        pos = aug_end + 1
        for _ in range(3):  # code align, data align, return register (ULEB/SLEB)
            while blob[pos] & 0x80:
                pos += 1
            pos += 1
        if not aug.startswith("z"):
            return 0x00
        while blob[pos] & 0x80:  # augmentation data length
            pos += 1
        pos += 1
        for ch in aug[1:]:
            if ch == "R":
                return blob[pos]
            if ch == "L":
                pos += 1
            elif ch == "P":
                penc = blob[pos]
                pos += 1 + {0x0B: 4, 0x03: 4, 0x0C: 8, 0x04: 8, 0x00: 8}.get(penc & 0x0F, 8)
        return 0x00


def gil_symbols(obj: ElfObject) -> tuple[list[Symbol], list[Symbol], list[Symbol]]:
    """take_gil copies, drop_gil copies and their ``.cold`` parts in ``.symtab``."""
    takes: list[Symbol] = []
    drops: list[Symbol] = []
    colds: list[Symbol] = []
    for sym in obj.symbols(".symtab"):
        if sym.kind != STT_FUNC or not sym.name.startswith(("take_gil", "drop_gil")):
            continue
        if COLD_SUFFIX_RE.search(sym.name):
            colds.append(sym)
        elif GIL_FUNCTION_RE["take_gil"].match(sym.name):
            takes.append(sym)
        elif GIL_FUNCTION_RE["drop_gil"].match(sym.name):
            drops.append(sym)
    return takes, drops, colds


def minidebuginfo(obj: ElfObject) -> ElfObject | None:
    """The xz-compressed ELF in ``.gnu_debugdata`` (Fedora's MiniDebugInfo)."""
    sec = obj.elf.get_section_by_name(".gnu_debugdata")
    if sec is None:
        return None
    try:
        data = lzma.decompress(sec.data())
    except lzma.LZMAError as err:
        raise TargetError(f"{obj.path}: corrupt .gnu_debugdata: {err}") from err
    return ElfObject(f"{obj.path}[.gnu_debugdata]", data=data)


def debug_file_candidates(
    obj: ElfObject, roots: tuple[str, ...]
) -> Iterator[tuple[str, str]]:
    """(path, how) of separate debug files that match ``obj``, best first.

    By build-id (``/usr/lib/debug/.build-id/xx/rest.debug``, build-id checked),
    then by ``.gnu_debuglink`` (CRC32 checked), in each root in turn.
    """
    build_id = obj.build_id()
    link = obj.debuglink()
    obj_dir = os.path.dirname(obj.path)
    for root in roots:
        if build_id and len(build_id) > 2:
            path = os.path.join(
                root, "usr/lib/debug/.build-id", build_id[:2], build_id[2:] + ".debug"
            )
            if os.path.isfile(path) and _build_id_of(path) == build_id:
                yield path, f"debug file {procfs.shown(path)} (build-id)"
        if link is not None:
            name, crc = link
            rel_dir = _strip_root(obj_dir, root)
            for d in (obj_dir, os.path.join(obj_dir, ".debug"),
                      os.path.join(root, "usr/lib/debug" + rel_dir)):
                path = os.path.join(d, name)
                if os.path.isfile(path) and _crc32(path) == crc:
                    yield path, f"debug file {procfs.shown(path)} (debuglink)"


def _strip_root(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root):] if root and path.startswith(root + "/") else path


def _build_id_of(path: str) -> str | None:
    try:
        with ElfObject(path) as other:
            return other.build_id()
    except (OSError, TargetError):
        return None


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc & 0xFFFFFFFF
