"""Fused kernels for the RK stage arithmetic, each with several backends that compute the same thing.

=================  ==========================================  ==========================================
op                 computes                                    notes
=================  ==========================================  ==========================================
``stage_point``    ``out[t] = theta - sum_l coefs[l] K_l[t]``  ``theta [N]``, ``K_l [T, N]``; differentiable
``stage_point_``   ``out[t] = theta - sum_l c_l * K_l[t]``      ``c_l [N]`` vectors (per-element rates,
``elementwise``                                                Meta-SGD); differentiable in theta, K, c
``combine``        ``out = sum_l weights[l] sum_t G_l[t]``     ``G_l [T, N]`` -> ``[N]``; the first-order
                                                               meta-direction (1/T folded into weights)
``axpy_``          ``theta += alpha * d``                      the plain RK outer step, in place
=================  ==========================================  ==========================================

Backends are modules listed in :mod:`.registry`, each declaring the devices and dtypes it runs
(:class:`KernelBackend`): ``"torch"`` (:mod:`.reference`, pure PyTorch: every device and dtype; the
reference and the fallback), ``"triton"`` (:mod:`.triton`: CUDA, float32/float64 and bf16/fp16 storage with
fp32 accumulation; CPU tensors only in Triton's interpreter, ``TRITON_INTERPRET=1``) and ``"cpp"``
(:mod:`.cpp`, ``rkfast._C`` compiled by ``pip install``: CPU, float32/float64, OpenMP). ``"auto"`` picks the
backend preferred for the tensors' device type (Triton for CUDA, C++ for CPU) when it can run them, else
``"torch"``, warning once when the preferred backend is unusable (e.g. ``rkfast._C`` was not built: no
compiler at install time), with the reason and how to fix it. :func:`available` tells which backends work
here, :func:`runnable_targets` on which devices.

Every op is one pass over its inputs and one launch over all parameters (flat ``[N]`` / ``[T, N]``
buffers). The ops are registered with ``torch.library`` (``torch.ops.rkfast.*``), so they compose with
autograd and ``torch.compile``. Eager calls skip the op dispatcher, whose Python overhead is large next to
these kernels: without autograd they call the backend directly; with autograd, ``stage_point`` and
``stage_point_elementwise`` go through an ``autograd.Function`` with the same kernels and the same backward
(:mod:`.dispatch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import dispatch, registry
from .backend import KernelBackend
from .checks import check_float, check_like, check_list, check_out, check_vectors, floats
from .registry import Backend, available, backend_choices, resolve_backend, runnable_targets

__all__ = [
    "Backend",
    "BACKENDS",
    "KernelBackend",
    "available",
    "backend_choices",
    "resolve_backend",
    "runnable_targets",
    "stage_point",
    "stage_point_elementwise",
    "combine",
    "axpy_",
]

BACKENDS: tuple[str, ...] = tuple(registry.REGISTRY)
"""The registered backend names, in registry order (``backend=`` also takes ``"auto"``)."""


# -- the public ops -----------------------------------------------------------------------------------


def stage_point(
    theta: Tensor,
    slopes: Sequence[Tensor],
    coefs: Sequence[float],
    *,
    out: Tensor | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """One RK stage point of every task: ``out[t] = theta - sum_l coefs[l] * slopes[l][t]``, ``[T, N]``.

    Args:
        theta: the meta-parameters ``[N]``, broadcast over the tasks.
        slopes: ``s'`` per-task slopes ``[T, N]`` (support gradients of earlier stages).
        coefs: ``s'`` coefficients (``h * A[j][l]`` for stage ``j``).
        out: a preallocated ``[T, N]`` buffer to write into (no allocation); the result is then not
            differentiable. Without ``out`` the result is a new tensor, differentiable w.r.t. ``theta``
            and ``slopes`` (the backward is one fused pass too).
        backend: ``"auto"`` or a registered backend name (see the module docstring).
    """
    theta = check_float("theta", theta)
    coefs = floats("coefs", coefs)
    slopes = check_list("slopes", slopes, coefs, "coefs")
    if theta.dim() != 1 or theta.shape[0] != slopes[0].shape[1]:
        raise ValueError(
            f"theta must be [N] with N = {slopes[0].shape[1]} (the slopes' last dimension), "
            f"got shape {tuple(theta.shape)}"
        )
    check_like("theta", theta, slopes[0], "slopes[0]")
    resolved = resolve_backend(backend, theta.device, theta.dtype)
    if out is not None:
        check_out(out, slopes[0].shape, theta)
    differentiable = torch.is_grad_enabled() and (theta.requires_grad or any(k.requires_grad for k in slopes))
    return dispatch.run(
        dispatch.STAGE_POINT, resolved, (theta.contiguous(), slopes, coefs), out=out, differentiable=differentiable
    )


def stage_point_elementwise(
    theta: Tensor,
    slopes: Sequence[Tensor],
    coefs: Sequence[Tensor],
    *,
    out: Tensor | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """One RK stage point with per-element coefficients: ``out[t] = theta - sum_l coefs[l] * slopes[l][t]``
    (``*`` elementwise), ``[T, N]``: learned per-parameter inner rates (Meta-SGD), ``coefs[l] = h A[j][l] * rate``.

    Args:
        theta: the meta-parameters ``[N]``, broadcast over the tasks.
        slopes: ``s'`` per-task slopes ``[T, N]``.
        coefs: ``s'`` coefficient vectors ``[N]`` (theta's dtype and device), shared by the tasks.
        out: a preallocated ``[T, N]`` buffer to write into (no allocation); the result is then not
            differentiable. Without ``out`` the result is a new tensor, differentiable w.r.t. ``theta``,
            ``slopes`` and ``coefs`` (one fused backward pass; ``coefs``' gradient sums over the tasks).
        backend: ``"auto"`` or a registered backend name (see the module docstring).
    """
    theta = check_float("theta", theta)
    if isinstance(coefs, Tensor) or not isinstance(coefs, Sequence):
        raise ValueError(
            f"coefs must be a list of [N] tensors, one per slope; got {type(coefs).__name__} "
            "(for scalar coefficients use stage_point)"
        )
    slopes = check_list("slopes", slopes, coefs, "coefs")
    if theta.dim() != 1 or theta.shape[0] != slopes[0].shape[1]:
        raise ValueError(
            f"theta must be [N] with N = {slopes[0].shape[1]} (the slopes' last dimension), "
            f"got shape {tuple(theta.shape)}"
        )
    check_like("theta", theta, slopes[0], "slopes[0]")
    coefs = check_vectors("coefs", coefs, len(slopes), "slopes", theta, "theta")
    resolved = resolve_backend(backend, theta.device, theta.dtype)
    if out is not None:
        check_out(out, slopes[0].shape, theta)
    differentiable = torch.is_grad_enabled() and (
        theta.requires_grad or any(k.requires_grad for k in slopes) or any(c.requires_grad for c in coefs)
    )
    return dispatch.run(
        dispatch.STAGE_POINT_ELEMENTWISE,
        resolved,
        (theta.contiguous(), slopes, coefs),
        out=out,
        differentiable=differentiable,
    )


def combine(
    grads: Sequence[Tensor],
    weights: Sequence[float],
    *,
    out: Tensor | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Per-task gradients reduced to one direction: ``out = sum_l weights[l] * sum_t grads[l][t]``, ``[N]``.

    Args:
        grads: ``s'`` per-task gradients ``[T, N]``.
        weights: ``s'`` weights (``b_j / T`` for the first-order meta-direction).
        out: a preallocated ``[N]`` buffer to write into (then not differentiable). Without ``out`` the
            result is a new tensor, differentiable w.r.t. ``grads``.
        backend: ``"auto"`` or a registered backend name.
    """
    weights = floats("weights", weights)
    grads = check_list("grads", grads, weights, "weights")
    resolved = resolve_backend(backend, grads[0].device, grads[0].dtype)
    if out is not None:
        check_out(out, grads[0].shape[1:], grads[0])
    differentiable = torch.is_grad_enabled() and any(g.requires_grad for g in grads)
    return dispatch.run(dispatch.COMBINE, resolved, (grads, weights), out=out, differentiable=differentiable)


def axpy_(theta: Tensor, d: Tensor, alpha: float, *, backend: Backend = "auto") -> Tensor:
    """``theta += alpha * d`` in place (the plain outer step ``theta <- theta - lr * d`` with ``alpha=-lr``).

    ``theta`` must be contiguous; it may be a leaf that requires grad (the update is not recorded by
    autograd, as in a ``torch.optim`` step). Returns ``theta``.
    """
    theta = check_float("theta", theta)
    d = check_float("d", d)
    if theta.dim() != 1 or d.shape != theta.shape:
        raise ValueError(f"theta and d must both be [N] of one length, got {tuple(theta.shape)} and {tuple(d.shape)}")
    check_like("d", d, theta, "theta")
    if not theta.is_contiguous():
        raise ValueError("theta must be contiguous (it is updated in place)")
    alpha = floats("alpha", [alpha])[0]
    resolved = resolve_backend(backend, theta.device, theta.dtype)
    with torch.no_grad():
        dispatch.run_in_place(dispatch.AXPY, resolved, (theta, d.contiguous(), alpha))
    return theta
