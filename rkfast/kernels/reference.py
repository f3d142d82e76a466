"""The ``"torch"`` backend: pure-PyTorch kernels on every device and dtype, the fallback and the tests' oracle.

Each op writes into buffers the caller allocated (the shapes are checked in :mod:`rkfast.kernels`), in the
same order of operations the fused backends use, so float32 results agree to a few ulps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NAME = "torch"
LABEL = "pure-PyTorch"
DEVICE_TYPES: tuple[str, ...] | None = None  # every device type
DTYPES: tuple[torch.dtype, ...] | None = None  # every floating-point dtype
AUTO_FOR: tuple[str, ...] = ()  # "auto" reaches it as the fallback, never as a preference
HINT = ""  # it is always usable, so no hint is ever shown


def status() -> tuple[bool, str]:
    """Always usable: it needs nothing beyond PyTorch."""
    return True, ""


def stage_point_(theta: Tensor, slopes: Sequence[Tensor], coefs: Sequence[float], out: Tensor) -> None:
    """``out[t] = theta - sum_l coefs[l] * slopes[l][t]``."""
    torch.sub(theta, slopes[0], alpha=coefs[0], out=out)
    for k, c in zip(slopes[1:], coefs[1:], strict=True):
        out.sub_(k, alpha=c)


def stage_point_backward_(
    grad_out: Tensor, coefs: Sequence[float], grad_theta: Tensor | None, grad_slopes: Sequence[Tensor]
) -> None:
    """``grad_theta = sum_t grad_out[t]``; ``grad_slopes[l] = -coefs[l] * grad_out``."""
    if grad_theta is not None:
        torch.sum(grad_out, 0, out=grad_theta)
    for g, c in zip(grad_slopes, coefs, strict=True):
        torch.mul(grad_out, -c, out=g)


def stage_point_elementwise_(theta: Tensor, slopes: Sequence[Tensor], coefs: Sequence[Tensor], out: Tensor) -> None:
    """``out[t] = theta - sum_l coefs[l] * slopes[l][t]``, ``coefs[l]`` an ``[N]`` vector (elementwise)."""
    torch.addcmul(theta, coefs[0], slopes[0], value=-1, out=out)
    for k, c in zip(slopes[1:], coefs[1:], strict=True):
        out.addcmul_(c, k, value=-1)


def stage_point_elementwise_backward_(
    grad_out: Tensor,
    slopes: Sequence[Tensor],
    coefs: Sequence[Tensor],
    grad_theta: Tensor | None,
    grad_slopes: Sequence[Tensor] | None,
    grad_coefs: Sequence[Tensor] | None,
) -> None:
    """``grad_theta = sum_t grad_out[t]``; ``grad_slopes[l] = -coefs[l] * grad_out``;
    ``grad_coefs[l] = -sum_t grad_out[t] * slopes[l][t]`` (each skipped when ``None``)."""
    if grad_theta is not None:
        torch.sum(grad_out, 0, out=grad_theta)
    if grad_slopes:
        for g, c in zip(grad_slopes, coefs, strict=True):
            torch.mul(grad_out, c, out=g).neg_()
    if grad_coefs:
        product = torch.empty_like(grad_out)  # one temporary for all slopes
        for g, k in zip(grad_coefs, slopes, strict=True):
            torch.sum(torch.mul(grad_out, k, out=product), 0, out=g).neg_()


def combine_(grads: Sequence[Tensor], weights: Sequence[float], out: Tensor) -> None:
    """``out = sum_l weights[l] * sum_t grads[l][t]``."""
    torch.sum(grads[0], 0, out=out)
    out.mul_(weights[0])
    if len(grads) > 1:
        column_sum = torch.empty_like(out)  # one temporary for all streams
        for g, w in zip(grads[1:], weights[1:], strict=True):
            out.add_(torch.sum(g, 0, out=column_sum), alpha=w)


def axpy_(theta: Tensor, d: Tensor, alpha: float) -> None:
    """``theta += alpha * d`` in place."""
    theta.add_(d, alpha=alpha)
