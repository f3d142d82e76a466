"""Stage recomputation: a second-order meta-step that keeps each stage's flat point, not its graph.

A second-order step keeps, for every stage, the graph of its support gradient (built with
``create_graph`` for the Hessian-vector products) and of its query loss until the one backward that gives
the meta-direction. :class:`RecomputingTaskMap` computes both without a graph and saves only the stage's
point ``[T, N]``; when the backward reaches the stage it rebuilds that stage's graph from the point, takes
the vector-Jacobian product and frees it. Peak memory then holds about one stage's graph instead of ``s``,
at the cost of one more forward and backward per stage. The math is unchanged: the backward of the slope
``k = grad L_S(p)`` is the Hessian-vector product ``H_S(p) v``, computed from a rebuilt ``grad`` with
``create_graph``, and the backward of a query loss is its gradient, so results equal the plain step's up
to rounding.

The rebuilt stage runs at the stage's step (:func:`rkfast.norms.at_step`, for per-step norm layers) and
with the random-number state it had in the forward (dropout draws the same masks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from .norms import at_step, current_step
from .taskmap import DETACHED_LOSS, Metrics, TaskLoss, TaskMap

__all__ = ["RecomputingTaskMap"]


class _RandomState:
    """The CPU generator's state (and the parameters' CUDA device's) at a stage's forward, restored
    around its recomputation so that random layers draw what they drew the first time."""

    def __init__(self, device: torch.device) -> None:
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextmanager
    def restored(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, state in zip(self.devices, self.cuda, strict=True):
                torch.cuda.set_rng_state(state, d)
            yield


class _Stage:
    """What a stage's recomputation needs: its step and random state when it first ran."""

    def __init__(self, params: Tensor) -> None:
        self.step = current_step()
        self.random = _RandomState(params.device)

    @contextmanager
    def again(self) -> Iterator[None]:
        with torch.enable_grad(), at_step(self.step), self.random.restored():
            yield


class _RecomputedSlopes(torch.autograd.Function):
    """``params -> k = grad L_S(params)`` per task, graph-free forward; backward ``H_S(params) v`` from a
    rebuilt graph."""

    @staticmethod
    def forward(ctx: Any, params: Tensor, slopes: Callable[[Tensor, bool], Tensor]) -> Tensor:
        ctx.slopes, ctx.stage = slopes, _Stage(params)
        ctx.save_for_backward(params)
        return slopes(params.detach(), False).detach()

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor, None]:
        (params,) = ctx.saved_tensors
        point = params.detach().requires_grad_()
        with ctx.stage.again():
            (hvp,) = torch.autograd.grad(ctx.slopes(point, True), point, v)
        return hvp, None


class _RecomputedValues(torch.autograd.Function):
    """``params -> q = L_Q(params)`` per task (metrics into ``found``), graph-free forward; backward its
    gradient from a rebuilt graph."""

    @staticmethod
    def forward(
        ctx: Any, params: Tensor, values: Callable[[Tensor], tuple[Tensor, Metrics]], found: list[Metrics]
    ) -> Tensor:
        ctx.values, ctx.stage = values, _Stage(params)
        ctx.save_for_backward(params)
        q, metrics = values(params.detach())
        found.append({name: m.detach() for name, m in metrics.items()})
        return q.detach()

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor, None, None]:
        (params,) = ctx.saved_tensors
        point = params.detach().requires_grad_()
        with ctx.stage.again():
            q, _ = ctx.values(point)
            if not q.requires_grad:
                raise ValueError(DETACHED_LOSS)
            (g,) = torch.autograd.grad(q, point, v)
        return g, None, None


class RecomputingTaskMap(TaskMap):
    """A :class:`~rkfast.taskmap.TaskMap` whose differentiable results (second-order slopes, query losses
    at tracked points) keep no graph: each is rebuilt in the backward (module docstring). Graph-free calls
    (first-order slopes, losses of untracked points) are the plain map's.

    ``keep_step``: the query losses computed at this step (:func:`~rkfast.norms.current_step`; the step's last
    stage with a query loss) keep their graph. It is the last graph the forward builds and the first the
    backward frees, while no other stage holds one, so keeping it saves its recomputation and raises no peak.
    """

    def __init__(self, num_tasks: int, vectorize: bool, randomness: Any, keep_step: int | None = None) -> None:
        super().__init__(num_tasks, vectorize, randomness)
        self.keep_step = keep_step

    def grads(self, loss: TaskLoss, params: Tensor, data: Any, shared: bool, create_graph: bool) -> Tensor:
        if not (create_graph and torch.is_grad_enabled() and params.requires_grad):
            return super().grads(loss, params, data, shared, create_graph)
        plain = super().grads
        return _RecomputedSlopes.apply(params, lambda p, graph: plain(loss, p, data, shared, graph))

    def values(self, loss: TaskLoss, params: Tensor, data: Any, shared: bool) -> tuple[Tensor, Metrics]:
        if not (torch.is_grad_enabled() and params.requires_grad) or current_step() == self.keep_step:
            return super().values(loss, params, data, shared)
        plain = super().values
        found: list[Metrics] = []
        q = _RecomputedValues.apply(params, lambda p: plain(loss, p, data, shared), found)
        return q, found[0]
