"""The on-disk cache of interpreter inspections: one JSON file per build-id under
``$XDG_CACHE_HOME/otel-gil/interpreters``, used only where no other user could
have written it (it says where to put uprobes in other processes)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Optional

from otel_gil import trust

CACHE_FORMAT = 4  # 2: keyed by build-id and symbol table; no pid-specific paths; 3: probe sites;
# 4: 3.15's PyThreadState thread ids at their debug-offsets index


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "otel-gil", "interpreters")


def _cache_file(build_id: str) -> str:
    return os.path.join(cache_dir(), f"{build_id}.json")


def _trusted_cache() -> bool:
    """A root sidecar uses the cache only where no other user could have
    written it (otel_gil.trust)."""
    return trust.untrusted_reason(cache_dir()) is None


def store(build_id: str, interpreter: Dict[str, Any]) -> None:
    """Keep one build's inspection (an Interpreter as a dict); best effort."""
    directory = cache_dir()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not _trusted_cache():
            return
        payload = {"format": CACHE_FORMAT, "interpreter": interpreter}
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, _cache_file(build_id))  # atomic: readers never see half a file
    except OSError:
        pass  # a read-only home only costs a re-read next time


def load(build_id: str) -> Optional[Dict[str, Any]]:
    """One build's inspection as stored, or None (absent, corrupt, another format)."""
    if not _trusted_cache():
        return None
    try:
        with open(_cache_file(build_id)) as f:
            payload = json.load(f)
        if payload.get("format") != CACHE_FORMAT:
            return None
        found = payload["interpreter"]
        return found if isinstance(found, dict) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or corrupt: inspect again and overwrite
