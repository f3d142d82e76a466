"""The ``"triton"`` backend: CUDA tensors (float32/float64, and bf16/fp16 storage with fp32 accumulation).

With ``TRITON_INTERPRET=1`` set before this module is imported, the same kernels run in Triton's
interpreter on CPU tensors (slow; used by the tests on machines without a GPU). Importing this module
imports Triton: where Triton is not installed, the registry reports the import error as the reason.

Layout: 1-D blocks of ``BLOCK`` contiguous elements with a mask for the tail. ``stage_point`` runs one
program per (block, task), task-minor; the reductions over tasks (``combine``, the ``stage_point`` backward) run one
program per block of the parameter dimension, looping over tasks, so each output is written once. A kernel
takes up to four input streams; the wrappers process longer lists in chunks of four, each chunk folding
into the previous partial result, in the reference's order of operations.

Coefficients travel as two float32 scalars (high and low part): Triton passes Python floats as float32,
and the pair keeps ~48 bits of a float64 coefficient for the float64 kernels.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Sequence

import torch
from torch import Tensor

import triton
import triton.language as tl

# Triton decides at decoration time whether a kernel is interpreted, so the setting at import is the one
# that counts.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_STREAMS = 4

NAME = "triton"
LABEL = "Triton"
DEVICE_TYPES: tuple[str, ...] | None = ("cuda", "cpu") if INTERPRET else ("cuda",)
DTYPES: tuple[torch.dtype, ...] | None = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
AUTO_FOR: tuple[str, ...] = ("cuda",)
HINT = ("run on a machine with a CUDA GPU, or set TRITON_INTERPRET=1 before importing rkfast to run CPU "
        "tensors in Triton's interpreter")


def status() -> tuple[bool, str]:
    """Usable when a CUDA device is present or the kernels were defined for the interpreter."""
    if INTERPRET or torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device, and Triton's interpreter is off"


_FLOAT32_RANGE = (1.1754943508222875e-38, 3.4028234663852886e38)  # normal float32 magnitudes


def _pair(x: float) -> tuple[float, float]:
    """``x`` as float32 high + low parts (``hi + lo`` equals ``x`` to ~2^-48 relative).

    Triton passes Python floats as float32 scalars, hence the pair; a finite coefficient outside float32's
    normal range cannot be represented and is refused rather than rounded to 0 or infinity."""
    low, high = _FLOAT32_RANGE
    if math.isfinite(x) and x != 0.0 and not low <= abs(x) <= high:
        raise ValueError(f"the Triton kernels take coefficients of magnitude {low:.3g} to {high:.3g} (or 0); "
                         f"got {x:g}. Use backend='cpp' (CPU) or 'torch' for such coefficients")
    hi = struct.unpack("f", struct.pack("f", x))[0]
    lo = struct.unpack("f", struct.pack("f", x - hi))[0]
    return hi, lo


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _config(n: int, per_block_grid: bool) -> tuple[int, int]:
    """(BLOCK, num_warps): a heuristic table, not tuned by a block-size sweep (axpy_ in particular trails
    torch's ``add_``; the measured figures are in README.md and benchmarks/results/).

    Grids over the parameter dimension only (reductions over tasks) use smaller blocks on small ``n`` so
    enough programs exist to fill the GPU.
    """
    if INTERPRET:
        return 4096, 4  # the interpreter's cost is per program: few, large blocks
    if per_block_grid and n < (1 << 20):
        return 256, 2
    return 1024, 4


@triton.jit
def _coef(hi, lo, ACC: tl.constexpr):
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit(do_not_specialize=["theta_task_stride", "tasks", "n"])
def _stage_point_kernel(
    theta_ptr, theta_task_stride, k0, k1, k2, k3,
    c0h, c0l, c1h, c1l, c2h, c2l, c3h, c3l,
    out_ptr, tasks, n,
    NUM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # the task varies fastest between consecutive programs: the T programs of one block read the same
    # block of theta, which then comes from L2 (block-major order re-reads all of theta from memory for
    # every task once theta outgrows L2)
    pid = tl.program_id(0).to(tl.int64)
    task = pid % tasks
    offs = (pid // tasks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = task * n + offs
    acc = tl.load(theta_ptr + task * theta_task_stride + offs, mask=mask).to(ACC)
    acc -= _coef(c0h, c0l, ACC) * tl.load(k0 + row, mask=mask).to(ACC)
    if NUM > 1:
        acc -= _coef(c1h, c1l, ACC) * tl.load(k1 + row, mask=mask).to(ACC)
    if NUM > 2:
        acc -= _coef(c2h, c2l, ACC) * tl.load(k2 + row, mask=mask).to(ACC)
    if NUM > 3:
        acc -= _coef(c3h, c3l, ACC) * tl.load(k3 + row, mask=mask).to(ACC)
    tl.store(out_ptr + row, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _column_sum(ptr, tasks, n, offs, mask, ACC: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.zeros([BLOCK], dtype=ACC)
    for t in range(tasks):
        total += tl.load(ptr + t * n + offs, mask=mask, other=0.0).to(ACC)
    return total


@triton.jit(do_not_specialize=["tasks", "n"])
def _combine_kernel(
    g0, g1, g2, g3,
    w0h, w0l, w1h, w1l, w2h, w2l, w3h, w3l,
    out_ptr, tasks, n,
    NUM: tl.constexpr, ACCUMULATE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    n64 = n.to(tl.int64)
    if ACCUMULATE:
        acc = tl.load(out_ptr + offs, mask=mask).to(ACC)
        acc += _coef(w0h, w0l, ACC) * _column_sum(g0, tasks, n64, offs, mask, ACC, BLOCK)
    else:
        acc = _coef(w0h, w0l, ACC) * _column_sum(g0, tasks, n64, offs, mask, ACC, BLOCK)
    if NUM > 1:
        acc += _coef(w1h, w1l, ACC) * _column_sum(g1, tasks, n64, offs, mask, ACC, BLOCK)
    if NUM > 2:
        acc += _coef(w2h, w2l, ACC) * _column_sum(g2, tasks, n64, offs, mask, ACC, BLOCK)
    if NUM > 3:
        acc += _coef(w3h, w3l, ACC) * _column_sum(g3, tasks, n64, offs, mask, ACC, BLOCK)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["tasks", "n"])
def _stage_point_backward_kernel(
    grad_out, grad_theta, o0, o1, o2, o3,
    c0h, c0l, c1h, c1l, c2h, c2l, c3h, c3l,
    tasks, n,
    NUM: tl.constexpr, WRITE_THETA: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    n64 = n.to(tl.int64)
    c0 = -_coef(c0h, c0l, ACC)
    c1 = -_coef(c1h, c1l, ACC)
    c2 = -_coef(c2h, c2l, ACC)
    c3 = -_coef(c3h, c3l, ACC)
    total = tl.zeros([BLOCK], dtype=ACC)
    for t in range(tasks):
        row = t * n64 + offs
        g = tl.load(grad_out + row, mask=mask, other=0.0).to(ACC)
        total += g
        tl.store(o0 + row, (c0 * g).to(o0.dtype.element_ty), mask=mask)
        if NUM > 1:
            tl.store(o1 + row, (c1 * g).to(o1.dtype.element_ty), mask=mask)
        if NUM > 2:
            tl.store(o2 + row, (c2 * g).to(o2.dtype.element_ty), mask=mask)
        if NUM > 3:
            tl.store(o3 + row, (c3 * g).to(o3.dtype.element_ty), mask=mask)
    if WRITE_THETA:
        tl.store(grad_theta + offs, total.to(grad_theta.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n"])
def _axpy_kernel(theta_ptr, d_ptr, ah, al, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(theta_ptr + offs, mask=mask).to(ACC)
    x += _coef(ah, al, ACC) * tl.load(d_ptr + offs, mask=mask).to(ACC)
    tl.store(theta_ptr + offs, x.to(theta_ptr.dtype.element_ty), mask=mask)


def _chunks(tensors: Sequence[Tensor], coefs: Sequence[float]):
    """Groups of at most four (tensors padded to four, flat coefficient pairs padded with zeros)."""
    for start in range(0, len(tensors), MAX_STREAMS):
        group = list(tensors[start : start + MAX_STREAMS])
        pairs = [p for c in coefs[start : start + MAX_STREAMS] for p in _pair(float(c))]
        num = len(group)
        group += [group[0]] * (MAX_STREAMS - num)
        pairs += [0.0] * (2 * MAX_STREAMS - len(pairs))
        yield start, num, group, pairs


def _tasks_and_n(t: Tensor) -> tuple[int, int]:
    return (1, t.shape[0]) if t.dim() == 1 else (t.shape[0], t.shape[1])


def stage_point_(theta: Tensor, slopes: Sequence[Tensor], coefs: Sequence[float], out: Tensor) -> None:
    tasks, n = _tasks_and_n(out)
    block, warps = _config(n, per_block_grid=False)
    grid = (triton.cdiv(n, block) * tasks,)
    acc = _acc(out.dtype)
    for start, num, group, pairs in _chunks(slopes, coefs):
        # later chunks continue from the partial stage point already in `out` (row stride n, not 0)
        base, stride = (theta, 0) if start == 0 else (out, n)
        _stage_point_kernel[grid](base, stride, *group, *pairs, out, tasks, n,
                                  NUM=num, ACC=acc, BLOCK=block, num_warps=warps)


def stage_point_backward_(grad_out: Tensor, coefs: Sequence[float], grad_theta: Tensor | None,
                          grad_slopes: Sequence[Tensor]) -> None:
    tasks, n = _tasks_and_n(grad_out)
    block, warps = _config(n, per_block_grid=True)
    grid = (triton.cdiv(n, block),)
    acc = _acc(grad_out.dtype)
    for start, num, group, pairs in _chunks(grad_slopes, coefs):
        write_theta = start == 0 and grad_theta is not None
        _stage_point_backward_kernel[grid](grad_out, grad_theta if write_theta else grad_out, *group, *pairs,
                                           tasks, n, NUM=num, WRITE_THETA=write_theta, ACC=acc,
                                           BLOCK=block, num_warps=warps)


def combine_(grads: Sequence[Tensor], weights: Sequence[float], out: Tensor) -> None:
    tasks, n = _tasks_and_n(grads[0])
    block, warps = _config(n, per_block_grid=True)
    grid = (triton.cdiv(n, block),)
    acc = _acc(out.dtype)
    for start, num, group, pairs in _chunks(grads, weights):
        _combine_kernel[grid](*group, *pairs, out, tasks, n,
                              NUM=num, ACCUMULATE=start > 0, ACC=acc, BLOCK=block, num_warps=warps)


def axpy_(theta: Tensor, d: Tensor, alpha: float) -> None:
    n = theta.numel()
    block, warps = _config(n, per_block_grid=False)
    _axpy_kernel[(triton.cdiv(n, block),)](theta, d, *_pair(float(alpha)), n,
                                           ACC=_acc(theta.dtype), BLOCK=block, num_warps=warps)
