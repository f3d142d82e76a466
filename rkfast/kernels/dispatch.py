"""How one op call runs: through its registered ``torch.library`` op, its autograd path, or the kernel itself.

:func:`run` makes that choice for every op, after :mod:`rkfast.kernels` has checked the arguments and
resolved the backend:

* inside ``torch.compile`` tracing, the registered op (``torch.ops.rkfast.*``), whose fake implementation
  gives the compiler shapes and whose autograd formula gives it the backward;
* eager with autograd recording, the op's eager autograd path (the same kernels and backward);
* eager otherwise, the backend's kernel, called directly: the dispatcher's Python overhead is large next to
  these kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .registry import backend_module

__all__ = ["OpPaths", "Allocating", "STAGE_POINT", "STAGE_POINT_ELEMENTWISE", "COMBINE", "AXPY", "run", "run_in_place"]


@dataclass(frozen=True)
class Allocating:
    """The forms of an op that return a new tensor (each takes the op's inputs, then the backend name)."""

    registered: Callable[..., Tensor]
    """The registered op that returns a new tensor (it carries the autograd formula)."""
    autograd: Callable[..., Tensor]
    """The eager differentiable form of ``registered``."""
    new_out: Callable[..., Tensor]
    """Allocates the result buffer from the inputs (without the backend name)."""


@dataclass(frozen=True)
class OpPaths:
    """The ways to run one op. Every callable takes the op's inputs (then the output buffer, for the
    ``*_out`` forms), then the resolved backend name; ``kernel`` names the :class:`KernelBackend` method."""

    name: str
    kernel: str
    registered_out: Callable[..., None]
    """The registered op that writes into a given buffer, or updates its first input in place."""
    allocating: Allocating | None = None
    """The forms that return a new tensor; ``None``: the op updates its first input in place only."""


STAGE_POINT = OpPaths(
    "stage_point",
    "stage_point_",
    ops.stage_point_out,
    Allocating(ops.stage_point, ops.stage_point_autograd, ops.new_stage_point),
)
STAGE_POINT_ELEMENTWISE = OpPaths(
    "stage_point_elementwise",
    "stage_point_elementwise_",
    ops.stage_point_elementwise_out,
    Allocating(ops.stage_point_elementwise, ops.stage_point_elementwise_autograd, ops.new_stage_point),
)
COMBINE = OpPaths("combine", "combine_", ops.combine_out, Allocating(ops.combine, ops.combine, ops.new_combine))
AXPY = OpPaths("axpy_", "axpy_", ops.axpy_)


def run(op: OpPaths, backend: str, inputs: tuple, *, out: Tensor | None = None, differentiable: bool = False) -> Tensor:
    """Run ``op`` on checked ``inputs`` with the resolved ``backend``; returns the result (``out`` or a new
    tensor). ``differentiable`` (autograd is recording and an input requires grad) needs the allocating
    form: with ``out=`` it raises. An op without an allocating form runs with :func:`run_in_place`."""
    compiling = torch.compiler.is_compiling()
    if out is None:
        if op.allocating is None:
            raise TypeError(f"{op.name} updates its first input in place and has no result: run it with run_in_place")
        if compiling:
            return op.allocating.registered(*inputs, backend)
        if differentiable:
            return op.allocating.autograd(*inputs, backend)
        out = op.allocating.new_out(*inputs)
    elif differentiable:
        # torch allows no autograd formula on an op that mutates its inputs
        raise RuntimeError(
            f"{op.name}(out=...) is not differentiable; call it without out= to backpropagate, or under torch.no_grad()"
        )
    _write(op, backend, (*inputs, out), compiling)
    return out


def run_in_place(op: OpPaths, backend: str, inputs: tuple) -> None:
    """Run ``op``, which updates its first input in place, on checked ``inputs`` with the resolved ``backend``."""
    _write(op, backend, inputs, torch.compiler.is_compiling())


def _write(op: OpPaths, backend: str, args: tuple, compiling: bool) -> None:
    """The op's writing form on ``args`` (inputs, then the output buffer if any): the registered op while
    compiling, else the backend's kernel directly."""
    if compiling:
        op.registered_out(*args, backend)
    else:
        getattr(backend_module(backend), op.kernel)(*args)
