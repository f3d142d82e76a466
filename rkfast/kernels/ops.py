"""The ops as ``torch.library`` custom ops: ``rkfast::stage_point``, ``rkfast::combine``, ``rkfast::axpy_``.

Each op takes the (already resolved) backend name as its last argument and runs that backend's kernel;
a fake implementation gives shapes to ``torch.compile``, and autograd formulas make ``stage_point`` and
``combine`` differentiable. ``stage_point``'s backward is itself a fused op (``stage_point_backward``):
one pass over the incoming gradient gives the sum over tasks (for theta) and every slope's gradient.
When the backward must be differentiable again (``create_graph``), it is written in plain torch ops.

The ``*_out`` variants write into a caller's buffer (no allocation; not differentiable, as torch does not
allow autograd formulas on ops that mutate their inputs).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .registry import backend_module

__all__ = ["new_stage_point", "new_combine", "stage_point_autograd", "stage_point_grads", "StagePointFunction"]


def new_stage_point(theta: Tensor, slopes: Sequence[Tensor], coefs: Sequence[float]) -> Tensor:
    """An uninitialised buffer for ``stage_point``'s result: ``[T, N]`` like the slopes."""
    return torch.empty_like(slopes[0])


def new_combine(grads: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """An uninitialised buffer for ``combine``'s result: ``[N]``."""
    return grads[0].new_empty(grads[0].shape[1:])


# -- stage_point --------------------------------------------------------------------------------------


@torch.library.custom_op("rkfast::stage_point", mutates_args=())
def stage_point(theta: Tensor, slopes: list[Tensor], coefs: list[float], backend: str) -> Tensor:
    out = new_stage_point(theta, slopes, coefs)
    backend_module(backend).stage_point_(theta, slopes, coefs, out)
    return out


@stage_point.register_fake
def _(theta: Tensor, slopes: list[Tensor], coefs: list[float], backend: str) -> Tensor:
    return new_stage_point(theta, slopes, coefs)


@torch.library.custom_op("rkfast::stage_point_out", mutates_args=("out",))
def stage_point_out(theta: Tensor, slopes: list[Tensor], coefs: list[float], out: Tensor, backend: str) -> None:
    backend_module(backend).stage_point_(theta, slopes, coefs, out)


@stage_point_out.register_fake
def _(theta: Tensor, slopes: list[Tensor], coefs: list[float], out: Tensor, backend: str) -> None:
    return None


def _new_stage_point_grads(grad_out: Tensor, coefs: Sequence[float]) -> tuple[Tensor, list[Tensor]]:
    return grad_out.new_empty(grad_out.shape[1:]), [torch.empty_like(grad_out) for _ in coefs]


def _stage_point_grads_kernel(grad_out: Tensor, coefs: list[float], backend: str) -> tuple[Tensor, list[Tensor]]:
    grad_theta, grad_slopes = _new_stage_point_grads(grad_out, coefs)
    backend_module(backend).stage_point_backward_(grad_out, coefs, grad_theta, grad_slopes)
    return grad_theta, grad_slopes


@torch.library.custom_op("rkfast::stage_point_backward", mutates_args=())
def stage_point_backward(grad_out: Tensor, coefs: list[float], backend: str) -> list[Tensor]:
    """``[sum_t grad_out[t], -coefs[0] * grad_out, -coefs[1] * grad_out, ...]`` in one pass."""
    grad_theta, grad_slopes = _stage_point_grads_kernel(grad_out, coefs, backend)
    return [grad_theta, *grad_slopes]


@stage_point_backward.register_fake
def _(grad_out: Tensor, coefs: list[float], backend: str) -> list[Tensor]:
    grad_theta, grad_slopes = _new_stage_point_grads(grad_out, coefs)
    return [grad_theta, *grad_slopes]


def stage_point_grads(grad_out: Tensor, coefs: list[float], backend: str, *,
                      registered: bool) -> tuple[Tensor, list[Tensor]]:
    """The backward of ``stage_point``: ``(sum_t grad_out[t], [-c * grad_out for c in coefs])``.

    ``registered``: run the kernel through the registered op ``rkfast::stage_point_backward``, as the
    registered forward's autograd formula must: ``torch.compile`` traces that formula with fake tensors, and
    not every torch version reports ``is_compiling()`` there. Otherwise the kernel is called directly.
    """
    if torch.is_grad_enabled() and grad_out.requires_grad:
        # create_graph: this backward is itself differentiated, so keep it in differentiable torch ops
        return grad_out.sum(0), [grad_out * -c for c in coefs]
    grad_out = grad_out.contiguous()
    if registered or torch.compiler.is_compiling():
        grad_theta, *grad_slopes = torch.ops.rkfast.stage_point_backward(grad_out, coefs, backend)
        return grad_theta, grad_slopes
    return _stage_point_grads_kernel(grad_out, coefs, backend)


def _stage_point_setup(ctx, inputs, output) -> None:
    _, _, ctx.coefs, ctx.backend = inputs


def _stage_point_grad(ctx, grad_out: Tensor):
    grad_theta, grad_slopes = stage_point_grads(grad_out, ctx.coefs, ctx.backend, registered=True)
    return grad_theta, grad_slopes, None, None


stage_point.register_autograd(_stage_point_grad, setup_context=_stage_point_setup)


class StagePointFunction(torch.autograd.Function):
    """``stage_point`` for eager autograd: the same kernels and backward as the registered op, through
    ``autograd.Function``, whose per-call Python cost is a fraction of the custom-op autograd wrapper's."""

    @staticmethod
    def forward(ctx, theta: Tensor, coefs: list[float], backend: str, *slopes: Tensor) -> Tensor:
        ctx.coefs, ctx.backend = coefs, backend
        out = new_stage_point(theta, slopes, coefs)
        backend_module(backend).stage_point_(theta, slopes, coefs, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_theta, grad_slopes = stage_point_grads(grad_out, ctx.coefs, ctx.backend, registered=False)
        return (grad_theta, None, None, *grad_slopes)


def stage_point_autograd(theta: Tensor, slopes: list[Tensor], coefs: list[float], backend: str) -> Tensor:
    """:class:`StagePointFunction` with the registered op's argument order."""
    return StagePointFunction.apply(theta, coefs, backend, *slopes)


# -- combine ------------------------------------------------------------------------------------------


@torch.library.custom_op("rkfast::combine", mutates_args=())
def combine(grads: list[Tensor], weights: list[float], backend: str) -> Tensor:
    out = new_combine(grads, weights)
    backend_module(backend).combine_(grads, weights, out)
    return out


@combine.register_fake
def _(grads: list[Tensor], weights: list[float], backend: str) -> Tensor:
    return new_combine(grads, weights)


@torch.library.custom_op("rkfast::combine_out", mutates_args=("out",))
def combine_out(grads: list[Tensor], weights: list[float], out: Tensor, backend: str) -> None:
    backend_module(backend).combine_(grads, weights, out)


@combine_out.register_fake
def _(grads: list[Tensor], weights: list[float], out: Tensor, backend: str) -> None:
    return None


def _combine_setup(ctx, inputs, output) -> None:
    grads, ctx.weights, _ = inputs
    ctx.tasks = grads[0].shape[0]


def _combine_grad(ctx, grad_out: Tensor):
    rows = grad_out.unsqueeze(0).expand(ctx.tasks, -1)
    return [rows * w for w in ctx.weights], None, None


combine.register_autograd(_combine_grad, setup_context=_combine_setup)


# -- axpy_ --------------------------------------------------------------------------------------------


@torch.library.custom_op("rkfast::axpy_", mutates_args=("theta",))
def axpy_(theta: Tensor, d: Tensor, alpha: float, backend: str) -> None:
    backend_module(backend).axpy_(theta, d, alpha)


@axpy_.register_fake
def _(theta: Tensor, d: Tensor, alpha: float, backend: str) -> None:
    return None
