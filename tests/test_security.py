"""A second local user gains nothing through otel-gil (docs/security.md).

Each attack runs as a real second user, `nobody`, through setpriv, against a real
root app and a real root sidecar with real probes: planted packages, a socket
directory made by someone else, a stranger joining a private sidecar, a
registration for another process, and a hostile context table.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from otlp_receiver import OtlpReceiver

from otel_gil import names, trust
from otel_gil.abi import slots
from otel_gil.app import protocol

ROOT = Path(__file__).resolve().parent.parent
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
STRANGER_PYTHON = "/usr/bin/python3"  # stdlib only, readable by nobody


def as_nobody(argv: List[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(NOBODY + argv, capture_output=True, text=True, timeout=60, **kw)


def _env(receiver: OtlpReceiver, **extra: str) -> Dict[str, str]:
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
               OTEL_EXPORTER_OTLP_INSECURE="true", OTEL_BSP_SCHEDULE_DELAY="200",
               OTEL_PYTHON_GIL_PROMETHEUS_PORT="0")
    env.update(extra)
    return env


# ------------------------------------------------------------------ unit tests


def test_registration_of_the_documented_shape_is_accepted() -> None:
    reg = protocol.parse_registration({"op": "register", "version": 1, "pid": 7,
                                       "ctx_table": 0x7F0000001000, "ctx_slots": 1024,
                                       "resource": {"service.name": "a", "n": [1, 2]}})
    assert (reg.pid, reg.ctx_table, reg.ctx_slots) == (7, 0x7F0000001000, 1024)
    assert reg.resource == {"service.name": "a", "n": [1, 2]}


@pytest.mark.parametrize("bad", [
    {"op": "trace", "pid": 1},
    {"op": "register", "pid": "1"},
    {"op": "register", "pid": True},
    {"op": "register", "ctx_table": "0x1000", "ctx_slots": 4},
    {"op": "register", "ctx_table": 4096, "ctx_slots": 1000},  # not a power of two
    {"op": "register", "ctx_table": 4096, "ctx_slots": 1 << 20},  # a 128 MB read per look
    {"op": "register", "ctx_table": 1 << 60, "ctx_slots": 4},  # not user space
    {"op": "register", "resource": ["service.name"]},
    {"op": "register", "resource": {"k": {"nested": 1}}},
    {"op": "register", "resource": {"k": [1, "mixed"]}},
    {"op": "register", "resource": {"k": "x" * 5000}},
    {"op": "register", "resource": {f"k{i}": i for i in range(500)}},
    {"op": "register", "resource": {"k": float("nan")}},
])
def test_a_malformed_registration_is_refused_with_a_reason(bad: Dict[str, Any]) -> None:
    with pytest.raises(protocol.BadRegistration) as err:
        protocol.parse_registration(bad)
    assert str(err.value)


def test_untrusted_reason_names_the_path_another_user_owns(tmp_path: Path) -> None:
    # GIVEN a directory owned by nobody inside a root-owned one
    mine = tmp_path / "planted"
    mine.mkdir()
    os.chown(mine, 65534, 65534)
    # THEN it and everything below it are untrusted, and the reason says why
    assert trust.untrusted_reason(str(mine)) == f"{mine} is owned by uid 65534"
    (mine / "x").touch()
    assert trust.untrusted_reason(str(mine / "x")) == f"{mine} is owned by uid 65534"
    # AND a root directory made group-writable is untrusted too; a root 0755 one is fine
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o775)
    assert "writable by group or others" in str(trust.untrusted_reason(str(loose)))
    os.chmod(loose, 0o755)
    assert trust.untrusted_reason(str(loose)) is None
    # AND a symlink is judged by its target
    link = tmp_path / "link"
    link.symlink_to(mine)
    assert "owned by uid 65534" in str(trust.untrusted_reason(str(link)))
    # AND /tmp itself may be on the way (sticky) but is no place to trust as such
    assert "writable by group or others" in str(trust.untrusted_reason("/tmp"))


def test_os_bcc_is_loaded_only_from_a_trusted_tree(tmp_path: Path) -> None:
    # GIVEN a fake "bcc" package that another user could have written
    fake = tmp_path / "bcc"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise SystemExit('planted code ran')\n")
    os.chown(fake / "__init__.py", 65534, 65534)
    # WHEN a fresh interpreter without bcc on its path is asked to load it
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'packages' not in p]; "
            "from otel_gil.trust import import_os_bcc; print(import_os_bcc(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(fake)], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=30)
    # THEN it refuses, naming the file, and the planted code never ran
    assert "planted code ran" not in out.stderr + out.stdout
    assert "not loading" in out.stdout and "owned by uid 65534" in out.stdout, out


def test_bench_compare_will_not_compile_a_baseline_another_user_wrote(tmp_path: Path) -> None:
    # GIVEN a copy of bpf/ in which another user owns the program's source
    src = tmp_path / "bpf"
    shutil.copytree(ROOT / "bpf", src)
    os.chown(src / "gil.bpf.c", 65534, 65534)
    # WHEN bench/compare.py is asked to compile it as its baseline setup
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"),
                          "--baseline-bpf", str(src), "--rounds", "1"], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    # THEN it refuses in one line, before compiling anything, with no traceback
    assert out.returncode == 2, out
    assert "gil.bpf.c is owned by uid 65534" in out.stderr, out
    assert "Traceback" not in out.stderr and out.stdout == "", out


def test_printable_turns_control_characters_into_question_marks() -> None:
    assert trust.printable("ok\x1b[31mred\nnext\x00") == "ok?[31mred?next?"


def test_printed_and_logged_messages_keep_their_lines_but_no_escape_sequences() -> None:
    import logging  # noqa: PLC0415

    from otel_gil.cli import PrintableFormatter  # noqa: PLC0415

    # GIVEN a message of two lines quoting a hostile service name
    name = "\x1b[2J\x1b]0;pwn\x07"
    assert trust.printable_text(f"service {name}\nnext line") == "service ?[2J?]0;pwn?\nnext line"
    # WHEN the CLI's log formatter formats it THEN the lines stay, the escapes go
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "registered %s\nok", (name,), None)
    assert PrintableFormatter("%(message)s").format(record) == "registered ?[2J?]0;pwn?\nok"
    assert trust.printable("Thread-1 (worker)") == "Thread-1 (worker)"


# ------------------------------------------------------------- as a second user


@pytest.fixture
def venv_without_bcc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv like the project's, whose site-packages lacks bcc: the normal case for
    a user's own venv. Made of symlinks into .venv (no download)."""
    base = tmp_path_factory.mktemp("venv")
    venv = base / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    ours = Path(next(p for p in sys.path if p.endswith("site-packages")))
    theirs = venv / ours.relative_to(Path(sys.prefix))
    for entry in ours.iterdir():
        if entry.name != "bcc":
            (theirs / entry.name).symlink_to(entry)
    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import importlib.util, otel_gil; "
                            "print(importlib.util.find_spec('bcc'))"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "None", probe
    return venv


PLANT = "import os\nopen({marker!r}, 'w').write('planted code ran as uid %d' % os.geteuid())\n"

APP = """
import json, os, sys, threading, time
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
import otel_gil
provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)
otel_gil.instrument()
live = otel_gil.wait_until_live(60)
print(json.dumps({"live": live, "pid": os.getpid(), "status": otel_gil.status()}), flush=True)
tracer = trace.get_tracer("app")
def spin(seconds):
    end = time.time() + seconds
    while time.time() < end:
        with tracer.start_as_current_span("work"):
            sum(range(20000))
hold = float(sys.argv[1]) if len(sys.argv) > 1 else 1.5
ts = [threading.Thread(target=spin, args=(hold,)) for _ in range(3)]
[t.start() for t in ts]
[t.join() for t in ts]
provider.shutdown()
print(json.dumps({"done": True}), flush=True)
"""


@pytest.fixture
def marker() -> Iterator[Path]:
    path = Path(f"/tmp/otel-gil-planted-{secrets.token_hex(4)}")
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.ebpf
def test_planted_bcc_and_otel_gil_packages_are_never_imported(
        venv_without_bcc: Path, marker: Path, tmp_path: Path) -> None:
    # GIVEN nobody plants a `bcc` package where the old agent looked for one
    # (<tmp>/otel-gil-bcc-0), and `bcc` and `otel_gil` packages in a directory of
    # theirs that a root app then runs in
    shim = Path("/tmp/otel-gil-bcc-0")
    if shim.exists() or shim.is_symlink():
        shutil.rmtree(shim) if shim.is_dir() and not shim.is_symlink() else shim.unlink()
    workdir = Path(f"/tmp/otel-gil-cwd-{secrets.token_hex(4)}")
    plant = PLANT.format(marker=str(marker))
    script = (f"import os\nfor d in ({str(shim / 'bcc')!r}, {str(workdir / 'bcc')!r}, "
              f"{str(workdir / 'otel_gil')!r}):\n"
              "    os.makedirs(d)\n"
              f"    open(os.path.join(d, '__init__.py'), 'w').write({plant!r})\n")
    planted = as_nobody([STRANGER_PYTHON, "-c", script])
    assert planted.returncode == 0, planted.stderr
    app = tmp_path / "app.py"
    app.write_text(APP)
    try:
        with OtlpReceiver() as receiver:
            # WHEN root runs an instrumented app from a venv without bcc, in that directory
            run = subprocess.run([str(venv_without_bcc / "bin" / "python"), str(app)],
                                 cwd=workdir, env=_env(receiver), capture_output=True,
                                 text=True, timeout=120)
        # THEN the app was traced (the real bcc was found) and no planted code ran
        assert run.returncode == 0, run.stderr
        started = json.loads(run.stdout.splitlines()[0])
        assert started["live"] is True, (started, run.stderr)
        assert not marker.exists(), marker.read_text()
    finally:
        shutil.rmtree(shim, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.ebpf
def test_sidecar_will_not_listen_in_a_directory_another_user_made() -> None:
    # GIVEN nobody pre-creates the socket's directory (e.g. under /tmp)
    directory = Path(f"/tmp/otel-gil-sock-{secrets.token_hex(4)}")
    made = as_nobody([STRANGER_PYTHON, "-c", f"import os; os.mkdir({str(directory)!r}, 0o777)"])
    assert made.returncode == 0, made.stderr
    try:
        # WHEN root starts a sidecar listening there
        run = subprocess.run([sys.executable, "-m", "otel_gil", "sidecar", "--listen",
                              str(directory / "s.sock"), "--prometheus-port", "0"],
                             capture_output=True, text=True, timeout=60)
        # THEN it refuses in one line, with the reason and the remedy, exit 5
        assert run.returncode == 5, run
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
        assert "will not listen" in lines[0] and "owned by uid 65534" in lines[0]
        assert not (directory / "s.sock").exists()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.ebpf
def test_sidecar_does_not_replace_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    # GIVEN a regular file where the socket should go
    victim = tmp_path / "important"
    victim.write_text("keep me")
    # WHEN a sidecar is told to listen there
    run = subprocess.run([sys.executable, "-m", "otel_gil", "sidecar", "--listen", str(victim),
                          "--prometheus-port", "0"], capture_output=True, text=True, timeout=60)
    # THEN it refuses and the file is untouched
    assert run.returncode == 5 and "cannot listen" in run.stderr, run
    assert victim.read_text() == "keep me"


@pytest.fixture
def node_sidecar() -> Iterator[Any]:
    """A long-running root sidecar on a path socket any local user may reach."""
    directory = Path(f"/run/otel-gil-test-{secrets.token_hex(4)}")
    directory.mkdir(mode=0o755)
    sock = directory / "s.sock"
    with OtlpReceiver() as receiver:
        proc = subprocess.Popen([sys.executable, "-m", "otel_gil", "sidecar", "--listen",
                                 str(sock)], env=_env(receiver), stderr=subprocess.PIPE,
                                text=True)
        assert proc.stderr is not None
        assert "listening" in proc.stderr.readline()
        try:
            yield sock, receiver, proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            shutil.rmtree(directory, ignore_errors=True)


def _stderr_after_stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    return str(err)


REGISTER_OTHER = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(json.dumps({"op": "register", "version": 1, "pid": int(sys.argv[2])}).encode() + b"\\n")
print(s.recv(4096).decode().strip())
"""


@pytest.mark.ebpf
def test_a_second_user_cannot_have_another_process_traced(node_sidecar: Any) -> None:
    sock, _, proc = node_sidecar
    # GIVEN a root process, and nobody connected to the shared sidecar
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # WHEN nobody asks for the root process to be traced
        out = as_nobody([STRANGER_PYTHON, "-c", REGISTER_OTHER, str(sock), str(victim.pid)])
        reply = json.loads(out.stdout)
        # THEN the sidecar refuses, and says why
        assert reply["ok"] is False and "only ask for itself" in reply["error"], reply
    finally:
        victim.kill()
        victim.wait()
    err = _stderr_after_stop(proc)
    assert err.count("refused pid") == 1, err


STRANGER_JOINS = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\\0" + sys.argv[1][1:])
s.sendall(json.dumps({"op": "register", "version": 1, "resource": {"service.name": "victim"}}
                     ).encode() + b"\\n")
print(s.recv(4096).decode().strip())
"""


def _abstract_listener(pid: int) -> str:
    prefix = f"@otel-gil-{pid}-"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open("/proc/net/unix") as f:
            for line in f:
                name = line.split()[-1]
                if name.startswith(prefix):
                    return name
        time.sleep(0.1)
    raise AssertionError(f"no {prefix}* socket")


@pytest.mark.ebpf
def test_a_stranger_cannot_join_an_apps_private_sidecar(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(APP)
    with OtlpReceiver() as receiver:
        # GIVEN a root app with its private sidecar, on an abstract socket anyone can reach
        proc = subprocess.Popen([sys.executable, str(app), "4"], env=_env(receiver),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        assert started["live"] is True, started
        name = _abstract_listener(started["pid"])
        # WHEN nobody registers itself with it, claiming the app's service
        out = as_nobody([STRANGER_PYTHON, "-c", STRANGER_JOINS, name])
        reply = json.loads(out.stdout)
        # THEN it is refused; the app goes on being traced and exits normally
        assert reply["ok"] is False and "children only" in reply["error"], reply
        rest, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(rest.splitlines()[-1]) == {"done": True}
        assert err.count("refused pid") == 1, err
        receiver.wait_for_spans(lambda spans: any(s.name == names.GIL_WAIT.name
                                                  for s in spans), timeout=30)


HOSTILE = """
import ctypes, json, mmap, os, random, socket, struct, sys, threading, time
header, sock_path, slots = bytes.fromhex(sys.argv[1]), sys.argv[2], int(sys.argv[3])
size = -(-(64 + slots * 128) // mmap.PAGESIZE) * mmap.PAGESIZE
mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
holder = ctypes.c_char.from_buffer(mm)
address = ctypes.addressof(holder)
mm[0:len(header)] = header
def slot(tid, name):
    # a slot whose name entry claims 255 bytes, with terminal escapes, then garbage
    head = struct.pack("<IIQ16s8sBBH", tid, 0, 1, os.urandom(16), os.urandom(8), 1, 1, 60000)
    return head + bytes((0, 255)) + name + os.urandom(128 - len(head) - 2 - len(name))
def scribble(stop):
    # the table changes under the sidecar's reads: random slots, a header that lies
    while not stop.is_set():
        i = random.randrange(slots)
        mm[64 + i * 128:64 + (i + 1) * 128] = os.urandom(128)
        if random.random() < 0.2:
            mm[12:16] = struct.pack("<I", random.choice([1 << 20, 0, 3, slots]))
        else:
            mm[0:len(header)] = header
        time.sleep(0.0005)
def spin(seconds):
    tid = threading.get_native_id()
    off = 64 + (tid & (slots - 1)) * 128
    mm[off:off + 128] = slot(tid, b"evil\\x1b[2J\\x1b]0;owned\\x07")
    end = time.time() + seconds
    while time.time() < end:
        sum(range(2000))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock_path)
s.sendall(json.dumps({"op": "register", "version": 1, "pid": os.getpid(), "ctx_table": address,
                      "ctx_slots": slots, "resource": {"service.name": "hostile"}}).encode()
          + b"\\n")
print(s.recv(4096).decode().strip(), flush=True)
stop = threading.Event()
threads = [threading.Thread(target=spin, args=(3,)) for _ in range(3)]
threads.append(threading.Thread(target=scribble, args=(stop,)))
[t.start() for t in threads]
[t.join() for t in threads[:3]]
stop.set()
"""


@pytest.mark.ebpf
def test_a_hostile_context_table_is_contained(node_sidecar: Any, tmp_path: Path) -> None:
    sock, receiver, proc = node_sidecar
    header = slots.HEADER.pack(slots.MAGIC, slots.VERSION, 1024, slots.SLOT_SIZE,
                               slots.HEADER_SIZE)
    # GIVEN nobody registers itself with a table that lies and changes while read
    out = as_nobody([STRANGER_PYTHON, "-c", HOSTILE, header.hex(), str(sock), "1024"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[0])["ok"] is True, out.stdout
    # WHEN a legitimate app registers afterwards
    app = tmp_path / "app.py"
    app.write_text(APP)
    run = subprocess.run([sys.executable, str(app)], capture_output=True, text=True, timeout=120,
                         env=_env(receiver, OTEL_PYTHON_GIL_MODE="connect",
                                  OTEL_PYTHON_GIL_SOCKET=str(sock), OTEL_SERVICE_NAME="legit"))
    # THEN the sidecar survived and traces it
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[0])["live"] is True, run.stdout
    assert proc.poll() is None
    receiver.wait_for_spans(lambda spans: any(
        s.name == names.GIL_WAIT.name and s.resource.get("service.name") == "legit"
        for s in spans), timeout=30)
    # AND no name the hostile process wrote reaches a span unescaped
    for span in receiver.spans():
        name = str(span.attributes.get(names.THREAD_NAME.name, ""))
        assert "\x1b" not in name and "\x07" not in name, name
    # AND the sidecar said what was wrong in at most one line for that process
    err = _stderr_after_stop(proc)
    assert "Traceback" not in err, err
    assert sum("context table" in line for line in err.splitlines()) <= 1, err
