"""otel_gil.context: the context table and the process context, read from outside.

The integration tests run a real child interpreter that installs the hook and
makes spans on two threads; this process reads the child's table through
/proc/CHILD/mem, exactly as the sidecar does, at each step of the child's life.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2

from otel_gil import context as oc
from otel_gil import process_context as pc

CHILD = textwrap.dedent('''
    import json, os, sys, threading
    from opentelemetry import context, trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    from otel_gil import context as oc
    from otel_gil import process_context as pc

    def say(**kw):
        print(json.dumps(kw), flush=True)
        assert sys.stdin.readline().strip() == "next"

    original = context._RUNTIME_CONTEXT
    sampled = TracerProvider().get_tracer("test")
    unsampled = TracerProvider(sampler=ALWAYS_OFF).get_tracer("test")
    table = oc.install()
    oc.install()  # twice: harmless
    pc.publish_process_context(Resource.create({"service.name": "ctx-test-app"}))
    steps = [threading.Barrier(3) for _ in range(4)]
    info = {}

    def ids(span):
        sc = span.get_span_context()
        return {"trace_id": f"{sc.trace_id:032x}", "span_id": f"{sc.span_id:016x}",
                "flags": int(sc.trace_flags)}

    def work(tracer, key):
        me = {"tid": threading.get_native_id(), "ident": threading.get_ident()}
        with tracer.start_as_current_span("outer") as outer:
            with tracer.start_as_current_span("inner") as inner:
                me["outer"], me["inner"] = ids(outer), ids(inner)
                info[key] = me
                steps[0].wait()
                steps[1].wait()
            steps[2].wait()
            steps[3].wait()

    threads = [threading.Thread(target=work, args=(sampled, "a"), name="worker-a"),
               threading.Thread(target=work, args=(unsampled, "b"), name="worker-b")]
    for t in threads:
        t.start()
    steps[0].wait()
    say(stage="inner", pid=os.getpid(), table=table.address, threads=info,
        main_tid=threading.get_native_id(), wrapped=context._RUNTIME_CONTEXT is not original)
    steps[1].wait()
    steps[2].wait()
    say(stage="outer")
    steps[3].wait()
    for t in threads:
        t.join()
    say(stage="exited", unplaced=table.unplaced, errors=table.errors)
    oc.uninstall()
    with sampled.start_as_current_span("after-uninstall"):
        say(stage="uninstalled", restored=context._RUNTIME_CONTEXT is original)
''')


class Child:
    def __init__(self, script: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"child exited early with {self.proc.wait()}"
        return json.loads(line)  # type: ignore[no-any-return]

    def next(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("next\n")
        self.proc.stdin.flush()


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Child]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = Child(script)
    yield proc
    proc.proc.kill()
    proc.proc.wait()


def by_tid(pid: int, table: int) -> dict[int, oc.SlotRecord]:
    return {record.tid: record for record in oc.read_slots(pid, table)}


def assert_holds(record: oc.SlotRecord, ids: dict[str, Any]) -> None:
    assert record.valid == 1
    assert record.trace_id.hex() == ids["trace_id"]
    assert record.span_id.hex() == ids["span_id"]
    assert record.trace_flags == ids["flags"]


def test_each_thread_slot_follows_its_own_span(child: Child) -> None:
    # GIVEN a child with the hook installed and two threads inside nested spans
    # (worker-a sampled, worker-b under an ALWAYS_OFF sampler)
    first = child.read()
    pid, table, threads = first["pid"], first["table"], first["threads"]
    a, b = threads["a"], threads["b"]
    assert first["wrapped"] is True

    # WHEN this process reads the child's table while both are in their inner span
    slots = by_tid(pid, table)
    # THEN each thread's slot holds exactly its inner span, flags included
    assert set(slots) == {first["main_tid"], a["tid"], b["tid"]}
    assert_holds(slots[a["tid"]], a["inner"])
    assert_holds(slots[b["tid"]], b["inner"])
    # the sampled bit (0x01) differs; the SDK may also set W3C level 2's random bit (0x02)
    assert slots[a["tid"]].trace_flags & 1 == 1
    assert slots[b["tid"]].trace_flags & 1 == 0
    assert slots[a["tid"]].ident == a["ident"] and slots[b["tid"]].ident == b["ident"]
    assert slots[a["tid"]].thread_name == "worker-a"
    assert oc.read_thread_names(pid, table)[b["tid"]] == (b["ident"], "worker-b")
    # the main thread has no span: its slot says so
    assert slots[first["main_tid"]].valid == 0
    assert slots[first["main_tid"]].thread_name == "MainThread"

    # WHEN the inner spans end
    child.next()
    assert child.read()["stage"] == "outer"
    slots = by_tid(pid, table)
    # THEN each slot holds the parent (outer) span
    assert_holds(slots[a["tid"]], a["outer"])
    assert_holds(slots[b["tid"]], b["outer"])

    # WHEN the threads leave every span and exit
    child.next()
    exited = child.read()
    # THEN their slots are freed (keeping the names, for holders named later),
    # and nothing was unplaced or failed
    slots = by_tid(pid, table)
    assert {t for t, r in slots.items() if not r.exited} == {first["main_tid"]}
    assert slots[a["tid"]].exited and slots[a["tid"]].thread_name == "worker-a"
    assert slots[a["tid"]].valid == 0
    assert exited["unplaced"] == 0 and exited["errors"] == 0

    # WHEN the hook is uninstalled and a new span starts on the main thread
    child.next()
    last = child.read()
    # THEN the original runtime context is back and the slot is not written any more
    assert last["restored"] is True
    assert by_tid(pid, table)[first["main_tid"]].valid == 0


def test_process_context_carries_the_resource(child: Child) -> None:
    # GIVEN a child that published its Resource (service.name=ctx-test-app)
    pid = child.read()["pid"]
    # WHEN the sidecar side reads it through /proc/PID/maps and /proc/PID/mem
    resource = pc.read_process_context(pid)
    # THEN it finds the child's own resource
    assert resource["service.name"] == "ctx-test-app"
    assert resource["telemetry.sdk.language"] == "python"
    # and the mapping is the memfd OTEP 4719 names
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "/memfd:OTEL_CTX" in maps


def test_table_mapping_named_when_kernel_allows(child: Child) -> None:
    # GIVEN a child with the table installed
    first = child.read()
    pid, table = first["pid"], first["table"]
    # WHEN we look for the table's line in its maps
    line = next(line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                if int(line.split("-")[0], 16) <= table < int(line.split()[0].split("-")[1], 16))
    # THEN it carries the name exactly when this kernel supports anonymous VMA names
    # (CONFIG_ANON_VMA_NAME; probed with the same prctl on a scratch mapping)
    import mmap

    scratch = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
    supported = oc.name_mapping(oc.buffer_address(scratch), mmap.PAGESIZE, b"probe")
    assert ("[anon:otel-gil-ctx]" in line) == supported
    assert table % mmap.PAGESIZE == 0
    if supported:  # a named mapping is not merged with its anonymous neighbours
        assert int(line.split("-")[0], 16) == table


FORK_CHILD = textwrap.dedent('''
    import json, os, threading
    from opentelemetry.sdk.trace import TracerProvider
    from otel_gil import context as oc
    table = oc.install()
    with TracerProvider().get_tracer("t").start_as_current_span("s") as span:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            slots = oc.read_slots(os.getpid(), table.address)
            os.write(w, json.dumps([[s.tid, s.span_id.hex()] for s in slots]).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        forked = json.loads(os.read(r, 65536))
        mine = [[s.tid, s.span_id.hex()] for s in oc.read_slots(os.getpid(), table.address)]
        print(json.dumps({"forked": forked, "forked_pid": pid, "mine": mine,
                          "tid": threading.get_native_id(),
                          "span": f"{span.get_span_context().span_id:016x}"}))
''')


def test_forked_child_gets_its_own_table(tmp_path: Path) -> None:
    # GIVEN a process with the hook installed, inside a span, that forks
    script = tmp_path / "fork.py"
    script.write_text(FORK_CHILD)
    # WHEN both read their own table
    out = json.loads(subprocess.run([sys.executable, str(script)], check=True,
                                    capture_output=True, text=True).stdout)
    # THEN the forked child's table holds only its own thread (tid = its pid),
    # still in the inherited span; the parent's table is untouched by the child
    assert out["forked"] == [[out["forked_pid"], out["span"]]]
    assert out["mine"] == [[out["tid"], out["span"]]]


def test_slot_collisions_count_unplaced_threads() -> None:
    # GIVEN a 8-slot table (PROBES=4) and five threads whose ids share candidates
    table = oc.ContextTable(slots=8)
    leases = [table.claim(tid, tid * 10, f"t{tid}") for tid in (8, 16, 24, 32)]
    # WHEN a fifth claims
    fifth = table.claim(40, 400, "t40")
    # THEN the first four got slots 0..3 in order, the fifth none, and it is counted
    assert [lease.index for lease in leases if lease is not None] == [0, 1, 2, 3]
    assert fifth is None and table.unplaced == 1
    # WHEN one of them goes away, its slot becomes free for the fifth
    del leases[1]
    again = table.claim(40, 400, "t40")
    assert again is not None and again.index == 1
    assert {r.tid: r.ident for r in oc.parse_slots(table.raw())} == {
        8: 80, 24: 240, 32: 320, 40: 400}


def test_long_thread_name_is_truncated_on_a_character_boundary() -> None:
    # GIVEN a name longer than the slot's attribute space, ending in 3-byte characters
    table = oc.ContextTable(slots=4)
    name = "x" * 81 + "€€"
    # WHEN a thread with that name claims a slot
    lease = table.claim(5, 6, name)
    # THEN the stored name is the longest prefix that fits (82 bytes), no broken char
    assert lease is not None
    (record,) = oc.parse_slots(table.raw())
    assert record.thread_name == "x" * 81


def _process_context_class() -> Any:
    """ProcessContext{Resource resource = 1} built on opentelemetry-proto's Resource."""
    pool = descriptor_pool.Default()
    try:
        return message_factory.GetMessageClass(
            pool.FindMessageTypeByName("otelgiltest.ProcessContext"))
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto(
        name="otelgiltest/process_context.proto", package="otelgiltest", syntax="proto3",
        dependency=[resource_pb2.DESCRIPTOR.name])
    message = proto.message_type.add(name="ProcessContext")
    message.field.add(name="resource", number=1,
                      type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                      type_name=".opentelemetry.proto.resource.v1.Resource")
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("otelgiltest.ProcessContext"))


def _plain(value: common_pb2.AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_plain(v) for v in value.array_value.values]
    return getattr(value, kind)


def test_process_context_payload_decodes_with_opentelemetry_proto() -> None:
    # GIVEN attributes of every supported kind, including edge values
    attributes: dict[str, object] = {
        "service.name": "checkout", "empty": "", "unicode": "żółw",
        "zero": 0, "negative": -5, "big": 2**63 - 1, "float": 1.25, "yes": True, "no": False,
        "list": ["a", "b"], "ints": [1, -2],
    }
    # WHEN our hand encoder writes them and protobuf itself decodes the bytes
    message = _process_context_class().FromString(pc.encode_process_context(attributes))
    decoded: list[Any] = [(kv.key, _plain(kv.value)) for kv in message.resource.attributes]
    # THEN protobuf sees exactly the same keys, order and values
    assert decoded == list(attributes.items())
    # and our own reader agrees
    assert pc.decode_process_context(pc.encode_process_context(attributes)) == attributes


SPANS_NOT_KEPT = r"""
import gc, json, weakref
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from otel_gil import context
trace.set_tracer_provider(TracerProvider())
context.install(); context.watch_span_ends(None)
tracer = trace.get_tracer("t")
refs = []
for _ in range(50):
    with tracer.start_as_current_span("s") as span:
        refs.append(weakref.ref(span))
    del span
# a span id reused by a new span must not hit the dead span's cache entry
with tracer.start_as_current_span("last") as last:
    record = bytes(context._tls.view[:26])
    ids = last.get_span_context()
    want = context._ids_record(ids.trace_id, ids.span_id, int(ids.trace_flags))
print(json.dumps({"alive": sum(r() is not None for r in refs), "right_record": record == want}))
"""


def test_published_spans_are_not_kept_alive() -> None:
    # GIVEN the hook installed WHEN 50 spans are entered, left and dropped
    out = json.loads(subprocess.run([sys.executable, "-c", SPANS_NOT_KEPT], check=True,
                                    capture_output=True, text=True).stdout)
    # THEN the publishing cache kept none of them alive (kept spans cost the
    # app GC work: bench/span_cost.py)
    assert out["alive"] == 0
    # AND a new span, maybe at a dead one's address, publishes its own ids
    assert out["right_record"]
