"""Fused kernels for the RK stage arithmetic, each with three backends that compute the same thing.

=================  ==========================================  ==========================================
op                 computes                                    notes
=================  ==========================================  ==========================================
``stage_point``    ``out[t] = theta - sum_l coefs[l] K_l[t]``  ``theta [N]``, ``K_l [T, N]``; differentiable
``combine``        ``out = sum_l weights[l] sum_t G_l[t]``     ``G_l [T, N]`` -> ``[N]``; the first-order
                                                               meta-direction (1/T folded into weights)
``axpy_``          ``theta += alpha * d``                      the plain RK outer step, in place
=================  ==========================================  ==========================================

Backends: ``"torch"`` (pure PyTorch: every device and dtype; the reference), ``"cpp"`` (``rkfast._C``,
compiled by ``pip install``: CPU, float32/float64, OpenMP), ``"triton"`` (CUDA: float32/float64 and
bf16/fp16 storage with fp32 accumulation; on CPU only in Triton's interpreter, ``TRITON_INTERPRET=1``).
``"auto"`` picks ``"triton"`` for CUDA tensors and ``"cpp"`` for CPU tensors when they can run them, else
``"torch"``. :func:`available` tells which backends work here.

Every op is one pass over its inputs and one launch over all parameters (flat ``[N]`` / ``[T, N]``
buffers). The ops are registered with ``torch.library`` (``torch.ops.rkfast.*``), so they compose with
autograd and ``torch.compile``. Eager calls skip the op dispatcher, whose Python overhead is large next to
these kernels: without autograd they call the backend directly; with autograd, ``stage_point`` goes
through an ``autograd.Function`` with the same kernels and the same backward.
"""

from __future__ import annotations

import os
import warnings
from typing import Literal, Sequence

import torch
from torch import Tensor

from . import cpp, ops

__all__ = ["Backend", "BACKENDS", "available", "resolve_backend", "stage_point", "combine", "axpy_"]

Backend = Literal["auto", "torch", "triton", "cpp"]
BACKENDS: tuple[str, ...] = ("torch", "triton", "cpp")

_TRITON_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_triton_status: tuple[bool, str] | None = None
_warned_no_cpp = False


def _triton() -> tuple[bool, str]:
    """(usable, why not): Triton imports, and there is a GPU or the interpreter is on."""
    global _triton_status
    if _triton_status is None:
        try:
            from . import triton as _  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
            _triton_status = (False, f"Triton is not importable ({type(exc).__name__}: {exc})")
        else:
            _triton_status = (True, "")
    return _triton_status


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> dict[str, bool]:
    """Which backends can run on this machine: ``{"torch": True, "triton": ..., "cpp": ...}``.

    ``"triton"`` needs Triton and a CUDA device (or ``TRITON_INTERPRET=1``, Triton's CPU interpreter);
    ``"cpp"`` needs the compiled extension ``rkfast._C``.
    """
    triton_ok = _triton()[0] and (torch.cuda.is_available() or _interpreting())
    return {"torch": True, "triton": triton_ok, "cpp": cpp.available()}


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for tensors of ``device`` and ``dtype``; raises if ``backend`` cannot run them."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown kernel backend {backend!r}; use one of 'auto', {', '.join(map(repr, BACKENDS))}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda" and dtype in _TRITON_DTYPES and _triton()[0]:
            return "triton"
        if device.type == "cpu" and dtype in cpp.DTYPES:
            if cpp.available():
                return "cpp"
            _warn_no_cpp()
        return "torch"
    if backend == "cpp":
        if not cpp.available():
            raise RuntimeError(f"backend 'cpp' is not available: rkfast._C failed to import ({cpp.IMPORT_ERROR}); "
                               "reinstall rkfast with a C++ compiler, or use backend='torch'")
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs on CPU tensors, got tensors on {device}")
        if dtype not in cpp.DTYPES:
            raise TypeError(f"backend 'cpp' supports float32 and float64, got {dtype}")
    if backend == "triton":
        ok, why = _triton()
        if not ok:
            raise RuntimeError(f"backend 'triton' is not available: {why}")
        if device.type == "cpu" and not _interpreting():
            raise RuntimeError("backend 'triton' runs on CUDA tensors; CPU tensors need Triton's interpreter "
                               "(set TRITON_INTERPRET=1 before importing rkfast)")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend 'triton' runs on CUDA tensors, got tensors on {device}")
        if dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend 'triton' supports float32, float64, float16 and bfloat16, got {dtype}")
    return backend


def _compiling() -> bool:
    """Inside ``torch.compile`` tracing: go through the registered ops (they have fake implementations)."""
    return torch.compiler.is_compiling()


def _warn_no_cpp() -> None:
    global _warned_no_cpp
    if not _warned_no_cpp:
        _warned_no_cpp = True
        warnings.warn(
            f"rkfast's C++ kernels are not available ({cpp.IMPORT_ERROR}); CPU tensors use the pure-PyTorch "
            "kernels. Reinstall rkfast where a C++ compiler is available for the fused CPU kernels.",
            RuntimeWarning,
            stacklevel=3,
        )


# -- argument checks (every problem is reported before any kernel runs) ---------------------------------


def _check_float(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    return t


def _check_like(name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, {ref_name} has {ref.dtype}: they must match")
    if t.device != ref.device:
        raise RuntimeError(f"{name} is on {t.device}, {ref_name} on {ref.device}: they must be on one device")


def _check_list(name: str, tensors: Sequence[Tensor], scalars: Sequence[float], scalar_name: str) -> list[Tensor]:
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence) or len(tensors) == 0:
        raise ValueError(f"{name} must be a non-empty list of [T, N] tensors")
    if len(scalars) != len(tensors):
        raise ValueError(f"{len(tensors)} {name} but {len(scalars)} {scalar_name}: one per tensor")
    first = _check_float(f"{name}[0]", tensors[0])
    if first.dim() != 2:
        raise ValueError(f"{name}[0] must be [T, N], got shape {tuple(first.shape)}")
    for i, t in enumerate(tensors):
        _check_float(f"{name}[{i}]", t)
        if t.shape != first.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, {name}[0] has {tuple(first.shape)}")
        _check_like(f"{name}[{i}]", t, first, f"{name}[0]")
    return [t.contiguous() for t in tensors]


def _check_out(out: Tensor, shape: torch.Size, ref: Tensor) -> None:
    _check_float("out", out)
    if out.shape != shape:
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    _check_like("out", out, ref, "the inputs")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def _floats(name: str, values: Sequence[float]) -> list[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}") from None


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
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cpp"`` (see the module docstring).
    """
    theta = _check_float("theta", theta)
    coefs = _floats("coefs", coefs)
    slopes = _check_list("slopes", slopes, coefs, "coefs")
    if theta.dim() != 1 or theta.shape[0] != slopes[0].shape[1]:
        raise ValueError(f"theta must be [N] with N = {slopes[0].shape[1]} (the slopes' last dimension), "
                         f"got shape {tuple(theta.shape)}")
    _check_like("theta", theta, slopes[0], "slopes[0]")
    resolved = resolve_backend(backend, theta.device, theta.dtype)
    theta = theta.contiguous()
    differentiable = torch.is_grad_enabled() and (theta.requires_grad or any(k.requires_grad for k in slopes))
    if out is None:
        if _compiling():
            return ops.stage_point(theta, slopes, coefs, resolved)
        if differentiable:
            return ops.StagePointFunction.apply(theta, coefs, resolved, *slopes)
        out = torch.empty_like(slopes[0])
    else:
        _check_out(out, slopes[0].shape, theta)
        if differentiable:
            raise RuntimeError("stage_point(out=...) is not differentiable; call it without out= to backpropagate, "
                               "or under torch.no_grad()")
    if _compiling():
        ops.stage_point_out(theta, slopes, coefs, out, resolved)
    else:  # eager and no autograd: skip the custom-op dispatcher (~13 us a call)
        ops.backend_module(resolved).stage_point_(theta, slopes, coefs, out)
    return out


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
        out: a preallocated ``[N]`` buffer to write into (then not differentiable).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cpp"``.
    """
    weights = _floats("weights", weights)
    grads = _check_list("grads", grads, weights, "weights")
    resolved = resolve_backend(backend, grads[0].device, grads[0].dtype)
    differentiable = torch.is_grad_enabled() and any(g.requires_grad for g in grads)
    if out is None:
        if differentiable or _compiling():
            return ops.combine(grads, weights, resolved)
        out = grads[0].new_empty(grads[0].shape[1:])
    else:
        _check_out(out, grads[0].shape[1:], grads[0])
        if differentiable:
            raise RuntimeError("combine(out=...) is not differentiable; call it without out= to backpropagate")
    if _compiling():
        ops.combine_out(grads, weights, out, resolved)
    else:
        ops.backend_module(resolved).combine_(grads, weights, out)
    return out


def axpy_(theta: Tensor, d: Tensor, alpha: float, *, backend: Backend = "auto") -> Tensor:
    """``theta += alpha * d`` in place (the plain outer step ``theta <- theta - lr * d`` with ``alpha=-lr``).

    ``theta`` must be contiguous; it may be a leaf that requires grad (the update is not recorded by
    autograd, as in a ``torch.optim`` step). Returns ``theta``.
    """
    theta = _check_float("theta", theta)
    d = _check_float("d", d)
    if theta.dim() != 1 or d.shape != theta.shape:
        raise ValueError(f"theta and d must both be [N] of one length, got {tuple(theta.shape)} and {tuple(d.shape)}")
    _check_like("d", d, theta, "theta")
    if not theta.is_contiguous():
        raise ValueError("theta must be contiguous (it is updated in place)")
    alpha = _floats("alpha", [alpha])[0]
    resolved = resolve_backend(backend, theta.device, theta.dtype)
    with torch.no_grad():
        if _compiling():
            ops.axpy_(theta, d.contiguous(), alpha, resolved)
        else:
            ops.backend_module(resolved).axpy_(theta, d.contiguous(), alpha)
    return theta
