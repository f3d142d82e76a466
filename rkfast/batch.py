"""What one meta-step learns from: a :class:`TaskBatch` of supervised tasks, or any :class:`TaskSet`, and
their validation (every problem is reported before a step changes anything)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__ = ["TaskBatch", "TaskSet", "check_task_batch", "check_task_set"]


def _check_not_inference(t: Tensor, what: str) -> None:
    """Autograd cannot use an inference tensor (one created under ``torch.inference_mode()``), and a step
    differentiates through the task data; refused here, before a step does any work."""
    if t.is_inference():
        raise RuntimeError(
            f"{what} is an inference tensor (created under torch.inference_mode()), which autograd cannot use: "
            "create it outside inference_mode (torch.no_grad() is fine), or .clone() it outside inference_mode"
        )


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

    @classmethod
    def from_torchmeta(cls, batch: Mapping[str, Sequence[Tensor]]) -> TaskBatch:
        """The batch of a torchmeta ``BatchMetaDataLoader``: ``{"train": (x, y), "test": (x, y)}``.

        torchmeta's ``"train"`` split is the support set and ``"test"`` the query set; every tensor already
        has the task dimension first (``[T, K, ...]``), so nothing is copied. Other keys are ignored.

        Raises:
            TypeError: not a mapping, or a split that is not an ``(inputs, targets)`` pair of tensors.
            KeyError: a missing ``"train"`` or ``"test"`` split.
            ValueError: a tensor without task and example dimensions, or task dimensions that differ.
        """
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"a torchmeta batch is a dict {{'train': (x, y), 'test': (x, y)}}, got {type(batch).__name__}"
            )
        missing = [split for split in ("train", "test") if split not in batch]
        if missing:
            raise KeyError(
                f"the torchmeta batch has no {' or '.join(map(repr, missing))} split "
                f"(keys: {list(batch)}); 'train' is the support set and 'test' the query set"
            )
        parts = (*_split_pair(batch, "train"), *_split_pair(batch, "test"))
        num_tasks = {name: int(t.shape[0]) for name, t in zip(cls._fields, parts, strict=True)}
        if len(set(num_tasks.values())) != 1:
            raise ValueError(f"task dimension (dim 0) differs across the torchmeta batch: {num_tasks}")
        return cls(*parts)

    @classmethod
    def from_tasks(cls, tasks: Sequence[Sequence[Tensor]]) -> TaskBatch:
        """Stack per-task ``(support_x, support_y, query_x, query_y)`` tuples (each ``[K, ...]``) into a batch.

        Every task must have the same number of support examples and of query examples, and each field
        the same dtype, device and example shape across tasks: a batch holds one tensor per field.

        Raises:
            TypeError: a task that is not four tensors, or a field whose dtype differs from task 0's.
            ValueError: no tasks, a task whose inputs and targets have different example counts, example
                counts or example shapes that differ from task 0's (the message says how to group tasks).
            RuntimeError: a field on another device than task 0's.
        """
        fields = [_task_fields(i, task) for i, task in enumerate(tasks)]
        if not fields:
            raise ValueError("from_tasks needs at least one task")
        for i, task in enumerate(fields):
            _check_like_first(i, task, fields[0])
        return cls(*(torch.stack(column) for column in zip(*fields, strict=True)))


def _split_pair(batch: Mapping[str, Sequence[Tensor]], split: str) -> tuple[Tensor, Tensor]:
    """``batch[split]`` as an ``(inputs, targets)`` pair of ``[T, K, ...]`` tensors."""
    pair = batch[split]
    if isinstance(pair, Tensor) or len(pair) != 2 or not all(isinstance(t, Tensor) for t in pair):
        raise TypeError(
            f"torchmeta batch[{split!r}] must be an (inputs, targets) pair of tensors, got {type(pair).__name__}"
        )
    for name, t in zip(("inputs", "targets"), pair, strict=True):
        if t.dim() < 2:
            raise ValueError(
                f"torchmeta batch[{split!r}] {name} need a task and an example dimension [T, K, ...], "
                f"got shape {tuple(t.shape)}"
            )
    return pair[0], pair[1]


def _task_fields(index: int, task: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Task ``index`` of :meth:`TaskBatch.from_tasks` as four tensors with an example dimension."""
    parts = tuple(task) if not isinstance(task, Tensor) and hasattr(task, "__iter__") else ()
    if len(parts) != 4 or not all(isinstance(t, Tensor) for t in parts):
        raise TypeError(
            f"task {index} must be (support_x, support_y, query_x, query_y) tensors, "
            f"got {type(task).__name__}" + (f" of {len(parts)}" if parts else "")
        )
    for name, t in zip(TaskBatch._fields, parts, strict=True):
        if t.dim() < 1:
            raise ValueError(f"task {index}'s {name} needs an example dimension [K, ...], got a 0-d tensor")
    for side, x, y in (("support", parts[0], parts[1]), ("query", parts[2], parts[3])):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"task {index} has {x.shape[0]} {side} inputs but {y.shape[0]} {side} targets")
    return parts


def _check_like_first(index: int, task: Sequence[Tensor], first: Sequence[Tensor]) -> None:
    """Task ``index`` stacks with task 0: same device, dtype, example counts and example shapes per field."""
    for name, t, t0 in zip(TaskBatch._fields, task, first, strict=True):
        if t.device != t0.device:
            raise RuntimeError(
                f"task {index}'s {name} is on {t.device}, task 0's on {t0.device}: move every task to one device"
            )
        if t.dtype != t0.dtype:
            raise TypeError(
                f"task {index}'s {name} has dtype {t.dtype}, task 0's {t0.dtype}: convert every task to one dtype"
            )
    for side, x, x0 in (("support", task[0], first[0]), ("query", task[2], first[2])):
        if x.shape[0] != x0.shape[0]:
            raise ValueError(
                f"task {index} has {x.shape[0]} {side} examples, task 0 has {x0.shape[0]}: tasks of one TaskBatch "
                "need equal counts; group tasks by shot count into separate batches (or pad)"
            )
    for name, t, t0 in zip(TaskBatch._fields, task, first, strict=True):
        if t.shape[1:] != t0.shape[1:]:
            raise ValueError(
                f"task {index}'s {name} has examples of shape {tuple(t.shape[1:])}, task 0's "
                f"{tuple(t0.shape[1:])}: every task's examples need one shape"
            )


def _move(t: Tensor, *args, **kwargs) -> Tensor:
    if t.is_floating_point():
        return t.to(*args, **kwargs)
    # class indices must stay integers: only move the device
    moved = t.to(*args, **kwargs)
    return moved if not moved.is_floating_point() else t.to(device=moved.device)


def check_task_batch(batch: Any, *, dtype: torch.dtype, device: torch.device) -> TaskBatch:
    """Validate a meta-batch against the model's parameter ``dtype`` and ``device``.

    Accepts a :class:`TaskBatch` or any 4-sequence ``(support_x, support_y, query_x, query_y)``.

    Raises:
        TypeError: not four tensors, or inputs of another dtype than the parameters.
        ValueError: a mismatched task dimension or example count, an empty batch.
        RuntimeError: a tensor on another device than the parameters, or an inference tensor (created under
            ``torch.inference_mode()``).
    """
    if isinstance(batch, TaskBatch):
        parts = tuple(batch)
    else:
        try:
            parts = tuple(batch)
        except TypeError:
            parts = ()
        if len(parts) != 4:
            raise TypeError(
                "a task batch is a TaskBatch or a 4-tuple (support_x, support_y, query_x, query_y), "
                f"got {type(batch).__name__}"
            )
    names = TaskBatch._fields
    for name, t in zip(names, parts, strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(f"batch.{name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"batch.{name} must have a task and an example dimension [T, K, ...], got shape {tuple(t.shape)}"
            )
        if t.device != device:
            raise RuntimeError(f"batch.{name} is on {t.device} but the model's parameters are on {device}")
        _check_not_inference(t, f"batch.{name}")
    for name, t in zip(names, parts, strict=True):
        if t.is_floating_point() and t.dtype != dtype:
            raise TypeError(f"batch.{name} has dtype {t.dtype} but the model's parameters are {dtype}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"batch.{name} must hold real numbers or integer class indices, got {t.dtype}")
    num_tasks = {name: int(t.shape[0]) for name, t in zip(names, parts, strict=True)}
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


@dataclass(frozen=True)
class TaskSet:
    """``T`` tasks given by their losses over the model and their data: what :class:`TaskBatch` does not cover.

    A loss is ``loss(model, data) -> scalar`` or ``(scalar, {"metric": scalar})`` for ONE task: ``model(*inputs)``
    runs the module with that task's parameters (at the stage being computed), ``data`` is that task's data.
    Data is either a pytree whose tensors carry the task dimension first (sliced per task), or a callable
    ``data(stage, params) -> pytree`` that produces a stage's data from that stage's detached parameters
    ``params [T, N]`` (the rows of every task: ``MetaOptimizer.layout.unflatten(params)`` gives them per
    parameter, and :meth:`~rkfast.optim.MetaOptimizer.task_models` a batched model over them): rollouts of
    each stage's own policy in reinforcement learning. Stages are numbered from 0 (stage 0 is theta); in
    meta-test adaptation ``stage`` is the number of steps taken so far.

    Attributes:
        support_loss, query_loss: the per-task losses of the support (inner) and query (meta-loss) sides.
        support_data, query_data: the task data, pytrees or stage callables.
        num_tasks: ``T``; required when both data are callables, else read from the data.
    """

    support_loss: Callable[[Callable[..., Any], Any], Any]
    query_loss: Callable[[Callable[..., Any], Any], Any]
    support_data: Any
    query_data: Any
    num_tasks: int | None = None


def check_task_set(tasks: TaskSet, *, device: torch.device) -> TaskSet:
    """Validate a :class:`TaskSet` for meta-parameters on ``device``.

    Raises:
        TypeError: a loss that is not callable, or a ``num_tasks`` that is not a positive integer.
        ValueError: task dimensions that differ, no tasks, or callable data without ``num_tasks``.
        RuntimeError: a data tensor on another device than the parameters, or an inference tensor.
    """
    for name in ("support_loss", "query_loss"):
        if not callable(getattr(tasks, name)):
            raise TypeError(
                f"TaskSet.{name} must be callable as loss(model, data), got {type(getattr(tasks, name)).__name__}"
            )
    if tasks.num_tasks is not None and (
        isinstance(tasks.num_tasks, bool) or not isinstance(tasks.num_tasks, int) or tasks.num_tasks < 1
    ):
        raise TypeError(f"TaskSet.num_tasks must be a positive integer, got {tasks.num_tasks!r}")
    found: dict[str, int] = {}
    for name in ("support_data", "query_data"):
        data = getattr(tasks, name)
        if callable(data):
            continue
        leaves = [leaf for leaf in tree_flatten(data)[0] if isinstance(leaf, Tensor)]
        if not leaves:
            raise ValueError(
                f"TaskSet.{name} holds no tensors: give a pytree of [T, ...] tensors or a callable data(stage, params)"
            )
        for leaf in leaves:
            if leaf.device != device:
                raise RuntimeError(
                    f"a tensor of TaskSet.{name} is on {leaf.device} but the model's parameters are on {device}"
                )
            _check_not_inference(leaf, f"a tensor of TaskSet.{name}")
            if leaf.dim() == 0:
                raise ValueError(f"every tensor of TaskSet.{name} needs the task dimension first, got a 0-d tensor")
        sizes = {int(leaf.shape[0]) for leaf in leaves}
        if len(sizes) > 1:
            raise ValueError(f"TaskSet.{name}: task dimension (dim 0) differs between its tensors: {sorted(sizes)}")
        found[name] = sizes.pop()
    if tasks.num_tasks is not None:
        found["num_tasks"] = tasks.num_tasks
    if not found:
        raise ValueError("TaskSet.num_tasks is required when both support_data and query_data are callables")
    if len(set(found.values())) > 1:
        raise ValueError(f"the task dimension differs across the task set: {found}")
    if 0 in found.values():
        raise ValueError("the task set has no tasks (task dimension is 0)")
    return tasks
