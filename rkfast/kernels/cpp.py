"""The ``"cpp"`` backend: C++ kernels (``rkfast._C``, compiled by ``pip install``), float32/float64 CPU tensors.

The extension sees only addresses and sizes; :mod:`rkfast.kernels` has checked dtype, device, shapes and
contiguity before anything reaches it. Threads follow ``torch.get_num_threads()``.

Without the extension this backend is unusable, and :func:`status` says why, telling apart "not built"
(setup.py could not compile it when rkfast was installed: no working compiler, no pybind11, a compile error;
it recorded the reason in ``rkfast/_build_info.json``) from "built but fails to load here" (another Python's
build, a missing symbol or library), and from "imported from a source tree" (a script run from a clone's root
imports the clone, which has no compiled extension, instead of the installed copy, which has one);
:data:`HINT` says how to build it, or how to reach the compiled copy.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import os
import shlex
import sys
from collections.abc import Sequence
from types import ModuleType
from urllib.parse import unquote, urlparse

import torch
from torch import Tensor

EXTENSION = "rkfast._C"
BUILD_RECORD = "_build_info.json"
"""Written into the package by setup.py when it could not build the extension, with the reason."""
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAME = "cpp"
LABEL = "C++"
DEVICE_TYPES: tuple[str, ...] | None = ("cpu",)
DTYPES: tuple[torch.dtype, ...] | None = (torch.float32, torch.float64)
AUTO_FOR: tuple[str, ...] = ("cpu",)


def read_build_record() -> dict | None:
    """What setup.py recorded when it could not build the extension (``None``: no record, e.g. it was built)."""
    try:
        with open(os.path.join(_PACKAGE_DIR, BUILD_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def reinstall_command(locate: bool = True) -> str:
    """How to rebuild the extension: the pip command, with RKFAST_REQUIRE_CPP=1 so that a failed build is an
    error that shows the compiler's message. With ``locate``, for the source folder that rkfast was installed
    from (pip's ``direct_url.json``) when that folder is still there."""
    pip = "RKFAST_REQUIRE_CPP=1 pip install --force-reinstall --no-deps"
    source = _install_source() if locate else None
    if source is not None:
        folder, editable = source
        return f"`{pip} {'-e ' if editable else ''}{shlex.quote(folder)}`"
    return f"`{pip} .` in rkfast's source folder (from an index: `{pip} --no-cache-dir rkfast`)"


def _install_source() -> tuple[str, bool] | None:
    """``(source folder, editable)`` when pip installed rkfast from a local folder that still holds setup.py."""
    try:
        from importlib.metadata import distributions

        # the first install record that pip wrote (a source tree's rkfast.egg-info on sys.path has none)
        texts = (dist.read_text("direct_url.json") for dist in distributions(name="rkfast"))
        direct_url = json.loads(next(text for text in texts if text))
        url = urlparse(direct_url["url"])
        if url.scheme != "file" or "dir_info" not in direct_url:  # from an index, an archive or VCS
            return None
        folder = unquote(url.path)
        if sys.platform == "win32":
            folder = folder.lstrip("/")
        if not os.path.isfile(os.path.join(folder, "setup.py")):
            return None
        return folder, bool(direct_url["dir_info"].get("editable"))
    except Exception:  # noqa: BLE001 - no metadata: rkfast is imported from a source tree, not installed
        return None


def _load() -> tuple[ModuleType | None, ImportError | None, str]:
    """``(the extension, None, hint)``, or ``(None, why it is not there, how to get it)``.

    "Not built" (no module file: the compiler failed or was missing at install time, see setup.py) is told
    apart from "built but fails to load" (a module file that does not import here).
    """

    def not_built_hint(locate: bool = True) -> str:
        return (
            f"install a C++ compiler (g++ or clang) and reinstall rkfast: {reinstall_command(locate)} "
            "(RKFAST_REQUIRE_CPP=1 makes a failed build an error)"
        )

    try:
        spec = importlib.util.find_spec(EXTENSION)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        others = sorted(
            name for name in _listdir(_PACKAGE_DIR) if name.startswith("_C.") and name.endswith((".so", ".pyd"))
        )
        installed = None if others else compiled_copy_elsewhere(_PACKAGE_DIR)
        if installed is not None:
            return None, ImportError(source_tree_message(_PACKAGE_DIR, installed)), SOURCE_TREE_HINT
        if others:
            suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
            return (
                None,
                ImportError(
                    f"rkfast._C was built for another Python: {_PACKAGE_DIR} holds {', '.join(others)}, and this "
                    f"Python loads _C{suffix}"
                ),
                f"rebuild it for this Python: {reinstall_command()}",
            )
        record = read_build_record()
        if record and record.get("reason"):
            why = f"rkfast._C was not built when rkfast was installed: {record['reason']}"
        else:
            why = f"rkfast._C was not built when rkfast was installed (there is no rkfast._C in {_PACKAGE_DIR})"
        return None, ImportError(why), not_built_hint()
    try:
        return importlib.import_module(EXTENSION), None, not_built_hint(locate=False)  # unused while _C imports
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError, ...: built, but unusable here
        origin = f" ({spec.origin})" if spec.origin and spec.origin not in str(exc) else ""
        return (
            None,
            ImportError(f"rkfast._C was built but fails to load{origin}: {type(exc).__name__}: {exc}"),
            (f"reinstall rkfast so that rkfast._C is rebuilt here: {reinstall_command()}"),
        )


SOURCE_TREE_HINT = "run from another folder, or `pip install -e .`"
"""How to use the compiled copy when rkfast was imported from a source tree without one."""


def source_tree_message(package_dir: str, installed: str) -> str:
    """Why the extension is missing when rkfast was imported from the source tree holding ``package_dir``
    (a folder without a compiled ``_C``) while the copy ``installed`` has one."""
    return (
        f"rkfast was imported from the source tree at {os.path.dirname(os.path.abspath(package_dir))}, which has "
        f"no compiled `_C`; the installed copy is at {installed}"
    )


def compiled_copy_elsewhere(package_dir: str, path_entries: Sequence[str] | None = None) -> str | None:
    """The folder of another copy of the ``rkfast`` package, not ``package_dir``, holding an extension module
    that this Python loads (``_C`` with one of its extension suffixes); ``None`` when there is none.

    Looked for in pip's install records of rkfast, then under each entry of ``path_entries`` (default:
    ``sys.path``): a script run from a clone's root imports the clone, which shadows the installed copy.
    """
    here = os.path.realpath(package_dir)
    candidates = [
        *_installed_package_dirs(),
        *(
            os.path.join(entry or os.getcwd(), "rkfast")
            for entry in (sys.path if path_entries is None else path_entries)
        ),
    ]
    for folder in candidates:
        if os.path.realpath(folder) != here and any(_loadable_here(name) for name in _listdir(folder)):
            return os.path.abspath(folder)
    return None


def _loadable_here(file_name: str) -> bool:
    return any(file_name == f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _installed_package_dirs() -> list[str]:
    """The folders where pip's install records of rkfast put a ``_C`` extension module."""
    try:
        from importlib.metadata import distributions

        return [
            os.path.dirname(str(dist.locate_file(file)))
            for dist in distributions(name="rkfast")
            for file in dist.files or ()
            if file.parts[:1] == ("rkfast",) and _loadable_here(file.name)
        ]
    except Exception:  # noqa: BLE001 - unreadable metadata: the sys.path entries are still searched
        return []


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


_C, IMPORT_ERROR, HINT = _load()
"""The extension, or ``None`` with why not (``IMPORT_ERROR``); ``HINT`` completes "to use them, ..."."""


def status() -> tuple[bool, str]:
    """Usable when the extension imported; else the import error is the reason."""
    return (True, "") if _C is not None else (False, str(IMPORT_ERROR))


def _extension() -> ModuleType:
    """The loaded extension; the kernels below run only once :func:`status` said it is usable."""
    if _C is None:
        raise RuntimeError(f"rkfast's C++ kernels are not available: {IMPORT_ERROR}")
    return _C


def _dtype(t: Tensor) -> str:
    return "float64" if t.dtype == torch.float64 else "float32"


def _tasks_and_n(t: Tensor) -> tuple[int, int]:
    return (1, t.shape[0]) if t.dim() == 1 else (t.shape[0], t.shape[1])


def stage_point_(theta: Tensor, slopes: Sequence[Tensor], coefs: Sequence[float], out: Tensor) -> None:
    tasks, n = _tasks_and_n(out)
    _extension().stage_point(
        _dtype(out),
        theta.data_ptr(),
        [k.data_ptr() for k in slopes],
        [float(c) for c in coefs],
        out.data_ptr(),
        tasks,
        n,
        torch.get_num_threads(),
    )


def stage_point_backward_(
    grad_out: Tensor, coefs: Sequence[float], grad_theta: Tensor | None, grad_slopes: Sequence[Tensor]
) -> None:
    tasks, n = _tasks_and_n(grad_out)
    _extension().stage_point_backward(
        _dtype(grad_out),
        grad_out.data_ptr(),
        [float(c) for c in coefs],
        0 if grad_theta is None else grad_theta.data_ptr(),
        [g.data_ptr() for g in grad_slopes],
        tasks,
        n,
        torch.get_num_threads(),
    )


def stage_point_elementwise_(theta: Tensor, slopes: Sequence[Tensor], coefs: Sequence[Tensor], out: Tensor) -> None:
    tasks, n = _tasks_and_n(out)
    _extension().stage_point_elementwise(
        _dtype(out),
        theta.data_ptr(),
        [k.data_ptr() for k in slopes],
        [c.data_ptr() for c in coefs],
        out.data_ptr(),
        tasks,
        n,
        torch.get_num_threads(),
    )


def stage_point_elementwise_backward_(
    grad_out: Tensor,
    slopes: Sequence[Tensor],
    coefs: Sequence[Tensor],
    grad_theta: Tensor | None,
    grad_slopes: Sequence[Tensor] | None,
    grad_coefs: Sequence[Tensor] | None,
) -> None:
    tasks, n = _tasks_and_n(grad_out)
    _extension().stage_point_elementwise_backward(
        _dtype(grad_out),
        grad_out.data_ptr(),
        [k.data_ptr() for k in slopes] if grad_coefs else [],
        [c.data_ptr() for c in coefs] if grad_slopes else [],
        0 if grad_theta is None else grad_theta.data_ptr(),
        [g.data_ptr() for g in grad_slopes or ()],
        [g.data_ptr() for g in grad_coefs or ()],
        tasks,
        n,
        torch.get_num_threads(),
    )


def combine_(grads: Sequence[Tensor], weights: Sequence[float], out: Tensor) -> None:
    tasks, n = _tasks_and_n(grads[0])
    _extension().combine(
        _dtype(out),
        [g.data_ptr() for g in grads],
        [float(w) for w in weights],
        out.data_ptr(),
        tasks,
        n,
        torch.get_num_threads(),
    )


def axpy_(theta: Tensor, d: Tensor, alpha: float) -> None:
    _extension().axpy(
        _dtype(theta), theta.data_ptr(), d.data_ptr(), float(alpha), theta.numel(), torch.get_num_threads()
    )
