"""Options: keyword arguments win over the environment; bad values are named."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from otel_gil import config
from otel_gil.app import agent
from otel_gil.probes.config import PROBE_SETS


def test_defaults_environment_and_keywords() -> None:
    assert config.load({}, {}) == config.Options()
    env = {"OTEL_PYTHON_GIL_MODE": "connect", "OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS": "2.5"}
    opts = config.load({}, env)
    assert (opts.mode, opts.wait_threshold_ms) == ("connect", 2.5)
    # GIVEN both WHEN loaded THEN the keyword wins
    assert config.load({"mode": "spawn"}, env).mode == "spawn"


@pytest.mark.parametrize("overrides, env, message", [
    ({"mode": "sometimes"}, {}, "OTEL_PYTHON_GIL_MODE='sometimes'"),
    ({}, {"OTEL_PYTHON_GIL_PROMETHEUS_PORT": "ninety"}, "OTEL_PYTHON_GIL_PROMETHEUS_PORT"),
    ({}, {"OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS": "-1"}, "must not be negative"),
    ({"colour": "blue"}, {}, "unknown option(s): colour"),
    ({}, {"OTEL_PYTHON_GIL_PROBES": "some"}, "OTEL_PYTHON_GIL_PROBES='some': use one of "
                                             "contended, all"),
])
def test_bad_values_are_named(overrides: dict, env: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        config.load(overrides, env)
    assert message in str(err.value)


def test_instrument_with_bad_option_warns_once_and_never_raises() -> None:
    code = ("import logging, otel_gil; logging.basicConfig(); "
            "otel_gil.instrument(mode='sometimes'); print('ran', otel_gil.status())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == "ran not instrumented"
    assert proc.stderr.count("GIL tracing off") == 1
    assert "OTEL_PYTHON_GIL_MODE='sometimes'" in proc.stderr


def test_a_bad_variable_is_one_line_from_every_command() -> None:
    import subprocess
    import sys

    # GIVEN a malformed OTEL_PYTHON_GIL_* variable WHEN any otel-gil command starts
    env = dict(os.environ, OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS="abc")
    run = subprocess.run([sys.executable, "-m", "otel_gil", "doctor"], env=env,
                         capture_output=True, text=True, timeout=60)
    # THEN it names the variable in one line and exits 2, with no traceback
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "otel-gil: error: OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS='abc' is not a valid "
        "wait_threshold_ms (fix or unset that variable)"]


def test_probe_set_reaches_a_spawned_sidecar() -> None:
    # GIVEN the default, the environment, and a keyword
    assert config.load({}, {}).probes == "contended"
    assert config.load({}, {"OTEL_PYTHON_GIL_PROBES": "all"}).probes == "all"
    opts = config.load({"probes": "contended"}, {"OTEL_PYTHON_GIL_PROBES": "all"})
    # WHEN the sidecar command is built THEN it carries the set the keyword chose
    cmd = agent.sidecar_command(opts, 3, 4)
    assert cmd[cmd.index("--probes") + 1] == "contended"
    assert config.PROBE_SETS == PROBE_SETS  # the app side's copy, without bcc
