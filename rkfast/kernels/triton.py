"""The ``"triton"`` backend: CUDA tensors (float32/float64, and bf16/fp16 storage with fp32 accumulation).

With ``TRITON_INTERPRET=1`` set before this module is imported, the same kernels run in Triton's
interpreter on CPU tensors (slow; used by the tests on machines without a GPU). Importing this module
imports Triton: where Triton is not installed, the registry reports the import error as the reason.

Layout: 1-D blocks of ``BLOCK`` contiguous elements with a mask for the tail. ``stage_point`` runs one
program per (block, task), task-minor; the reductions over tasks (``combine``, the ``stage_point`` backward) run one
program per block of the parameter dimension, looping over tasks, so each output is written once. A kernel
takes up to four input streams; the wrappers process longer lists in chunks of four, each chunk folding
into the previous partial result, in the reference's order of operations.

``stage_point_elementwise`` has the same layout, with an ``[N]`` coefficient vector loaded per stream
(its blocks of theta and the coefficients are shared by the T programs of a block); its backward runs one
program per block, looping over tasks, with the coefficients' blocks loaded once, writing theta's and the
slopes' gradients and accumulating the coefficients' (a sum over tasks) in registers, so every output is
written once.

Scalar coefficients travel as two float32 scalars (high and low part): Triton passes Python floats as float32,
and the pair keeps ~48 bits of a float64 coefficient for the float64 kernels.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

# Triton decides at decoration time whether a kernel is interpreted, so the setting at import is the one
# that counts.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_STREAMS = 4

NAME = "triton"
LABEL = "Triton"
DEVICE_TYPES: tuple[str, ...] | None = ("cuda", "cpu") if INTERPRET else ("cuda",)
DTYPES: tuple[torch.dtype, ...] | None = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
AUTO_FOR: tuple[str, ...] = ("cuda",)
HINT = (
    "run on a machine with a CUDA GPU, or set TRITON_INTERPRET=1 before importing rkfast to run CPU "
    "tensors in Triton's interpreter"
)


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
        raise ValueError(
            f"the Triton kernels take coefficients of magnitude {low:.3g} to {high:.3g} (or 0); "
            f"got {x:g}. Use backend='cpp' (CPU) or 'torch' for such coefficients"
        )
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
    theta_ptr,
    theta_task_stride,
    k0,
    k1,
    k2,
    k3,
    c0h,
    c0l,
    c1h,
    c1l,
    c2h,
    c2l,
    c3h,
    c3l,
    out_ptr,
    tasks,
    n,
    NUM: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
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
    g0,
    g1,
    g2,
    g3,
    w0h,
    w0l,
    w1h,
    w1l,
    w2h,
    w2l,
    w3h,
    w3l,
    out_ptr,
    tasks,
    n,
    NUM: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
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
    grad_out,
    grad_theta,
    o0,
    o1,
    o2,
    o3,
    c0h,
    c0l,
    c1h,
    c1l,
    c2h,
    c2l,
    c3h,
    c3l,
    tasks,
    n,
    NUM: tl.constexpr,
    WRITE_THETA: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
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


@triton.jit(do_not_specialize=["theta_task_stride", "tasks", "n"])
def _stage_point_elementwise_kernel(
    theta_ptr,
    theta_task_stride,
    k0,
    k1,
    k2,
    k3,
    c0,
    c1,
    c2,
    c3,
    out_ptr,
    tasks,
    n,
    NUM: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # task-minor program order, as _stage_point_kernel: theta's and the coefficients' blocks come from L2
    pid = tl.program_id(0).to(tl.int64)
    task = pid % tasks
    offs = (pid // tasks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = task * n + offs
    acc = tl.load(theta_ptr + task * theta_task_stride + offs, mask=mask).to(ACC)
    acc -= tl.load(c0 + offs, mask=mask).to(ACC) * tl.load(k0 + row, mask=mask).to(ACC)
    if NUM > 1:
        acc -= tl.load(c1 + offs, mask=mask).to(ACC) * tl.load(k1 + row, mask=mask).to(ACC)
    if NUM > 2:
        acc -= tl.load(c2 + offs, mask=mask).to(ACC) * tl.load(k2 + row, mask=mask).to(ACC)
    if NUM > 3:
        acc -= tl.load(c3 + offs, mask=mask).to(ACC) * tl.load(k3 + row, mask=mask).to(ACC)
    tl.store(out_ptr + row, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coef_block(c_ptr, offs, mask, WRITE_SLOPES: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """A block of a coefficient vector, loaded once for all tasks (zeros when the slopes' gradient is off)."""
    if WRITE_SLOPES:
        return tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC)
    return tl.zeros([BLOCK], dtype=ACC)


@triton.jit
def _elementwise_stream(
    g, c, row, mask, k_ptr, o_ptr, total, WRITE_SLOPES: tl.constexpr, WRITE_COEFS: tl.constexpr, ACC: tl.constexpr
):
    """One stream's share of a task row: stores ``-c * g`` and returns ``total + g * k``."""
    if WRITE_SLOPES:
        tl.store(o_ptr + row, (-(c * g)).to(o_ptr.dtype.element_ty), mask=mask)
    if WRITE_COEFS:
        total += g * tl.load(k_ptr + row, mask=mask, other=0.0).to(ACC)
    return total


@triton.jit(do_not_specialize=["tasks", "n"])
def _stage_point_elementwise_backward_kernel(
    grad_out,
    grad_theta,
    k0,
    k1,
    k2,
    k3,
    c0,
    c1,
    c2,
    c3,
    o0,
    o1,
    o2,
    o3,
    gc0,
    gc1,
    gc2,
    gc3,
    tasks,
    n,
    NUM: tl.constexpr,
    WRITE_THETA: tl.constexpr,
    WRITE_SLOPES: tl.constexpr,
    WRITE_COEFS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    n64 = n.to(tl.int64)
    v0 = _coef_block(c0, offs, mask, WRITE_SLOPES, ACC, BLOCK)
    v1 = _coef_block(c1, offs, mask, WRITE_SLOPES and NUM > 1, ACC, BLOCK)
    v2 = _coef_block(c2, offs, mask, WRITE_SLOPES and NUM > 2, ACC, BLOCK)
    v3 = _coef_block(c3, offs, mask, WRITE_SLOPES and NUM > 3, ACC, BLOCK)
    total = tl.zeros([BLOCK], dtype=ACC)
    s0 = tl.zeros([BLOCK], dtype=ACC)
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    s3 = tl.zeros([BLOCK], dtype=ACC)
    for t in range(tasks):
        row = t * n64 + offs
        g = tl.load(grad_out + row, mask=mask, other=0.0).to(ACC)
        total += g
        s0 = _elementwise_stream(g, v0, row, mask, k0, o0, s0, WRITE_SLOPES, WRITE_COEFS, ACC)
        if NUM > 1:
            s1 = _elementwise_stream(g, v1, row, mask, k1, o1, s1, WRITE_SLOPES, WRITE_COEFS, ACC)
        if NUM > 2:
            s2 = _elementwise_stream(g, v2, row, mask, k2, o2, s2, WRITE_SLOPES, WRITE_COEFS, ACC)
        if NUM > 3:
            s3 = _elementwise_stream(g, v3, row, mask, k3, o3, s3, WRITE_SLOPES, WRITE_COEFS, ACC)
    if WRITE_THETA:
        tl.store(grad_theta + offs, total.to(grad_theta.dtype.element_ty), mask=mask)
    if WRITE_COEFS:
        tl.store(gc0 + offs, (-s0).to(gc0.dtype.element_ty), mask=mask)
        if NUM > 1:
            tl.store(gc1 + offs, (-s1).to(gc1.dtype.element_ty), mask=mask)
        if NUM > 2:
            tl.store(gc2 + offs, (-s2).to(gc2.dtype.element_ty), mask=mask)
        if NUM > 3:
            tl.store(gc3 + offs, (-s3).to(gc3.dtype.element_ty), mask=mask)


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
        _stage_point_kernel[grid](
            base, stride, *group, *pairs, out, tasks, n, NUM=num, ACC=acc, BLOCK=block, num_warps=warps
        )


def stage_point_backward_(
    grad_out: Tensor, coefs: Sequence[float], grad_theta: Tensor | None, grad_slopes: Sequence[Tensor]
) -> None:
    tasks, n = _tasks_and_n(grad_out)
    block, warps = _config(n, per_block_grid=True)
    grid = (triton.cdiv(n, block),)
    acc = _acc(grad_out.dtype)
    for start, num, group, pairs in _chunks(grad_slopes, coefs):
        write_theta = start == 0 and grad_theta is not None
        _stage_point_backward_kernel[grid](
            grad_out,
            grad_theta if write_theta else grad_out,
            *group,
            *pairs,
            tasks,
            n,
            NUM=num,
            WRITE_THETA=write_theta,
            ACC=acc,
            BLOCK=block,
            num_warps=warps,
        )


def _groups(*lists: Sequence[Tensor] | None, fill: Tensor):
    """``(start, num, [list0's group of four, padded], [list1's ...], ...)`` over chunks of four streams;
    a list that is ``None`` or empty (an output that is skipped) is all ``fill``."""
    count = max(len(x) for x in lists if x)
    for start in range(0, count, MAX_STREAMS):
        num = min(MAX_STREAMS, count - start)
        groups = []
        for x in lists:
            group = list(x[start : start + MAX_STREAMS]) if x else [fill] * num
            groups.append(group + [group[0]] * (MAX_STREAMS - num))
        yield start, num, groups


def stage_point_elementwise_(theta: Tensor, slopes: Sequence[Tensor], coefs: Sequence[Tensor], out: Tensor) -> None:
    tasks, n = _tasks_and_n(out)
    block, warps = _config(n, per_block_grid=False)
    grid = (triton.cdiv(n, block) * tasks,)
    acc = _acc(out.dtype)
    for start, num, (ks, cs) in _groups(slopes, coefs, fill=out):
        # later chunks continue from the partial stage point already in `out` (row stride n, not 0)
        base, stride = (theta, 0) if start == 0 else (out, n)
        _stage_point_elementwise_kernel[grid](
            base, stride, *ks, *cs, out, tasks, n, NUM=num, ACC=acc, BLOCK=block, num_warps=warps
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
    block, warps = _config(n, per_block_grid=True)
    grid = (triton.cdiv(n, block),)
    acc = _acc(grad_out.dtype)
    write_slopes, write_coefs = bool(grad_slopes), bool(grad_coefs)
    if grad_theta is None and not write_slopes and not write_coefs:
        return
    lists = (slopes if write_coefs else None, coefs if write_slopes else None, grad_slopes, grad_coefs)
    if not (write_slopes or write_coefs):  # theta's gradient alone: one launch that touches no stream
        lists = ([grad_out], None, None, None)
    for start, num, (ks, cs, os_, gcs) in _groups(*lists, fill=grad_out):
        write_theta = start == 0 and grad_theta is not None
        _stage_point_elementwise_backward_kernel[grid](
            grad_out,
            grad_theta if write_theta else grad_out,
            *ks,
            *cs,
            *os_,
            *gcs,
            tasks,
            n,
            NUM=num,
            WRITE_THETA=write_theta,
            WRITE_SLOPES=write_slopes,
            WRITE_COEFS=write_coefs,
            ACC=acc,
            BLOCK=block,
            num_warps=warps,
        )


def combine_(grads: Sequence[Tensor], weights: Sequence[float], out: Tensor) -> None:
    tasks, n = _tasks_and_n(grads[0])
    block, warps = _config(n, per_block_grid=True)
    grid = (triton.cdiv(n, block),)
    acc = _acc(out.dtype)
    for start, num, group, pairs in _chunks(grads, weights):
        _combine_kernel[grid](
            *group, *pairs, out, tasks, n, NUM=num, ACCUMULATE=start > 0, ACC=acc, BLOCK=block, num_warps=warps
        )


def axpy_(theta: Tensor, d: Tensor, alpha: float) -> None:
    n = theta.numel()
    block, warps = _config(n, per_block_grid=False)
    _axpy_kernel[(triton.cdiv(n, block),)](
        theta, d, *_pair(float(alpha)), n, ACC=_acc(theta.dtype), BLOCK=block, num_warps=warps
    )
