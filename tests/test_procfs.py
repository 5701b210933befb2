"""otel_gil/target/procfs.py (every /proc read) and otel_gil/sidecar/threads.py
(the one thread directory), on this process and real children: no eBPF."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from typing import List, Optional, Tuple

import pytest

from otel_gil.abi.slots import TableLocation
from otel_gil.app.table import ContextTable
from otel_gil.errors import TargetError, TargetGone
from otel_gil.sidecar import threads
from otel_gil.target import procfs


def test_identity_and_liveness_of_this_process_and_of_its_child() -> None:
    # GIVEN this process and a child of it that has exited but is not yet reaped
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while procfs.start_time(child.pid) is not None:
        time.sleep(0.01)
    try:
        # THEN this process is alive, not exiting, its own NSpid, and the
        # child's ancestor; the zombie child counts as exited (and exiting)
        me = os.getpid()
        assert procfs.start_time(me) is not None and not procfs.exited(me)
        assert not procfs.exiting(me)
        assert procfs.nspid(me)[-1] == me  # innermost: the pid we see ourselves as
        assert procfs.descends_from(child.pid, me) and not procfs.descends_from(me, child.pid)
        assert child.pid in procfs.children(me)
        assert procfs.exited(child.pid) and procfs.exiting(child.pid)
    finally:
        child.wait()
    # AND once reaped, it is gone for every question
    assert procfs.exited(child.pid) and procfs.exiting(child.pid)
    assert procfs.nspid(child.pid) == (child.pid,)
    with pytest.raises(TargetGone):
        procfs.read(child.pid, "status")


def test_nspid_of_a_status_text() -> None:
    assert procfs.nspid_of("Name:\tx\nNSpid:\t4012\t7\nPid:\t4012\n") == (4012, 7)
    assert procfs.nspid_of("Name:\tx\n") == ()
    assert procfs.nspid_of("NSpid:\tgarbage\n") == ()


def test_threads_are_named_and_mapped_to_their_namespace_tid() -> None:
    # GIVEN a thread of this process that named itself (prctl PR_SET_NAME,
    # linux/prctl.h: what Python 3.14's threading does), waiting
    stop, named = threading.Event(), threading.Event()

    def run() -> None:
        ctypes.CDLL(None).prctl(15, b"procfs-worker")
        named.set()
        stop.wait()

    worker = threading.Thread(target=run)
    worker.start()
    named.wait(10)
    try:
        tid = worker.native_id
        assert tid is not None
        # THEN /proc names it and maps its tid to itself (no PID namespace here)
        name, ns_tid = procfs.thread_identity(os.getpid(), tid)
        assert (name, ns_tid) == ("procfs-worker", tid)
        assert procfs.ns_tid_map(os.getpid())[tid] == tid
        assert procfs.thread_alive(os.getpid(), tid)
    finally:
        stop.set()
        worker.join()
    # AND once the kernel has reaped it (join returns as the thread exits, the
    # task goes a moment later), it has no name
    deadline = time.monotonic() + 5
    while procfs.thread_alive(os.getpid(), tid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert procfs.thread_name(os.getpid(), tid) == "?"


def test_memory_reads_and_their_errors() -> None:
    # GIVEN a buffer of this process at a known address
    data = b"otel-gil procfs"
    buf = ctypes.create_string_buffer(data)
    address = ctypes.addressof(buf)
    # THEN it reads back through /proc/self/mem, whole or best effort
    assert procfs.read_memory(os.getpid(), address, len(data)) == data
    assert procfs.peek_memory(os.getpid(), address, 4) == data[:4]
    # AND unmapped memory is one TargetError (best effort: no bytes)
    with pytest.raises(TargetError, match="cannot read 8 bytes at 0x8"):
        procfs.read_memory(os.getpid(), 8, 8)
    assert procfs.peek_memory(os.getpid(), 8, 8) == b""
    # AND an address past any file offset (a torn pointer read from a target's
    # memory) is an OSError from the raw read, not an OverflowError
    with procfs.Memory(os.getpid()) as mem:
        with pytest.raises(OSError, match="no such address: 0xdead000000000000"):
            mem.pread(0xDEAD << 48, 8)
    with pytest.raises(TargetError, match="cannot read 8 bytes at 0xdead000000000000"):
        procfs.read_memory(os.getpid(), 0xDEAD << 48, 8)
    assert procfs.peek_memory(os.getpid(), 0xDEAD << 48, 8) == b""
    # AND the holder-tid search, which follows a thread list's next pointers,
    # stops at such a pointer instead of failing the whole attach
    from otel_gil.probes import holders

    state = (0).to_bytes(8, "little") + (0xDEAD << 48).to_bytes(8, "little") + bytes(48)
    with procfs.Memory(os.getpid()) as mem:
        assert holders._tid_offsets(mem, address, state, {1}) == []


def test_root_paths() -> None:
    # GIVEN this process, whose root is "/"
    me = os.getpid()
    # THEN a path is handed to BCC under /proc/PID/root, and shown without it
    assert procfs.under_root(me, "/usr/lib/libc.so.6") == f"/proc/{me}/root/usr/lib/libc.so.6"
    assert procfs.under_root(me, f"/proc/{me}/exe") == f"/proc/{me}/exe"
    assert procfs.outside_root(me, f"/proc/{me}/root/usr/lib/x") == "/usr/lib/x"
    assert procfs.shown("/proc/123/root/usr/lib/x") == "/usr/lib/x"
    # AND a mapped file opens from here, checked by inode
    libs = [m for m in procfs.maps(me) if "libc" in os.path.basename(m.path)]
    assert libs and os.stat(procfs.open_path(me, libs[0])).st_ino == libs[0].inode


def _directory(table: ContextTable,
               os_names: Optional[List[Tuple[int, str]]] = None) -> threads.ThreadDirectory:
    known = dict(os_names or [])
    return threads.ThreadDirectory(
        os.getpid(), TableLocation(table.address, table.slots),
        lambda tid: (known[tid], tid) if tid in known else None)


def test_thread_directory_prefers_the_published_name_and_retries_a_miss() -> None:
    # GIVEN this process's own context table, one thread published in it
    table = ContextTable(slots=8)
    lease = table.claim(1001, 77, "published-name")
    directory = _directory(table, [(1001, "os-name"), (1002, "os-two")])
    # WHEN both threads are looked up
    first, second = directory(1001), directory(1002)
    # THEN the published one has its Python ident and name, the other its OS name
    assert (first.ns_tid, first.name, first.ident) == (1001, "published-name", 77)
    assert (second.name, second.ident) == ("os-two", None)
    assert directory.names([1001, 1002]) == ["published-name", "os-two"]
    # WHEN the second publishes later THEN a lookup that knows it did sees it at once
    lease2 = table.claim(1002, 78, "late-name")
    assert directory(1002).name == "os-two"  # within RETRY_NS: the cached miss
    assert directory(1002, published=True).name == "late-name"
    assert lease is not None and lease2 is not None


def test_thread_directory_survives_an_invalid_table(caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN a directory pointed at memory that is no context table
    junk = ctypes.create_string_buffer(4096)
    directory = threads.ThreadDirectory(
        os.getpid(), TableLocation(ctypes.addressof(junk), 8),
        lambda tid: ("os-name", tid))
    # WHEN a thread is looked up twice THEN it gets its OS name, and one warning
    assert directory(5, published=True).name == "os-name"
    assert directory(5, published=True).name == "os-name"
    assert sum("context table is invalid" in r.getMessage() for r in caplog.records) == 1


def test_thread_directory_keeps_a_bounded_number_of_threads() -> None:
    # GIVEN a directory of a process that started MAX_THREADS + 100 threads in turn
    asked: List[int] = []
    directory = threads.ThreadDirectory(os.getpid(), None,
                                        lambda tid: (asked.append(tid), ("t", tid))[1])
    for tid in range(1, threads.MAX_THREADS + 101):
        directory(tid)
    asked.clear()
    # WHEN the newest and the oldest are looked up again
    directory(threads.MAX_THREADS + 100)
    directory(1)
    # THEN the newest was still known; the oldest had been let go, and is asked again
    assert asked == [1]


def test_thread_directory_keeps_what_it_knew_of_an_exited_thread() -> None:
    # GIVEN a thread the directory met while it lived (remember(), as an
    # interval arrives), at tid 5 in the app's PID namespace
    table = ContextTable(slots=8)
    known = {4242: ("worker", 5)}
    directory = threads.ThreadDirectory(os.getpid(), TableLocation(table.address, table.slots),
                                        lambda tid: known.get(tid))
    directory.remember(4242)
    # WHEN it has exited (nothing knows it now) and its span is exported later
    known.clear()
    info = directory(4242, published=True)
    # THEN it keeps its name and namespace tid, not "?" and our tid
    assert (info.name, info.ns_tid) == ("worker", 5)
