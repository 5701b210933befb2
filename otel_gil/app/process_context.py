"""Publishing the app's resource as an OTEP 4719 process context.

The traced app publishes its resource attributes (:func:`publish_process_context`)
in a mapping named OTEL_CTX (the bytes: otel_gil/abi/process_context.py), for
any OTEP 4719 reader. otel-gil's own sidecar does not read it: it gets the
resource in the app's registration (otel_gil/app/protocol.py).

Runs *inside the traced app* (Python 3.8+, stdlib only) and must never raise
into the app.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Any

from otel_gil.abi.process_context import (
    PROCESS_CTX_SIGNATURE,
    PROCESS_CTX_VERSION,
    PROCESS_HEADER,
    TS_OFFSET,
    encode_process_context,
)
from otel_gil.app.table import buffer_address, name_mapping

__all__ = ["publish_process_context"]

_process_mm: mmap.mmap | None = None


def _new_process_mapping(size: int) -> mmap.mmap:
    """memfd_create("OTEL_CTX") mapping, else an anonymous one (OTEP 4719 steps 2-5)."""
    try:
        fd = os.memfd_create("OTEL_CTX", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
    except (AttributeError, OSError):  # no memfd (seccomp, old kernel)
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    try:  # a forked child must not expose its parent's resource (service.instance.id)
        mm.madvise(mmap.MADV_DONTFORK)
    except (AttributeError, OSError):
        pass
    return mm


def publish_process_context(resource: Any) -> None:
    """Publish ``resource.attributes`` (an opentelemetry Resource) as the process's
    OTEP 4719 context; republishing updates it in place. Never raises."""
    global _process_mm
    try:
        payload = encode_process_context(dict(resource.attributes))
        needed = PROCESS_HEADER.size + len(payload)
        mm = _process_mm
        if mm is not None and needed > len(mm):
            mm[TS_OFFSET:TS_OFFSET + 8] = bytes(8)  # readers mid-read retry, then move on
            mm[0:8] = bytes(8)
            mm.close()
            mm = None
        if mm is None:
            mm = _new_process_mapping(-(-needed // mmap.PAGESIZE) * mmap.PAGESIZE)
        address = buffer_address(mm)
        # Updating protocol: timestamp 0 first, then payload and fields, then the
        # signature (new mappings), and the timestamp last. Readers re-check the
        # timestamp after reading. Stores from one thread reach other CPUs in
        # order on x86-64 (TSO); elsewhere the re-check makes a torn read a retry.
        mm[TS_OFFSET:TS_OFFSET + 8] = bytes(8)
        mm[PROCESS_HEADER.size:needed] = payload
        struct.pack_into("<IIQQ", mm, 8, PROCESS_CTX_VERSION, len(payload), 0,
                         address + PROCESS_HEADER.size)
        mm[0:8] = PROCESS_CTX_SIGNATURE
        struct.pack_into("<Q", mm, TS_OFFSET,
                         max(1, time.clock_gettime_ns(time.CLOCK_BOOTTIME)))
        name_mapping(address, len(mm), PROCESS_CTX_SIGNATURE)  # fails on memfd: fine
        _process_mm = mm
    except Exception:  # noqa: BLE001, S110 - the app must start whatever happens here
        pass
