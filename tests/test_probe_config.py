"""One default per probe setting: the loader's ProbeConfig, the C program's
fallbacks (bpf/gil.bpf.c, for compiling it on its own) and the user-facing
Options agree."""

from __future__ import annotations

import re
from typing import Dict

import pytest

from otel_gil import config
from otel_gil.probes.config import ProbeConfig, bpf_dir


def _c_defaults() -> Dict[str, str]:
    """NAME -> value of every `#ifndef NAME / #define NAME value` in gil.bpf.c."""
    text = (bpf_dir() / "gil.bpf.c").read_text()
    found = re.findall(r"^#ifndef (\w+)\n#define \1 (\S+)", text, flags=re.M)
    return dict(found)


def _loader_defaults() -> Dict[str, str]:
    """NAME -> value of the -D flags a default ProbeConfig compiles with."""
    flags = [f[2:] for f in ProbeConfig().cflags() if f.startswith("-D") and "=" in f]
    return dict(f.split("=", 1) for f in flags if not f.startswith("SIDECAR_PIDNS"))


def test_c_fallbacks_are_the_loaders_defaults() -> None:
    # GIVEN the settings the loader passes, and the C program's own fallbacks
    loader, c = _loader_defaults(), _c_defaults()
    # THEN every setting has a fallback, and each is the loader's default
    assert set(loader) <= set(c)
    assert {name: c[name] for name in loader} == loader


def test_options_defaults_are_the_probes() -> None:
    # GIVEN the user-facing defaults WHEN turned into probe settings as the CLI does
    opts = config.Options()
    probes = ProbeConfig.from_ms(opts.wait_threshold_ms, opts.hold_threshold_ms,
                                 ringbuf_pages=opts.ringbuf_pages, probes=opts.probes)
    # THEN they are the loader's defaults (and so, above, the C program's)
    assert probes == ProbeConfig()


@pytest.mark.parametrize("value", ["0", "3", "12"])
def test_ring_buffer_pages_must_be_a_power_of_two(value: str) -> None:
    with pytest.raises(ValueError, match="OTEL_PYTHON_GIL_RINGBUF_PAGES=.*power of two"):
        config.load({}, {"OTEL_PYTHON_GIL_RINGBUF_PAGES": value})
    assert config.load({}, {"OTEL_PYTHON_GIL_RINGBUF_PAGES": "1"}).ringbuf_pages == 1
