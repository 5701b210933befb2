"""What the traced app loads: `import otel_gil; otel_gil.instrument()` brings in
the app side only (otel_gil/app/, otel_gil/abi/ and the top-level modules),
never the sidecar's heavy or privileged dependencies, whatever the sidecar does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List

import pytest

# Sidecar-side packages and their third-party dependencies.
FORBIDDEN = ("bcc", "elftools", "capstone", "grpc", "otel_gil.probes", "otel_gil.target",
             "otel_gil.sidecar", "otel_gil.export", "otel_gil.dev", "otel_gil.cli",
             "otel_gil.views")

APP = """
import json, sys
import otel_gil
after_import = sorted(sys.modules)
otel_gil.instrument()
live = otel_gil.wait_until_live(float(sys.argv[1]))
print(json.dumps({"import": after_import, "instrument": sorted(sys.modules), "live": live,
                  "status": otel_gil.status()}))
otel_gil.uninstrument()
"""


def _run_app(env: Dict[str, str], wait_s: float) -> Dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", APP, str(wait_s)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    out: Dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return out


def _forbidden(loaded: List[str]) -> List[str]:
    return [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def test_instrument_without_a_sidecar_loads_the_app_side_only() -> None:
    # GIVEN an app told to connect to a sidecar that is not there (no root, no eBPF)
    env = {"OTEL_PYTHON_GIL_MODE": "connect",
           "OTEL_PYTHON_GIL_SOCKET": "/nonexistent/otel-gil-test.sock"}
    # WHEN it imports otel_gil and calls instrument(), and the agent gives up
    out = _run_app(env, 5.0)
    # THEN it is not live, and neither the import nor instrument() loaded a
    # sidecar-side module, while the app side itself was loaded
    assert out["live"] is False
    assert _forbidden(out["import"]) == []  # type: ignore[arg-type]
    assert _forbidden(out["instrument"]) == []  # type: ignore[arg-type]
    assert {"otel_gil.app.agent", "otel_gil.app.context", "otel_gil.abi.slots"} <= \
        set(out["instrument"])  # type: ignore[arg-type]


@pytest.mark.ebpf
def test_instrument_with_its_own_sidecar_loads_the_app_side_only() -> None:
    # GIVEN an app that spawns its private sidecar (which loads bcc, in its own process)
    # WHEN it is traced live
    out = _run_app({"OTEL_PYTHON_GIL_MODE": "spawn"}, 90.0)
    # THEN the app process itself never loaded a sidecar-side module
    assert out["live"] is True, out["status"]
    assert _forbidden(out["instrument"]) == []  # type: ignore[arg-type]
