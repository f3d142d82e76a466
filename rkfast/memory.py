"""Bounding a meta-step's peak memory: task chunks, stage recomputation and mixed precision.

A meta-step's memory grows with tasks x stages x activations: every task's stage graphs are kept for the
one backward that gives the meta-direction. :class:`Memory` names the levers that bound it, each exact or
within a stated tolerance of the plain step (``docs/memory.md`` measures them and says how to choose):

* ``task_chunk=k``: the meta-batch runs ``k`` tasks at a time and each chunk is back-propagated before the
  next starts; the chunks' directions, losses and coefficient gradients are summed with weights ``k_c / T``
  (the meta-loss is a mean over tasks), so the step equals the unchunked one up to rounding. Peak memory is
  one chunk's graph. On the task-by-task path (``vectorize=False``) chunks of one task are the default.
* ``recompute=True``: second order keeps only each stage's flat point and slope; each stage's graph (its
  support gradient's and its query loss's) is rebuilt during the backward (:mod:`rkfast.recompute`), so
  peak memory holds about one stage's graph instead of all ``s``. Exact up to rounding; it costs one more
  forward and backward per stage.
* ``amp="bf16"`` or ``"fp16"``: the task losses run under ``torch.autocast`` (activations in half
  precision); the meta-parameters, the stage points and slopes, the loss values and the outer update stay in
  the parameters' dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["Memory", "AMP_DTYPES", "task_ranges", "AutocastLoss"]

AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The ``amp`` choices and the autocast dtype each one computes in."""

Amp = Literal["bf16", "fp16"]


@dataclass(frozen=True)
class Memory:
    """The memory levers of a meta-step (module docstring); all off by default.

    Args:
        task_chunk: run the meta-batch this many tasks at a time, each chunk back-propagated before the next
            (``None``: all tasks at once under ``vmap``; one task at a time on the task-by-task path unless
            the task data are stage callables). A positive integer.
        recompute: second order only: rebuild each stage's graph during the backward instead of keeping it.
        amp: ``"bf16"`` (CPU and CUDA) or ``"fp16"``: run the task losses under ``torch.autocast`` in that
            dtype; ``None``: the parameters' dtype throughout.

    Raises:
        TypeError, ValueError: a setting of the wrong type or out of range, named.
    """

    task_chunk: int | None = None
    recompute: bool = False
    amp: Amp | None = None

    def __post_init__(self) -> None:
        chunk = self.task_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)):
            raise TypeError(f"Memory task_chunk must be a positive integer or None, got {chunk!r}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"Memory task_chunk must be a positive integer or None, got {chunk!r}")
        if not isinstance(self.recompute, bool):
            raise TypeError(f"Memory recompute must be True or False, got {self.recompute!r}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"Memory amp must be one of {sorted(AMP_DTYPES)} or None, got {self.amp!r}")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype (``None``: no autocast)."""
        return None if self.amp is None else AMP_DTYPES[self.amp]

    def chunk_size(self, num_tasks: int, vectorize: bool, callable_data: bool) -> int:
        """How many tasks one chunk holds for a meta-batch of ``num_tasks``: ``task_chunk`` (at most all of
        them), else all at once under ``vmap``, one at a time on the task-by-task path (which then holds one
        task's graph), and all at once there too when stage callables produce the data: chunking those costs
        one more graph-free pass over the stages (:func:`rkfast.functional.rk_meta_step`), which a default
        should not add."""
        if self.task_chunk is not None:
            return min(self.task_chunk, num_tasks)
        return num_tasks if vectorize or callable_data else 1

    def check_compatible(self, *, first_order: bool, captured: bool = False) -> None:
        """The levers must suit the step: recomputation rebuilds second-order stage graphs (first order keeps
        none) and restores the random state on the host, which a captured CUDA graph cannot replay.

        Raises:
            ValueError: ``recompute`` with ``first_order`` or ``captured``, naming the setting and its CLI flag.
        """
        if self.recompute and first_order:
            raise ValueError(
                "Memory(recompute=True) (--recompute) needs second order (first_order=False, no --first-order): "
                "first order keeps no stage graphs to rebuild"
            )
        if self.recompute and captured:
            raise ValueError(
                "Memory(recompute=True) (--recompute) with capture is not supported: the recomputed stages "
                "restore the random state on the host, which a CUDA graph cannot replay; use capture=False"
            )

    def check_device(self, device: torch.device) -> None:
        """``amp`` must be supported by ``torch.autocast`` on ``device`` (``ValueError`` naming both)."""
        dtype = self.amp_dtype
        if dtype is None:
            return
        if not torch.amp.autocast_mode.is_autocast_available(device.type):
            raise ValueError(f"Memory amp={self.amp!r}: torch.autocast is not available on {device.type}")
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError("Memory amp='bf16': this CUDA device does not support bfloat16; use amp='fp16'")

    def to_json(self) -> dict[str, Any]:
        return {"task_chunk": self.task_chunk, "recompute": self.recompute, "amp": self.amp}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Memory:
        return cls(**data)


def task_ranges(num_tasks: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: the tasks ``0..num_tasks-1`` in consecutive chunks of ``chunk`` (the last
    one shorter when ``chunk`` does not divide ``num_tasks``)."""
    return [(start, min(start + chunk, num_tasks)) for start in range(0, num_tasks, chunk)]


class AutocastLoss:
    """A per-task loss computed under ``torch.autocast`` in ``dtype`` on its row's device, its value and
    metrics cast back to the row's dtype (what the meta-step accumulates and differentiates is in that
    dtype). Keeps the wrapped loss's ``has_norm_layers`` (what :mod:`rkfast.taskmap` reads of a loss)."""

    def __init__(self, loss: Callable[[Tensor, Any], Any], dtype: torch.dtype) -> None:
        self.loss, self.dtype = loss, dtype
        self.has_norm_layers = getattr(loss, "has_norm_layers", True)

    def __call__(self, row: Tensor, data: Any) -> Any:
        with torch.autocast(row.device.type, dtype=self.dtype):
            out = self.loss(row, data)
        if isinstance(out, tuple):
            value, metrics = out
            return _like(value, row), {name: _like(m, row) for name, m in dict(metrics).items()}
        return _like(out, row)


def _like(value: Any, row: Tensor) -> Any:
    """A loss value or metric in the row's dtype (a non-tensor is left for the loss checks to refuse)."""
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != row.dtype:
        return value.to(row.dtype)
    return value
