"""The registered kernel backends, and every choice among them, derived from :data:`REGISTRY`.

Adding a backend takes one module that satisfies :class:`~rkfast.kernels.backend.KernelBackend` and one
line in :data:`REGISTRY`; the backend names, :func:`available`, :func:`resolve_backend`, the CLI's choices
and the tests' targets all follow from it.

Backend modules are imported on first use, so an optional dependency (Triton) costs nothing until asked
for. A module that fails to import makes its backend unavailable, with the import error as the reason.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import TypeAlias, cast

import torch

from .backend import KernelBackend

__all__ = [
    "REGISTRY",
    "FALLBACK",
    "Backend",
    "backend_choices",
    "backend_module",
    "backend_status",
    "available",
    "resolve_backend",
    "runnable_targets",
]

REGISTRY: dict[str, str] = {  # backend name -> its module; the order is the order of the names everywhere
    "torch": "rkfast.kernels.reference",
    "triton": "rkfast.kernels.triton",
    "cpp": "rkfast.kernels.cpp",
}

FALLBACK = "torch"
"""The backend that runs every device and dtype: what ``"auto"`` picks when no preferred backend can run."""

Backend: TypeAlias = str
"""A ``backend=`` argument: ``"auto"`` or a registered name (:func:`backend_choices`)."""

_import_failures: dict[str, str] = {}  # module path -> why it did not import (a failed import is not retried)
_warned_fallbacks: set[str] = set()  # preferred backends whose absence "auto" has already warned about


def backend_choices() -> tuple[str, ...]:
    """Every valid ``backend=`` value: ``("auto", *registered names)``."""
    return ("auto", *REGISTRY)


def _load(name: str) -> tuple[KernelBackend | None, str]:
    """``(module, "")`` for a registered backend, or ``(None, why its module did not import)``."""
    path = REGISTRY[name]
    module = sys.modules.get(path)
    if module is not None:
        return cast(KernelBackend, module), ""
    if path in _import_failures:
        return None, _import_failures[path]
    try:
        module = importlib.import_module(path)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        _import_failures[path] = f"{type(exc).__name__}: {exc}"
        return None, _import_failures[path]
    return cast(KernelBackend, module), ""


def backend_module(name: str) -> KernelBackend:
    """The module implementing backend ``name``'s kernels; raises if it is unknown or failed to import."""
    module = sys.modules.get(REGISTRY.get(name, ""))  # the imported module: every eager kernel call asks
    if module is not None:
        return cast(KernelBackend, module)
    if name not in REGISTRY:
        raise ValueError(f"unknown kernel backend {name!r}")
    loaded, why = _load(name)
    if loaded is None:
        raise _unavailable(name, why, None)
    return loaded


def backend_status(name: str) -> tuple[bool, str]:
    """``(usable here, why not)`` for the registered backend ``name``."""
    module, why = _load(name)
    return (False, why) if module is None else module.status()


def available() -> dict[str, bool]:
    """Which backends can run on this machine, by name in registry order: ``{"torch": True, ...}``."""
    return {name: backend_status(name)[0] for name in REGISTRY}


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for tensors of ``device`` and ``dtype``; raises if ``backend`` cannot run them.

    ``"auto"`` gives the backend that declares it is preferred for ``device``'s type (``AUTO_FOR``) when
    that backend is usable and supports ``dtype``, else :data:`FALLBACK`; falling back because the
    preferred backend is unusable warns once per backend. A named backend is returned as is, or raises:
    ``ValueError`` if it is not registered, ``RuntimeError`` if it is unusable here or does not run on
    ``device``, ``TypeError`` if it does not support ``dtype``.
    """
    if backend not in REGISTRY and backend != "auto":
        choices = ", ".join(map(repr, backend_choices()))
        raise ValueError(f"unknown kernel backend {backend!r}; use one of {choices}")
    device = torch.device(device)
    if backend == "auto":
        return _auto(device.type, dtype)
    module, why = _load(backend)
    usable, why = (False, why) if module is None else module.status()
    if module is None or not usable:
        raise _unavailable(backend, why, module)
    if not _runs_on(module, device.type):
        raise RuntimeError(f"backend {backend!r} runs on {_device_names(module)} tensors, got tensors on {device}")
    if not _supports(module, dtype):
        raise TypeError(f"backend {backend!r} supports {_dtype_names(module)}, got {dtype}")
    return backend


def runnable_targets(fused_only: bool = True) -> list[tuple[str, str]]:
    """The ``(backend, device type)`` pairs this machine can run, in registry order.

    Every usable backend, on each device type it runs on that has a device here (the CPU, and CUDA when a
    GPU is present). ``fused_only`` leaves out :data:`FALLBACK`, the pure-PyTorch reference.
    """
    here = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    targets = []
    for name in REGISTRY:
        if fused_only and name == FALLBACK:
            continue
        module, _ = _load(name)
        if module is not None and module.status()[0]:
            targets += [(name, device_type) for device_type in here if _runs_on(module, device_type)]
    return targets


def _auto(device_type: str, dtype: torch.dtype) -> str:
    """What ``backend="auto"`` gives for tensors of ``device_type`` and ``dtype`` (see resolve_backend)."""
    for name, path in REGISTRY.items():
        # as in _load, without its call: every "auto" op call runs this loop
        module = cast("KernelBackend | None", sys.modules.get(path))
        if module is None:
            module, _ = _load(name)  # a backend that does not import cannot declare a preference
        if module is not None and device_type in module.AUTO_FOR:
            break
    else:
        return FALLBACK
    if not (_runs_on(module, device_type) and _supports(module, dtype)):
        return FALLBACK
    usable, why = module.status()
    if usable:
        return name
    _warn_fallback(module, why, device_type)
    return FALLBACK


def _warn_fallback(module: KernelBackend, why: str, device_type: str) -> None:
    if module.NAME in _warned_fallbacks:
        return
    _warned_fallbacks.add(module.NAME)
    fallback = backend_module(FALLBACK)
    warnings.warn(
        f"rkfast's {module.LABEL} kernels are not available ({why}); {device_type.upper()} tensors use the "
        f"{fallback.LABEL} kernels. To use them, {module.HINT}. (The {fallback.LABEL} kernels compute the same "
        f"results, more slowly.)",
        RuntimeWarning,
        stacklevel=4,  # the caller of resolve_backend
    )


def _unavailable(name: str, why: str, module: KernelBackend | None) -> RuntimeError:
    advice = f"use backend={FALLBACK!r}" if module is None else f"{module.HINT}, or use backend={FALLBACK!r}"
    return RuntimeError(f"backend {name!r} is not available ({why}); {advice}")


def _runs_on(module: KernelBackend, device_type: str) -> bool:
    return module.DEVICE_TYPES is None or device_type in module.DEVICE_TYPES


def _supports(module: KernelBackend, dtype: torch.dtype) -> bool:
    return module.DTYPES is None or dtype in module.DTYPES


def _device_names(module: KernelBackend) -> str:
    return " or ".join(t.upper() for t in module.DEVICE_TYPES or ())


def _dtype_names(module: KernelBackend) -> str:
    names = [str(d).removeprefix("torch.") for d in module.DTYPES or ()]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
