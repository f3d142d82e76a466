"""The peer libraries of the end-to-end benchmark (higher, torchopt, learn2learn): loading them, and why not.

They are optional: a peer that is not installed, or fails to import, makes its contender "not available"
with the reason, and the run goes on.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from typing import Any


class NotAvailable(Exception):
    """A contender's library (or feature) is not installed or cannot be imported."""


_PEERS: dict[str, tuple[Any, str | None, str | None]] = {}  # name -> (module, version, note)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _learn2learn_algorithms_only(err: Exception) -> Any:
    """learn2learn's ``__init__`` imports its vision/gym/text modules (torchvision, gym, ...); MAML needs
    none of them. Load ``learn2learn.utils`` and ``learn2learn.algorithms.maml`` alone, same code."""
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or not spec.submodule_search_locations:
        raise err
    for name in [m for m in sys.modules if m == "learn2learn" or m.startswith("learn2learn.")]:
        del sys.modules[name]  # the half-imported package
    root = list(spec.submodule_search_locations)[0]
    for pkg, path in (("learn2learn", root), ("learn2learn.algorithms", os.path.join(root, "algorithms"))):
        module = types.ModuleType(pkg)
        module.__path__ = [path]  # a bare package: its __init__ does not run
        sys.modules[pkg] = module
    importlib.import_module("learn2learn.utils")
    maml = importlib.import_module("learn2learn.algorithms.maml")
    sys.modules["learn2learn.algorithms"].MAML = maml.MAML  # type: ignore[attr-defined]
    sys.modules["learn2learn"].algorithms = sys.modules["learn2learn.algorithms"]  # type: ignore[attr-defined]
    return sys.modules["learn2learn"]


def load_peer(name: str) -> Any:
    """Import a peer library (once): its module, or raise NotAvailable with the reason."""
    if name in _PEERS:
        module = _PEERS[name][0]
        if module is None:
            raise NotAvailable(_PEERS[name][2])
        return module
    note = None
    try:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any import failure makes the peer unavailable
            if name != "learn2learn":
                raise
            module = _learn2learn_algorithms_only(err)
            note = (f"package import failed ({type(err).__name__}: {err}); its MAML loaded from "
                    "learn2learn/algorithms/maml.py + learn2learn/utils without the package __init__")
    except Exception as err:  # noqa: BLE001
        _PEERS[name] = (None, _version(name), f"{type(err).__name__}: {err}")
        raise NotAvailable(_PEERS[name][2]) from err
    _PEERS[name] = (module, _version(name), note)
    return module


def peer_status(name: str) -> dict[str, Any]:
    """``available``, ``version`` and a ``note`` (how it was loaded) or the ``reason`` it is not available."""
    try:
        load_peer(name)
    except NotAvailable:
        pass
    module, version, note = _PEERS[name]
    out: dict[str, Any] = {"available": module is not None, "version": version}
    out["note" if module is not None else "reason"] = note
    return out
