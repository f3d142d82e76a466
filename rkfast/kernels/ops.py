"""The ops as ``torch.library`` custom ops: ``rkfast::stage_point``, ``rkfast::stage_point_elementwise``,
``rkfast::combine``, ``rkfast::axpy_``.

Each op takes the (already resolved) backend name as its last argument and runs that backend's kernel;
a fake implementation gives shapes to ``torch.compile``, and autograd formulas make ``stage_point`` and
``combine`` differentiable. ``stage_point``'s backward is itself a fused op (``stage_point_backward``):
one pass over the incoming gradient gives the sum over tasks (for theta) and every slope's gradient;
likewise ``stage_point_elementwise_backward``, which also gives the coefficient vectors' gradients (reduced
over tasks), and computes only the gradients that are needed.
When the backward must be differentiable again (``create_graph``), it is written in plain torch ops.

The ``*_out`` variants write into a caller's buffer (no allocation; not differentiable, as torch does not
allow autograd formulas on ops that mutate their inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .registry import backend_module

__all__ = [
    "new_stage_point",
    "new_combine",
    "stage_point_autograd",
    "stage_point_grads",
    "StagePointFunction",
    "stage_point_elementwise_autograd",
    "stage_point_elementwise_grads",
    "StagePointElementwiseFunction",
]


def new_stage_point(theta: Tensor, slopes: Sequence[Tensor], coefs: Sequence[float] | Sequence[Tensor]) -> Tensor:
    """An uninitialised buffer for ``stage_point``'s (or ``stage_point_elementwise``'s) result: ``[T, N]`` like
    the slopes."""
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


def stage_point_grads(
    grad_out: Tensor, coefs: list[float], backend: str, *, registered: bool
) -> tuple[Tensor, list[Tensor]]:
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


# -- stage_point_elementwise ----------------------------------------------------------------------------


@torch.library.custom_op("rkfast::stage_point_elementwise", mutates_args=())
def stage_point_elementwise(theta: Tensor, slopes: list[Tensor], coefs: list[Tensor], backend: str) -> Tensor:
    out = new_stage_point(theta, slopes, coefs)
    backend_module(backend).stage_point_elementwise_(theta, slopes, coefs, out)
    return out


@stage_point_elementwise.register_fake
def _(theta: Tensor, slopes: list[Tensor], coefs: list[Tensor], backend: str) -> Tensor:
    return new_stage_point(theta, slopes, coefs)


@torch.library.custom_op("rkfast::stage_point_elementwise_out", mutates_args=("out",))
def stage_point_elementwise_out(
    theta: Tensor, slopes: list[Tensor], coefs: list[Tensor], out: Tensor, backend: str
) -> None:
    backend_module(backend).stage_point_elementwise_(theta, slopes, coefs, out)


@stage_point_elementwise_out.register_fake
def _(theta: Tensor, slopes: list[Tensor], coefs: list[Tensor], out: Tensor, backend: str) -> None:
    return None


def _count(slopes: Sequence[Tensor], coefs: Sequence[Tensor]) -> int:
    """The number of slopes: the backward receives the slopes only when the coefficients' gradient is
    wanted, and the coefficients only when the slopes' is."""
    return max(len(slopes), len(coefs))


def _new_elementwise_grads(
    grad_out: Tensor, count: int, want_theta: bool, want_slopes: bool, want_coefs: bool
) -> tuple[Tensor | None, list[Tensor] | None, list[Tensor] | None]:
    grad_theta = grad_out.new_empty(grad_out.shape[1:]) if want_theta else None
    grad_slopes = [torch.empty_like(grad_out) for _ in range(count)] if want_slopes else None
    grad_coefs = [grad_out.new_empty(grad_out.shape[1:]) for _ in range(count)] if want_coefs else None
    return grad_theta, grad_slopes, grad_coefs


def _elementwise_grads_kernel(
    grad_out: Tensor,
    slopes: list[Tensor],
    coefs: list[Tensor],
    want_theta: bool,
    want_slopes: bool,
    want_coefs: bool,
    backend: str,
):
    grads = _new_elementwise_grads(grad_out, _count(slopes, coefs), want_theta, want_slopes, want_coefs)
    backend_module(backend).stage_point_elementwise_backward_(grad_out, slopes, coefs, *grads)
    return grads


def _flatten_grads(grad_theta, grad_slopes, grad_coefs) -> list[Tensor]:
    return [*(() if grad_theta is None else (grad_theta,)), *(grad_slopes or ()), *(grad_coefs or ())]


@torch.library.custom_op("rkfast::stage_point_elementwise_backward", mutates_args=())
def stage_point_elementwise_backward(
    grad_out: Tensor,
    slopes: list[Tensor],
    coefs: list[Tensor],
    want_theta: bool,
    want_slopes: bool,
    want_coefs: bool,
    backend: str,
) -> list[Tensor]:
    """The wanted ones of ``[sum_t grad_out[t]]``, ``[-c * grad_out for c in coefs]`` and
    ``[-sum_t grad_out[t] * k[t] for k in slopes]``, concatenated, in one pass."""
    return _flatten_grads(
        *_elementwise_grads_kernel(grad_out, slopes, coefs, want_theta, want_slopes, want_coefs, backend)
    )


@stage_point_elementwise_backward.register_fake
def _(
    grad_out: Tensor,
    slopes: list[Tensor],
    coefs: list[Tensor],
    want_theta: bool,
    want_slopes: bool,
    want_coefs: bool,
    backend: str,
) -> list[Tensor]:
    return _flatten_grads(*_new_elementwise_grads(grad_out, _count(slopes, coefs), want_theta, want_slopes, want_coefs))


def stage_point_elementwise_grads(
    grad_out: Tensor,
    slopes: list[Tensor],
    coefs: list[Tensor],
    wanted: tuple[bool, bool, bool],
    backend: str,
    *,
    registered: bool,
) -> tuple[Tensor | None, list[Tensor] | None, list[Tensor] | None]:
    """The backward of ``stage_point_elementwise``: ``(grad_theta, grad_slopes, grad_coefs)``, each ``None``
    where ``wanted`` (theta, slopes, coefs) says it is not needed. ``registered``: as in
    :func:`stage_point_grads`."""
    want_theta, want_slopes, want_coefs = wanted
    if torch.is_grad_enabled() and (grad_out.requires_grad or any(t.requires_grad for t in (*slopes, *coefs))):
        # create_graph: this backward is itself differentiated, so keep it in differentiable torch ops
        return (
            grad_out.sum(0) if want_theta else None,
            [grad_out * -c for c in coefs] if want_slopes else None,
            [-(grad_out * k).sum(0) for k in slopes] if want_coefs else None,
        )
    grad_out = grad_out.contiguous()
    if registered or torch.compiler.is_compiling():
        flat = list(
            torch.ops.rkfast.stage_point_elementwise_backward(
                grad_out, slopes, coefs, want_theta, want_slopes, want_coefs, backend
            )
        )
        count = _count(slopes, coefs)
        grad_theta = flat.pop(0) if want_theta else None
        grad_slopes = flat[:count] if want_slopes else None
        grad_coefs = flat[-count:] if want_coefs else None
        return grad_theta, grad_slopes, grad_coefs
    return _elementwise_grads_kernel(grad_out, slopes, coefs, want_theta, want_slopes, want_coefs, backend)


def _elementwise_setup(ctx, inputs, output) -> None:
    theta, slopes, coefs, ctx.backend = inputs
    ctx.count = len(slopes)
    ctx.wanted = (theta.requires_grad, any(k.requires_grad for k in slopes), any(c.requires_grad for c in coefs))
    # the slopes are needed for the coefficients' gradient, the coefficients for the slopes'
    ctx.save_for_backward(*(slopes if ctx.wanted[2] else ()), *(coefs if ctx.wanted[1] else ()))


def _saved_slopes_and_coefs(ctx) -> tuple[list[Tensor], list[Tensor]]:
    saved = list(ctx.saved_tensors)
    slopes = saved[: ctx.count] if ctx.wanted[2] else []
    coefs = saved[-ctx.count :] if ctx.wanted[1] else []
    return slopes, coefs


def _elementwise_grad(ctx, grad_out: Tensor):
    slopes, coefs = _saved_slopes_and_coefs(ctx)
    grad_theta, grad_slopes, grad_coefs = stage_point_elementwise_grads(
        grad_out, slopes, coefs, ctx.wanted, ctx.backend, registered=True
    )
    none = [None] * ctx.count
    return grad_theta, grad_slopes or none, grad_coefs or none, None


stage_point_elementwise.register_autograd(_elementwise_grad, setup_context=_elementwise_setup)


class StagePointElementwiseFunction(torch.autograd.Function):
    """``stage_point_elementwise`` for eager autograd: the same kernels and backward as the registered op."""

    @staticmethod
    def forward(ctx, theta: Tensor, backend: str, count: int, *slopes_and_coefs: Tensor) -> Tensor:
        slopes, coefs = list(slopes_and_coefs[:count]), list(slopes_and_coefs[count:])
        out = new_stage_point(theta, slopes, coefs)
        backend_module(backend).stage_point_elementwise_(theta, slopes, coefs, out)
        needs = ctx.needs_input_grad
        ctx.backend, ctx.count = backend, count
        ctx.wanted = (needs[0], any(needs[3 : 3 + count]), any(needs[3 + count :]))
        ctx.save_for_backward(*(slopes if ctx.wanted[2] else ()), *(coefs if ctx.wanted[1] else ()))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        slopes, coefs = _saved_slopes_and_coefs(ctx)
        grad_theta, grad_slopes, grad_coefs = stage_point_elementwise_grads(
            grad_out, slopes, coefs, ctx.wanted, ctx.backend, registered=False
        )
        none = [None] * ctx.count
        return (grad_theta, None, None, *(grad_slopes or none), *(grad_coefs or none))


def stage_point_elementwise_autograd(theta: Tensor, slopes: list[Tensor], coefs: list[Tensor], backend: str) -> Tensor:
    """:class:`StagePointElementwiseFunction` with the registered op's argument order."""
    return StagePointElementwiseFunction.apply(theta, backend, len(slopes), *slopes, *coefs)


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
