"""What a kernel backend is: :class:`KernelBackend`, the interface every backend module satisfies.

A backend is a module, listed by one line in :mod:`rkfast.kernels.registry`, that declares at module level
where it runs and whether it is usable, and defines the kernels. Modules satisfy the protocol
structurally: nothing subclasses it.

The kernels write into buffers the caller allocated. :mod:`rkfast.kernels` has checked every argument
before a kernel runs, so a kernel may assume: all tensors share one device, whose type it runs on, and one
dtype that it supports; ``theta``, ``d`` and ``out`` of ``combine_`` are contiguous ``[N]``, every other
tensor is a contiguous ``[T, N]``, except the coefficient vectors of the ``stage_point_elementwise``
kernels and their gradients, contiguous ``[N]``; there is one coefficient (a Python float, or an ``[N]``
vector for the elementwise kernels) per ``[T, N]`` input, and at least one input. Results must follow
the reference's order of operations (:mod:`.reference`) closely enough that float32 results agree to a few
ulps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["KernelBackend"]


@runtime_checkable
class KernelBackend(Protocol):
    """A module computing the RK stage arithmetic: its declarations, then its kernels."""

    NAME: str
    """The ``backend=`` value that selects it; equal to its key in the registry."""
    LABEL: str
    """Its name in messages, e.g. ``"C++"`` in "rkfast's C++ kernels are not available"."""
    DEVICE_TYPES: tuple[str, ...] | None
    """The device types (``torch.device.type``) whose tensors it runs on in this process; ``None``: all."""
    DTYPES: tuple[torch.dtype, ...] | None
    """The dtypes it computes; ``None``: every floating-point dtype."""
    AUTO_FOR: tuple[str, ...]
    """The device types for which ``backend="auto"`` prefers it (when it is usable and supports the dtype)."""
    HINT: str
    """How to make it usable, a clause that completes "to use them, ...": shown when it is not."""

    def status(self) -> tuple[bool, str]:
        """``(usable in this process, why not)``. Asked on every backend resolution, so it must be cheap."""
        ...

    def stage_point_(self, theta: Tensor, slopes: Sequence[Tensor], coefs: Sequence[float], out: Tensor) -> None:
        """``out[t] = theta - sum_l coefs[l] * slopes[l][t]``."""
        ...

    def stage_point_backward_(
        self, grad_out: Tensor, coefs: Sequence[float], grad_theta: Tensor | None, grad_slopes: Sequence[Tensor]
    ) -> None:
        """``grad_theta = sum_t grad_out[t]`` (skipped when ``None``); ``grad_slopes[l] = -coefs[l] * grad_out``."""
        ...

    def stage_point_elementwise_(
        self, theta: Tensor, slopes: Sequence[Tensor], coefs: Sequence[Tensor], out: Tensor
    ) -> None:
        """``out[t] = theta - sum_l coefs[l] * slopes[l][t]`` with ``[N]`` coefficient vectors (elementwise)."""
        ...

    def stage_point_elementwise_backward_(
        self,
        grad_out: Tensor,
        slopes: Sequence[Tensor],
        coefs: Sequence[Tensor],
        grad_theta: Tensor | None,
        grad_slopes: Sequence[Tensor] | None,
        grad_coefs: Sequence[Tensor] | None,
    ) -> None:
        """``grad_theta = sum_t grad_out[t]``; ``grad_slopes[l] = -coefs[l] * grad_out``;
        ``grad_coefs[l] = -sum_t grad_out[t] * slopes[l][t]``; each output skipped when ``None``."""
        ...

    def combine_(self, grads: Sequence[Tensor], weights: Sequence[float], out: Tensor) -> None:
        """``out = sum_l weights[l] * sum_t grads[l][t]``."""
        ...

    def axpy_(self, theta: Tensor, d: Tensor, alpha: float) -> None:
        """``theta += alpha * d`` in place."""
        ...
