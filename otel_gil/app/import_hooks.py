"""Patching other modules: the patches made (and undone), and patching a module
when it is imported, through a meta path finder that hands the module's usual
loader a wrapper, which runs the patch right after the module's own code
(importlib's MetaPathFinder/Loader protocol, Lib/importlib/abc.py).

Runs *inside the traced app* (stdlib only); never raises into the app's import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


class _Loader(importlib.abc.Loader):
    """Runs a module's own loader, then its patch; then puts the loader back
    on the module, so nothing else ever sees this one."""

    def __init__(self, loader: Any, patch: Callable[[ModuleType], None]) -> None:
        self.loader = loader
        self.patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        module: Optional[ModuleType] = self.loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        try:
            self.loader.exec_module(module)
        finally:
            if module.__spec__ is not None:
                module.__spec__.loader = self.loader
            module.__loader__ = self.loader
        run_patch(self.patch, module)


class PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of ``patches`` through the other finders, and gives
    their specs a _Loader running the module's patch; only while active()."""

    def __init__(self, patches: Dict[str, Callable[[ModuleType], None]],
                 active: Callable[[], bool]) -> None:
        self.patches = patches
        self.active = active

    def find_spec(self, fullname: str, path: Optional[Sequence[str]],
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        patch = self.patches.get(fullname)
        if patch is None or not self.active():
            return None
        try:
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec: Optional[importlib.machinery.ModuleSpec] = find(fullname, path, target)
                if spec is None:
                    continue
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, patch)
                return spec
        except Exception:  # noqa: BLE001 - leave the import to the usual machinery
            return None
        return None


def run_patch(patch: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        patch(module)
    except Exception:  # noqa: BLE001, S110 - an unknown version: left unpatched
        pass


_MISSING = object()


class Patches:
    """Attributes replaced on other modules' objects, and how to put them back."""

    def __init__(self) -> None:
        self.made: List[Tuple[Any, str, Any]] = []  # (owner, attribute, original)

    def replace(self, owner: Any, name: str, value: Any) -> None:
        self.made.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def names_on(self, owner: Any) -> List[str]:
        return [name for o, name, _ in self.made if o is owner]

    def undo(self) -> None:
        """Every original back, newest first (an attribute the owner did not
        have of its own is deleted again)."""
        while self.made:
            owner, name, original = self.made.pop()
            if original is _MISSING:
                if name in owner.__dict__:
                    delattr(owner, name)
            else:
                setattr(owner, name, original)

    def describe(self) -> List[str]:
        """What is patched now, as ``module.Class.attribute``."""
        return [f"{owner.__module__}.{owner.__qualname__}.{name}" for owner, name, _ in self.made]
