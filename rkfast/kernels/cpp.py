"""The ``"cpp"`` backend: C++ kernels (``rkfast._C``, compiled by ``pip install``), float32/float64 CPU tensors.

The extension sees only addresses and sizes; :mod:`rkfast.kernels` has checked dtype, device, shapes and
contiguity before anything reaches it. Threads follow ``torch.get_num_threads()``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

try:
    from .. import _C
except ImportError as exc:  # no compiler at install time: the pure-PyTorch kernels take over
    _C = None
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None

NAME = "cpp"
LABEL = "C++"
DEVICE_TYPES: tuple[str, ...] | None = ("cpu",)
DTYPES: tuple[torch.dtype, ...] | None = (torch.float32, torch.float64)
AUTO_FOR: tuple[str, ...] = ("cpu",)
HINT = "reinstall rkfast where a C++ compiler is available"


def status() -> tuple[bool, str]:
    """Usable when the extension imported; else the import error is the reason."""
    return (True, "") if _C is not None else (False, str(IMPORT_ERROR))


def _dtype(t: Tensor) -> str:
    return "float64" if t.dtype == torch.float64 else "float32"


def _tasks_and_n(t: Tensor) -> tuple[int, int]:
    return (1, t.shape[0]) if t.dim() == 1 else (t.shape[0], t.shape[1])


def stage_point_(theta: Tensor, slopes: Sequence[Tensor], coefs: Sequence[float], out: Tensor) -> None:
    tasks, n = _tasks_and_n(out)
    _C.stage_point(_dtype(out), theta.data_ptr(), [k.data_ptr() for k in slopes], [float(c) for c in coefs],
                   out.data_ptr(), tasks, n, torch.get_num_threads())


def stage_point_backward_(grad_out: Tensor, coefs: Sequence[float], grad_theta: Tensor | None,
                          grad_slopes: Sequence[Tensor]) -> None:
    tasks, n = _tasks_and_n(grad_out)
    _C.stage_point_backward(_dtype(grad_out), grad_out.data_ptr(), [float(c) for c in coefs],
                            0 if grad_theta is None else grad_theta.data_ptr(),
                            [g.data_ptr() for g in grad_slopes], tasks, n, torch.get_num_threads())


def combine_(grads: Sequence[Tensor], weights: Sequence[float], out: Tensor) -> None:
    tasks, n = _tasks_and_n(grads[0])
    _C.combine(_dtype(out), [g.data_ptr() for g in grads], [float(w) for w in weights], out.data_ptr(),
               tasks, n, torch.get_num_threads())


def axpy_(theta: Tensor, d: Tensor, alpha: float) -> None:
    _C.axpy(_dtype(theta), theta.data_ptr(), d.data_ptr(), float(alpha), theta.numel(), torch.get_num_threads())
