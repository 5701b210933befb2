"""Shared test set-up.

eBPF tests carry @pytest.mark.ebpf. Outside CI they skip when eBPF cannot run
here (not root); in CI (CI=true) any skip of an eBPF test is turned into a
failure, because a skip there hides a broken probe. A target whose source
the archive does not serve (scripts/targets.sh records why) has no test cases;
the run's summary names it and the reason, so the gap is never silent.
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


def pytest_report_header(config: Any) -> list[str]:
    from targets import untestable_targets
    names = [t.name for t in untestable_targets()]
    return [f"targets NOT TESTED here (why: at the end): {', '.join(names)}"] if names else []


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    lines = _untestable()
    if lines:
        terminalreporter.section("targets not tested on this machine")
        for line in lines:
            terminalreporter.write_line(line)


def _untestable() -> list[str]:
    from targets import untestable_targets
    return [f"{t.name}: {t.unbuildable}" for t in untestable_targets()]
