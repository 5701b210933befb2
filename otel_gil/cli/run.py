"""`otel-gil run -- COMMAND ...`: start a Python program, trace it from start-up
to exit like `record`, and exit with its status."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import List, Optional

from otel_gil.cli.base import Command, require_root
from otel_gil.cli.common import add_probe_options, announce, follow, probe_config, write_record
from otel_gil.cli.views import add_view_options, view_files
from otel_gil.errors import OtelGilError, TargetError, TargetGone, TargetNotReady
from otel_gil.probes.config import program_text
from otel_gil.probes.session import Session
from otel_gil.target import interpreter, paths, process
from otel_gil.target.process import Target

SI_KERNEL = 0x80  # si_code of a signal the kernel raised itself, e.g. the tty's Ctrl-C
FORWARDED = (signal.SIGINT, signal.SIGTERM)

HELP = """\
start COMMAND (a Python program), trace its GIL from interpreter start-up until it
exits, print the per-thread table, and exit with its status. Tracing starts once
the interpreter has created its GIL and the probes are attached: the first
milliseconds of start-up (up to a few tens on a busy machine, so possibly the
program's first imports) are not traced. SIGINT and SIGTERM are passed on to
COMMAND; only COMMAND itself is traced, not programs it starts."""


class _Forwarder:
    """Passes SIGINT/SIGTERM on to the child, once.

    The signals are blocked and collected with sigtimedwait, whose siginfo says
    who sent them: a Ctrl-C from the terminal (si_code SI_KERNEL) already
    reached the child if it shares our process group, so it is not sent twice.
    """

    def __init__(self) -> None:
        self.pid: Optional[int] = None
        for sig in FORWARDED:  # until blocked (and in other threads): never raise
            signal.signal(sig, self._handler)

    def start(self, pid: int) -> None:
        """Called once the child runs: from now on signals wait for poll()."""
        self.pid = pid
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:
        self._send(signum, from_kernel=False)

    def poll(self) -> bool:
        """Forward what arrived; always False (tracing stops when the child exits)."""
        while True:
            info = signal.sigtimedwait(FORWARDED, 0)
            if info is None:
                return False
            self._send(info.si_signo, from_kernel=info.si_code == SI_KERNEL)

    def _send(self, signum: int, from_kernel: bool) -> None:
        if self.pid is None:
            return
        try:
            if from_kernel and os.getpgid(self.pid) == os.getpgrp():
                return  # the terminal sent it to the whole foreground group
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass  # it has just exited

    def close(self) -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)


def _command(argv: List[str]) -> List[str]:
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        raise OtelGilError("no command to run",
                           "give the program after --, e.g. otel-gil run -- python app.py")
    if shutil.which(command[0]) is None:
        raise TargetError(f"cannot run {command[0]}: not found, or not executable",
                          "give a program on PATH, or its path")
    return command


def _start(command: List[str]) -> "subprocess.Popen[bytes]":
    try:
        return subprocess.Popen(command)
    except OSError as exc:
        raise TargetError(f"cannot run {command[0]}: {exc.strerror}",
                          "give a program on PATH, or its path") from None


def _warm_caches(command: List[str]) -> None:
    """Read now what attaching will need, so that it happens as early as it can:
    libc's pthread_cond_signal (through our own process, which uses the same
    libc) and, when COMMAND names an interpreter, its symbols (both cached by
    discovery). Anything not found here is simply read at attach time."""
    exe = shutil.which(command[0])
    try:
        process.inspect_process(os.getpid())
        if exe is not None:
            elf, root = paths.interpreter_object(exe, os.environ)
            interpreter.inspect_binary(elf, root=root)
    except OtelGilError:
        pass


def _attach(session: Session, child: "subprocess.Popen[bytes]",
            forwarder: _Forwarder) -> Optional[Target]:
    """Poll until the interpreter is up, then attach; None if the child exited first.
    Polls every 1 ms at first (start-up takes tens of ms), backing off to 50 ms.

    Popen returns once the child's exec has happened (it waits for its
    close-on-exec error pipe), so what is inspected is the new program, never
    our own forked copy; but it may still be mapping itself (TargetNotReady),
    and it may exit at any moment: then it stays a zombie, its /proc entries
    failing, until child.poll() reaps it (TargetGone)."""
    pause = 0.001
    warn_at = time.monotonic() + 10
    while child.poll() is None:
        try:
            return session.add(child.pid)
        except (TargetNotReady, TargetGone) as err:
            if time.monotonic() > warn_at and child.poll() is None:
                warn_at = float("inf")
                print(f"otel-gil: pid {child.pid} is not a running Python interpreter yet "
                      f"({err}); still waiting", file=sys.stderr, flush=True)
        except OtelGilError:
            if child.poll() is not None:
                break  # it exited, and that is what made attaching fail
            raise
        forwarder.poll()
        time.sleep(pause)
        pause = min(pause * 1.5, 0.05)
    return None


def _status(returncode: int) -> int:
    """The child's exit status as a shell reports it: 128+N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class RunCommand(Command):
    name = "run"
    help = HELP

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.usage = "otel-gil run [options] [--output FILE] -- COMMAND [ARG ...]"
        add_probe_options(parser, pids=False)
        parser.add_argument("--output", "-o", default=None,
                            help="write the full record as JSON here (docs/record-json.md)")
        add_view_options(parser)
        parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                            help="the program to start and trace, after --")

    def run(self, args: argparse.Namespace) -> int:
        if args.dump_bpf:
            print(program_text(probe_config(args)))
            return 0
        command = _command(args.command)
        require_root()
        # Compile and load the probes first: attaching must be quick once the child runs.
        session = Session(probe_config(args))
        _warm_caches(command)
        forwarder = _Forwarder()
        try:
            child = _start(command)
            forwarder.start(child.pid)
            try:
                target = _attach(session, child, forwarder)
            except OtelGilError:
                _stop(child)
                raise
            if target is None:
                print(f"otel-gil: pid {child.pid} ({command[0]}) exited before a Python "
                      "interpreter was up in it: nothing traced", file=sys.stderr)
            else:
                announce(target, "until it exits", session.probe_set)
                follow(session, forwarder.poll)
            while child.poll() is None:  # detached early only if the pid was reused
                forwarder.poll()
                time.sleep(0.05)
        finally:
            session.close()
            forwarder.close()
        if target is not None:
            write_record(session, args.output, view_files(args))
        return _status(child.returncode)


def _stop(child: "subprocess.Popen[bytes]") -> None:
    """End a child that cannot be traced: SIGTERM, then SIGKILL after 5 s."""
    child.terminate()
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
