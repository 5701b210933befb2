"""The traced app's own packages on a target interpreter other than the runner's.

otel_gil's app side needs opentelemetry-api and -sdk (and uvloop for the uvloop
tests) importable by the target. They are installed once per Python version,
with the runner's pip (`pip install --target`, binary wheels for that version),
into $OTEL_GIL_APP_SITES (default /var/cache/otel-gil/app-sites/3.X), and put on
the target's PYTHONPATH with the repository, which holds otel_gil itself.

A chrooted target (sid-3.14) sees neither path: `app_paths` copies both into
its tree's /tmp for the duration of the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from targets import PythonTarget

REPO = Path(__file__).resolve().parent.parent
SITES = Path(os.environ.get("OTEL_GIL_APP_SITES", "/var/cache/otel-gil/app-sites"))
PACKAGES = ["opentelemetry-sdk>=1.20", "uvloop"]


def app_site(target: PythonTarget) -> Path:
    """The directory with the app's packages for target's Python version (made once)."""
    version = "%d.%d" % target.version
    site = SITES / version
    stamp = site / ".otel-gil-site"
    if stamp.exists() and stamp.read_text() == " ".join(PACKAGES):
        return site
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-warn-conflicts", "--target", str(site), "--python-version", version,
           "--implementation", "cp", "--only-binary=:all:",
           "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
           *PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"pip could not install {PACKAGES} for {version}: {proc.stderr[-2000:]}")
    stamp.write_text(" ".join(PACKAGES))
    return site


@contextmanager
def app_paths(target: PythonTarget) -> Iterator[str]:
    """A PYTHONPATH, as the target sees it, holding otel_gil, examples/ and the app's packages."""
    site = app_site(target)
    if target.root is None:
        yield os.pathsep.join([str(REPO), str(REPO / "examples"), str(site)])
        return
    inside = Path(tempfile.mkdtemp(prefix="otel-gil-app-", dir=os.path.join(target.root, "tmp")))
    try:
        shutil.copytree(REPO / "otel_gil", inside / "otel_gil",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "examples", inside / "examples")
        shutil.copytree(site, inside / "site")
        seen = "/" + os.path.relpath(inside, target.root)
        yield os.pathsep.join([seen, f"{seen}/examples", f"{seen}/site"])
    finally:
        shutil.rmtree(inside, ignore_errors=True)
