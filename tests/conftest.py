"""Shared test set-up.

eBPF tests carry @pytest.mark.ebpf. Outside CI they skip when eBPF cannot run
here (not root); in CI (CI=true) any skip of an eBPF test is turned into a
failure, because a skip there hides a broken probe.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Generator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

IN_CI = os.environ.get("CI", "").lower() == "true"


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    if os.geteuid() == 0:
        return
    for item in items:
        if "ebpf" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="eBPF tests need root"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and "ebpf" in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"eBPF test skipped in CI (CI=true), which counts as a failure: " \
                          f"{report.longrepr}"
