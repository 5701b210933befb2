"""`otel-gil doctor`: can tracing work here, and on this target? Every failed
check says exactly what to do. Exit 0 only if tracing would work."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

from otel_gil.cli.base import Command, pid_arg
from otel_gil.config import PROBE_SETS
from otel_gil.errors import GilDisabledError, OtelGilError
from otel_gil.target import interpreter, paths, process, procfs
from otel_gil.trust import printable_text


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    remedy: str = ""
    exit_code: int = 0  # the error's own status (errors.py), when the check failed


def _check(name: str, fn: Callable[[], str]) -> Check:
    """Run one check: fn returns a detail line, or raises OtelGilError."""
    try:
        return Check(name, True, fn())
    except OtelGilError as err:
        return Check(name, False, err.args[0] if err.args else str(err), err.remedy,
                     err.exit_code)


def _fail(message: str, remedy: str) -> OtelGilError:
    return OtelGilError(message, remedy)


def _root() -> str:
    if os.geteuid() != 0:
        raise _fail("not running as root",
                    "run as root (or grant CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_SYS_ADMIN)")
    return "running as root"


def _kernel() -> str:
    missing = []
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        missing.append("BTF (/sys/kernel/btf/vmlinux)")
    if not os.path.exists("/sys/bus/event_source/devices/uprobe/type"):
        missing.append("the uprobe perf PMU (CONFIG_UPROBE_EVENTS)")
    release = platform.release()
    match = re.match(r"(\d+)\.(\d+)", release)  # e.g. 6.18.44-fc-v657, 6.9-rc1
    if match is None or (int(match.group(1)), int(match.group(2))) < (5, 8):
        missing.append("BPF ring buffer (Linux 5.8+)")
    if missing:
        raise _fail(f"kernel {release} lacks " + ", ".join(missing),
                    "use Linux 5.8 or later built with CONFIG_BPF_SYSCALL and CONFIG_UPROBE_EVENTS")
    return f"kernel {release}: BPF, uprobe perf events, ring buffer, BTF"


def _headers() -> str:
    build = f"/lib/modules/{platform.release()}/build"
    if not os.path.exists(os.path.join(build, "include")):
        raise _fail(f"no kernel headers at {build}",
                    "run scripts/setup.sh (installs linux-headers and links them there)")
    return f"kernel headers: {os.path.realpath(build)}"


def _bpf_program() -> str:
    from otel_gil.probes.config import ProbeConfig  # noqa: PLC0415
    from otel_gil.probes.loader import Probes  # noqa: PLC0415 - imports bcc

    for probe_set in PROBE_SETS:
        Probes(ProbeConfig(probes=probe_set), lambda _iv: None).close()
    return ("BCC compiled and the kernel loaded the probes of both sets (uprobes, ring "
            "buffer, tracepoint)")


def _describe(interp: interpreter.Interpreter, binary: str, root: str) -> Dict[str, Any]:
    return {
        "binary": binary,
        "object": interp.path,
        "root": root,
        "version": ".".join(map(str, interp.version)),
        "flavour": "free-threaded" if interp.free_threaded else "default",
        "static": interp.static,
        "build_id": interp.build_id,
        "symbols": interp.symbol_source,
        "take_gil": [{"name": f.name, "address": hex(f.address), "rets": len(f.ret_addresses),
                      "source": f.source} for f in interp.take_gil],
        "drop_gil": [{"name": f.name, "address": hex(f.address), "source": f.source}
                     for f in interp.drop_gil],
        "release_fidelity": "exact with --probes all: every release seen at a call of "
                            "pthread_cond_signal(&gil->cond), whether or not drop_gil is inlined; "
                            "the contended set does not probe releases",
        "probes": {name: _probe_set(interp, name) for name in PROBE_SETS},
        "unverified": interp.unverified,
    }


def _summary(what: str, interp: interpreter.Interpreter, flavour: str) -> str:
    text = (f"{what}: CPython {'.'.join(map(str, interp.version))} ({flavour}), "
            f"{len(interp.take_gil)} take_gil copies via {interp.symbol_source}")
    return f"{text}; WARNING: {interp.unverified}" if interp.unverified else text


def _probe_set(interp: interpreter.Interpreter, probe_set: str) -> Dict[str, Any]:
    """Where a probe set's uprobes sit in this build, what kind of instruction
    each is on, and what that costs per hit on this machine's kind of host."""
    from otel_gil.probes.points import HIT_COST_NS, planned, transition_cost  # noqa: PLC0415

    try:
        points = planned(interp, probe_set)
    except OtelGilError as err:
        return {"usable": False, "why": str(err.args[0]), "remedy": err.remedy}
    sites = [{"role": p.role, "function": p.where, "address": hex(p.address) if p.address else None,
              "insn": p.insn, "handling": p.cost, "cost_ns": HIT_COST_NS[p.cost]} for p in points]
    notes = list(interp.sites.notes) if interp.sites is not None else [
        "the code could not be analysed: the probes of before (entry, ret, libc)"]
    layout = interp.gil_layout
    if probe_set == "contended" and (layout is None or (
            layout.tstate_native_thread_id is None and layout.tstate_thread_id is None)):
        notes.append("no thread-id offset in PyThreadState for this build: waits are timed, "
                     "but the threads holding meanwhile cannot be named (use --probes all)")
    return {"usable": True, "sites": sites, **transition_cost(points), "notes": notes}


class DoctorCommand(Command):
    name = "doctor"
    help = "check the kernel, BCC, headers and a target; exit 0 only if tracing would work"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        target = parser.add_mutually_exclusive_group()
        target.add_argument("--pid", "-p", type=pid_arg, help="a running Python process")
        target.add_argument("--python", metavar="PATH", help="a Python interpreter binary")
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def run(self, args: argparse.Namespace) -> int:
        checks = [_check("root", _root), _check("kernel", _kernel),
                  _check("headers", _headers)]
        if all(c.ok for c in checks):
            checks.append(_check("bpf", _bpf_program))
        target: Optional[Dict[str, Any]] = None
        if args.pid or args.python:
            target = {}
            checks.append(_check("target", lambda: self._target(args, target)))
        failed = [c for c in checks if not c.ok]
        verdict = _verdict(failed)
        if args.json:
            print(json.dumps({"ok": not failed, "verdict": verdict,
                              "checks": [asdict(c) for c in checks], "target": target},
                             indent=1))
        else:
            self._print(checks, target, verdict)
        if any(c.exit_code == GilDisabledError.exit_code for c in failed):
            return GilDisabledError.exit_code  # its own status, as for record (README)
        return 1 if failed else 0

    @staticmethod
    def _target(args: argparse.Namespace, out: Dict[str, Any]) -> str:
        # Files are read afresh (cache=False): doctor reports how symbols resolve
        # now, e.g. after the -dbg package was installed, and for this very file
        # (a stripped copy shares its build-id, so its cache entry, with the original).
        if args.python:
            elf, root = paths.interpreter_object(args.python, os.environ)
            interp = interpreter.inspect_binary(elf, root=root, cache=False)
            out.update(_describe(interp, args.python, root))
            if interp.free_threaded:
                out["gil"] = "free-threaded build: the GIL is measurable when it runs with " \
                             "PYTHON_GIL=1 or enables it at run time (checked per process " \
                             "with --pid)"
            return _summary(args.python, interp, out["flavour"])
        target = process.inspect_process(args.pid)
        interp = interpreter.inspect_binary(target.object_path, root=target.root, cache=False)
        out.update(_describe(interp, _exe(args.pid), os.path.realpath(target.root)))
        out["object"] = procfs.outside_root(args.pid, target.object_path)
        out.update(pid=target.pid, nspid=list(target.nspid),
                   gil={"address": hex(target.gil.address), "enabled": target.gil.enabled,
                        "enabled_count": target.gil.enabled_count,
                        "state": process.gil_state(target.gil.enabled_count),
                        "interval_us": target.gil.interval_us, "found_by": target.gil.how},
                   release_probe={"path": procfs.outside_root(args.pid, target.cond_signal[0]),
                                  "address": hex(target.cond_signal[1])})
        out["holders_named_by"] = _holder_naming(target)
        process.require_gil(target)
        return _summary(f"pid {args.pid}", interp, out["flavour"])

    @staticmethod
    def _print(checks: List[Check], target: Optional[Dict[str, Any]], verdict: str) -> None:
        for c in checks:
            say(f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
            if not c.ok and c.remedy:
                say(f"       remedy: {c.remedy}")
        if target:
            for key, value in target.items():
                if key == "probes":
                    for name, desc in value.items():
                        _print_probe_set(name, desc)
                    continue
                if value != "":
                    say(f"  {key}: {value}")
        say(f"verdict: {verdict}")


def say(line: str) -> None:
    """A line of the report: names and paths in it come from the process and its files."""
    print(printable_text(line))


def _holder_naming(target: process.Target) -> str:
    """How the contended set names the thread holding the GIL, checked on the process."""
    from otel_gil.abi import events  # noqa: PLC0415
    from otel_gil.probes.holders import holder_tid_source  # noqa: PLC0415

    how, off, pthread = holder_tid_source(target)
    if how == events.GIL_TID_NATIVE:
        return f"PyThreadState native_thread_id at +{off} (checked on this process)"
    if how == events.GIL_TID_PTHREAD:
        return (f"PyThreadState thread_id at +{off}, then glibc's struct pthread tid at +{pthread} "
                "(checked on this process)")
    return ("unknown: no PyThreadState offset gives a thread id of this process; the "
            "contended set times waits but cannot name holders (use --probes all)")


def _print_probe_set(name: str, desc: Dict[str, Any]) -> None:
    if not desc["usable"]:
        say(f"  probes {name}: cannot be placed: {desc['why']}")
        return
    cost, most = (desc[k] / 1000 for k in ("per_uncontended_transition_ns",
                                           "per_uncontended_transition_max_ns"))
    dearer = f" (~{most:.2f} µs on a path through a single-stepped site)" if most > cost else ""
    say(f"  probes {name}: ~{cost:.2f} µs per uncontended GIL transition{dearer}, "
          f"~{desc['per_timed_wait_ns'] / 1000:.2f} µs per timed wait")
    for site in desc["sites"]:
        where = f"{site['address']} in {site['function']}" if site["address"] else site["function"]
        say(f"    {site['role']}: {where}, `{site['insn']}` ({site['handling']}, "
              f"~{site['cost_ns'] / 1000:.2f} µs per hit)")
    for note in desc["notes"]:
        say(f"    note: {note}")


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "?"  # it exited since: the check above already read what it needed


def _verdict(failed: List[Check]) -> str:
    if any(c.exit_code == GilDisabledError.exit_code for c in failed):
        return "GIL disabled: nothing to measure"
    if not failed:
        return "tracing would work"
    return f"tracing would NOT work ({', '.join(c.name for c in failed)})"


__all__ = ["DoctorCommand", "GilDisabledError"]
