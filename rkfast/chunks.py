"""Task chunks: a meta-step over ``T`` tasks as a weighted sum of steps over consecutive chunks of them.

The meta-loss is a mean over tasks, ``(1/T) sum_i sum_j b_j L_Q,i(theta_i^(j))``, and each task's stages
depend only on theta and the coefficients, so the step over chunks ``c`` of ``k_c`` tasks is
``sum_c (k_c / T) step_c``: for the meta-direction, the meta-loss, the per-stage losses and metrics (means
over tasks) and the learned coefficients' directions alike (:class:`ChunkSum`). Each chunk is
back-propagated before the next one starts, so peak memory is one chunk's graph.

Task data are sliced per chunk (:func:`slice_tasks`). Stage callables ``data(stage, params[T, N])``
(reinforcement learning's rollouts) see every task's rows at once, in stage order; :class:`RecordedStages`
holds what they returned for the whole meta-batch in one graph-free pass over the stages, and serves each
chunk its slice of it, so that the callables are called exactly as in the unchunked step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_map

from .batch import TaskBatch, TaskSet
from .learned import RatesStepOutput
from .memory import task_ranges
from .results import MetaStepOutput

__all__ = ["slice_tasks", "RecordedStages", "ChunkSum", "split_tasks"]


def slice_tasks(data: Any, start: int, stop: int) -> Any:
    """Tasks ``start..stop-1`` of a pytree of task data (every tensor carries the task dimension first)."""
    return tree_map(lambda x: x[start:stop] if isinstance(x, Tensor) else x, data)


def split_tasks(tasks: TaskBatch | TaskSet, num_tasks: int, chunk: int | None) -> list[TaskBatch | TaskSet]:
    """Checked ``tasks`` as consecutive chunks of ``chunk`` tasks (meta-test adaptation, whose tasks are
    independent); one piece without ``chunk`` or for a TaskSet with stage callables, which see every task
    at once."""
    if chunk is None or chunk >= num_tasks:
        return [tasks]
    if isinstance(tasks, TaskBatch):
        return [TaskBatch(*slice_tasks(tuple(tasks), a, b)) for a, b in task_ranges(num_tasks, chunk)]
    if callable(tasks.support_data) or callable(tasks.query_data):
        return [tasks]
    return [
        TaskSet(tasks.support_loss, tasks.query_loss, slice_tasks(tasks.support_data, a, b),
                slice_tasks(tasks.query_data, a, b), num_tasks=b - a)
        for a, b in task_ranges(num_tasks, chunk)
    ]  # fmt: skip


class RecordedStages:
    """A stage callable ``data(stage, params[T, N])`` that remembers what it returned for each stage, then
    (:meth:`chunk`) serves a chunk of tasks its slice of that without calling ``data`` again."""

    def __init__(self, data: Callable[[int, Tensor], Any]) -> None:
        self.data = data
        self.stages: dict[int, Any] = {}

    def __call__(self, stage: int, params: Tensor) -> Any:
        out = self.stages[stage] = self.data(stage, params)
        return out

    def chunk(self, start: int, stop: int) -> Callable[[int, Tensor], Any]:
        """The recorded data of tasks ``start..stop-1``, as a stage callable (``params`` is not read)."""
        return lambda stage, params: slice_tasks(self.stages[stage], start, stop)


class ChunkSum:
    """The meta-step of ``T`` tasks from the steps of its chunks: ``add`` each chunk's output with its task
    count, then :meth:`result` (module docstring). The sums are new tensors: a chunk's output may live in
    buffers the next chunk overwrites (:class:`rkfast.functional.Workspace`)."""

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.direction: Tensor | None = None
        self.loss: Tensor | None = None
        self.stage_losses: dict[int, Tensor] = {}
        self.stage_metrics: dict[str, dict[int, Tensor]] = {}
        self.coefficients: list[Tensor] | None = None
        self.rate_count = 0

    def add(self, out: MetaStepOutput, tasks: int) -> None:
        w = tasks / self.num_tasks
        self.direction = _weighted_sum(self.direction, out.direction, w)
        self.loss = _weighted_sum(self.loss, out.loss, w)
        for j, value in out.stage_losses.items():
            self.stage_losses[j] = _weighted_sum(self.stage_losses.get(j), value, w)
        for name, by_stage in out.stage_metrics.items():
            sums = self.stage_metrics.setdefault(name, {})
            for j, value in by_stage.items():
                sums[j] = _weighted_sum(sums.get(j), value, w)
        if isinstance(out, RatesStepOutput):
            old: list[Tensor | None] = (
                [*self.coefficients] if self.coefficients else [None] * len(out.coefficient_directions)
            )
            self.coefficients = [_weighted_sum(s, d, w) for s, d in zip(old, out.coefficient_directions, strict=True)]
            self.rate_count = len(out.rate_directions)

    def result(self) -> MetaStepOutput:
        assert self.direction is not None and self.loss is not None, "ChunkSum.result() before any chunk"
        out = MetaStepOutput(self.direction, self.loss, self.stage_losses, self.stage_metrics)
        if self.coefficients is None:
            return out
        n = self.rate_count
        return RatesStepOutput(out, self.coefficients[:n], self.coefficients[n:])


def _weighted_sum(total: Tensor | None, value: Tensor, weight: float) -> Tensor:
    """``total + weight * value`` (``weight * value`` for the first chunk), as a new tensor."""
    return value * weight if total is None else total + value * weight
