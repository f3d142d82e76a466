"""A meta-batch of supervised tasks and its validation."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TaskBatch", "check_task_batch"]


class TaskBatch(NamedTuple):
    """``T`` tasks, each with a support and a query set; every tensor has the task dimension first.

    Shapes: ``support_x [T, K, ...]``, ``support_y [T, K, ...]``, ``query_x [T, Q, ...]``,
    ``query_y [T, Q, ...]``. Targets are floating point for regression and integer class indices for
    classification (then accuracies are reported too).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        """``T``, the size of the task dimension."""
        return int(self.support_x.shape[0])

    @property
    def support(self) -> tuple[Tensor, Tensor]:
        return self.support_x, self.support_y

    @property
    def query(self) -> tuple[Tensor, Tensor]:
        return self.query_x, self.query_y

    def to(self, *args, **kwargs) -> TaskBatch:
        """Move every tensor, as :meth:`torch.Tensor.to` does; targets keep an integer dtype."""
        return TaskBatch(*(_move(t, *args, **kwargs) for t in self))


def _move(t: Tensor, *args, **kwargs) -> Tensor:
    if t.is_floating_point():
        return t.to(*args, **kwargs)
    # class indices must stay integers: only move the device
    moved = t.to(*args, **kwargs)
    return moved if not moved.is_floating_point() else t.to(device=moved.device)


def check_task_batch(batch: object, *, dtype: torch.dtype, device: torch.device) -> TaskBatch:
    """Validate a meta-batch against the model's parameter ``dtype`` and ``device``.

    Accepts a :class:`TaskBatch` or any 4-sequence ``(support_x, support_y, query_x, query_y)``.

    Raises:
        TypeError: not four tensors, or inputs of another dtype than the parameters.
        ValueError: a mismatched task dimension or example count, an empty batch.
        RuntimeError: a tensor on another device than the parameters.
    """
    if isinstance(batch, TaskBatch):
        parts = tuple(batch)
    else:
        try:
            parts = tuple(batch)  # type: ignore[arg-type]
        except TypeError:
            parts = ()
        if len(parts) != 4:
            raise TypeError(
                "a task batch is a TaskBatch or a 4-tuple (support_x, support_y, query_x, query_y), "
                f"got {type(batch).__name__}"
            )
    names = TaskBatch._fields
    for name, t in zip(names, parts):
        if not isinstance(t, Tensor):
            raise TypeError(f"batch.{name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"batch.{name} must have a task and an example dimension [T, K, ...], got shape {tuple(t.shape)}"
            )
        if t.device != device:
            raise RuntimeError(f"batch.{name} is on {t.device} but the model's parameters are on {device}")
    for name, t in zip(names, parts):
        if t.is_floating_point() and t.dtype != dtype:
            raise TypeError(f"batch.{name} has dtype {t.dtype} but the model's parameters are {dtype}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"batch.{name} must hold real numbers or integer class indices, got {t.dtype}")
    num_tasks = {name: int(t.shape[0]) for name, t in zip(names, parts)}
    if len(set(num_tasks.values())) != 1:
        raise ValueError(f"task dimension (dim 0) differs across the batch: {num_tasks}")
    if parts[0].shape[0] == 0:
        raise ValueError("the batch has no tasks (task dimension is 0)")
    for x, y in (("support_x", "support_y"), ("query_x", "query_y")):
        tx, ty = parts[names.index(x)], parts[names.index(y)]
        if tx.shape[1] != ty.shape[1]:
            raise ValueError(
                f"batch.{x} has {tx.shape[1]} examples per task but batch.{y} has {ty.shape[1]} "
                f"(shapes {tuple(tx.shape)} and {tuple(ty.shape)})"
            )
        if tx.shape[1] == 0:
            raise ValueError(f"batch.{x} has no examples per task")
    return TaskBatch(*parts)
