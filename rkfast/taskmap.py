"""Evaluating a per-task function over all tasks of a meta-batch: ``vmap`` or a loop with plain autograd.

The functional core works on per-task losses ``loss(row, data)``, where ``row`` is one task's flat
parameters ``[N]`` and ``data`` one task's data (any pytree); a loss returns a scalar, or
``(scalar, {"metric": scalar})``. Task data is either a pytree whose leaves carry the task dimension
first, or a callable ``data(stage, params[T, N]) -> pytree`` that produces each stage's data from that
stage's (detached) parameters, as reinforcement learning does with rollouts of each stage's own policy.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Literal, Union

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

from ._norms import elementary_norms

__all__ = ["Metrics", "TaskLoss", "TaskData", "Randomness", "TaskMap", "resolve_num_tasks"]

Metrics = dict[str, Tensor]
TaskLoss = Callable[[Tensor, Any], Union[Tensor, tuple[Tensor, Metrics]]]
"""``loss(row[N], one_task_data) -> scalar`` or ``(scalar, {name: scalar})``.

A loss may carry ``has_norm_layers = False`` to say it calls no batch/instance/layer norm, which lets
the vectorized path skip the exact-norm rewrite (:mod:`rkfast._norms`); without it the rewrite is on."""
TaskData = Union[Any, Callable[[int, Tensor], Any]]
"""A pytree with the task dimension first, or ``data(stage, params[T, N]) -> pytree``."""
Randomness = Literal["error", "different", "same"]


def _split(out: Tensor | tuple[Tensor, Metrics]) -> tuple[Tensor, Metrics]:
    if isinstance(out, tuple):
        loss, metrics = out
        return loss, dict(metrics)
    return out, {}


def _scalar(loss: TaskLoss) -> Callable[[Tensor, Any], Tensor]:
    return lambda row, data: _split(loss(row, data))[0]


def _with_metrics(loss: TaskLoss) -> Callable[[Tensor, Any], tuple[Tensor, Metrics]]:
    return lambda row, data: _split(loss(row, data))


def _task(data: Any, i: int) -> Any:
    return tree_map(lambda x: x[i] if isinstance(x, Tensor) else x, data)


def _stack(outs: list[Any]) -> Any:
    leaves = [tree_flatten(o) for o in outs]
    spec = leaves[0][1]
    columns = zip(*(lv for lv, _ in leaves))
    return spec.unflatten([torch.stack(list(c)) for c in columns])


def _num_tasks(data: Any) -> int | None:
    if callable(data):
        return None
    for leaf in tree_flatten(data)[0]:
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


class TaskMap:
    """Maps a per-task function over the tasks: ``vmap`` (batched) or a Python loop with autograd.

    ``params`` is either ``theta [N]`` shared by every task (``shared=True``: no ``T`` copies of theta) or
    per-task ``[T, N]``.
    """

    def __init__(self, num_tasks: int, vectorize: bool, randomness: Randomness) -> None:
        self.num_tasks = num_tasks
        self.vectorize = vectorize
        self.randomness = randomness

    def _vmap(self, loss: TaskLoss, fn: Callable, shared: bool, differentiated_twice: bool) -> Callable:
        """``vmap(fn)``; with ``differentiated_twice`` (a gradient that is itself differentiated, i.e. the
        second-order support gradients), norm layers run as elementary ops: the fused norms' backward has
        a wrong batching rule for its own derivative (see rkfast._norms). Their first derivatives are
        exact under vmap (the tests compare first-order directions through BatchNorm with the sequential
        path), so every other call keeps the fused, faster and leaner, kernels."""
        mapped = vmap(fn, in_dims=(None if shared else 0, 0), randomness=self.randomness)
        if not differentiated_twice or not getattr(loss, "has_norm_layers", True):
            return mapped

        def run(params: Tensor, data: Any) -> Any:
            with elementary_norms():
                return mapped(params, data)

        return run

    def data(self, data: TaskData, stage: int, params: Tensor, shared: bool) -> Any:
        if not callable(data):
            return data
        rows = params.detach()
        if shared:
            rows = rows.expand(self.num_tasks, -1)
        return data(stage, rows)

    def _loop(self, loss: TaskLoss, params: Tensor, data: Any, shared: bool, create_graph: bool) -> Iterator[tuple]:
        """Task by task with plain autograd: ``(gradient, loss, metrics)`` of each task."""
        for i in range(self.num_tasks):
            row = params if shared else params[i]
            if not create_graph:
                row = row.detach().requires_grad_()
            with torch.enable_grad():
                value, metrics = _with_metrics(loss)(row, _task(data, i))
                (g,) = torch.autograd.grad(value, row, create_graph=create_graph)
            yield g, value, metrics

    def grads(self, loss: TaskLoss, params: Tensor, data: Any, shared: bool, create_graph: bool) -> Tensor:
        """Per-task gradients ``[T, N]``; differentiable w.r.t. ``params`` when ``create_graph``."""
        if self.vectorize:
            return self._vmap(loss, grad(_scalar(loss)), shared, differentiated_twice=create_graph)(params, data)
        return torch.stack([g for g, _, _ in self._loop(loss, params, data, shared, create_graph)])

    def values(self, loss: TaskLoss, params: Tensor, data: Any, shared: bool) -> tuple[Tensor, Metrics]:
        """Per-task losses ``[T]`` and metrics, differentiable w.r.t. ``params``."""
        if self.vectorize:
            return self._vmap(loss, _with_metrics(loss), shared, False)(params, data)
        return _stack([_with_metrics(loss)(params if shared else params[i], _task(data, i)) for i in range(self.num_tasks)])


def resolve_num_tasks(num_tasks: int | None, *datas: TaskData) -> int:
    found = {n for n in (_num_tasks(d) for d in datas) if n is not None}
    if num_tasks is not None:
        found.add(int(num_tasks))
    if not found:
        raise ValueError("num_tasks is required when every task data is a callable")
    if len(found) > 1:
        raise ValueError(f"task dimension differs between support and query data: {sorted(found)}")
    (n,) = found
    if n < 1:
        raise ValueError(f"need at least one task, got {n}")
    return n
