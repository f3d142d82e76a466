"""The batched Runge-Kutta meta-step and meta-test adaptation, as pure functions over flat parameters.

The core (:func:`rk_meta_step`, :func:`adapt`) knows nothing of modules or ``(x, y)`` data: it works on

* ``theta``: the meta-parameters as one flat vector ``[N]``;
* per-task losses ``loss(row, data)`` and task data, pytrees with the task dimension first or per-stage
  callables ``data(stage, params[T, N])`` (see :mod:`rkfast.taskmap`).

All tasks run at once under ``torch.func.vmap`` (``vectorize=True``) or one after another with plain
autograd (``vectorize=False``, for models that cannot run under vmap); both compute the same math.
:func:`meta_step` and :func:`evaluate` build the common ``module + loss_fn + TaskBatch`` case on top, and
:func:`model_task_loss` turns a loss over the model's functional call into a per-task loss.

The method is stated in ``docs/method.md``; the names below follow it: the stage points
``theta_i^(j) = theta - h sum_{m<j} A_jm k_i^(m)``, the slopes ``k_i^(m) = grad L_S,i(theta_i^(m))`` and the
meta-loss ``(1/T) sum_i sum_j b_j L_Q,i(theta_i^(j))``.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from . import norms
from .batch import TaskBatch
from .chunks import ChunkSum, RecordedStages, slice_tasks
from .kernels import Backend, axpy_, combine, resolve_backend, stage_point, stage_point_elementwise
from .layout import ParamLayout
from .learned import LearnedRates, RatesStepOutput, TableauCoefficients
from .memory import AutocastLoss, Memory, task_ranges
from .norms import PerStepBatchNorm, at_step, statistics_layers
from .recompute import RecomputingTaskMap
from .results import AdaptationOutput, MetaStepOutput, mean_ci95
from .tableau import Tableau, get_tableau
from .taskmap import (
    DETACHED_LOSS,
    Metrics,
    Randomness,
    TaskData,
    TaskLoss,
    TaskMap,
    VmapUnsupportedError,
    _tracked,
    loss_gradient,
    one_pass_applies,
    resolve_num_tasks,
    stage_query_losses,
)

__all__ = [
    "ParamLayout",
    "TaskLoss",
    "TaskData",
    "ModelLoss",
    "MetaStepOutput",
    "AdaptationOutput",
    "Workspace",
    "Stage",
    "VmapUnsupportedError",
    "rk_meta_step",
    "stage_points",
    "SecondOrderDirection",
    "FirstOrderDirection",
    "adapt",
    "StageMap",
    "check_step",
    "check_step_counts",
    "stage_point",
    "elementwise_stage_point",
    "combine",
    "module_task_loss",
    "model_task_loss",
    "model_call",
    "supervised_loss",
    "target_check",
    "has_norm_layers",
    "meta_step",
    "evaluate",
    "use_batch_statistics",
    "mean_ci95",
]

ModelLoss = Callable[[Callable[..., Any], Any], Any]
"""``loss(model, one_task_data) -> scalar`` or ``(scalar, {name: scalar})``, where ``model(*inputs)`` calls
the module with one task's parameters (``torch.func.functional_call``)."""


class Workspace:
    """Buffers that successive meta-steps of one shape reuse instead of allocating.

    :func:`rk_meta_step` takes one to write the first-order stage points and meta-direction into (the
    second-order path's buffers belong to autograd). A buffer is re-allocated only when the shape, dtype or
    device asked for changes, so a result written into one is valid until the next step with this
    workspace.
    """

    def __init__(self) -> None:
        self._buffers: dict[Any, Tensor] = {}

    def get(self, key: Any, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """The buffer named ``key`` with ``shape`` and ``like``'s dtype and device (contents undefined)."""
        buf = self._buffers.get(key)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[key] = like.new_empty(shape)
        return buf


def check_theta(theta: Tensor) -> None:
    """``theta`` must be a floating-point flat vector ``[N]``."""
    if not isinstance(theta, Tensor) or theta.dim() != 1:
        shape = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
        raise ValueError(f"theta must be a flat parameter vector [N], got {shape}")
    if not theta.is_floating_point():
        raise TypeError(f"theta must be floating point, got {theta.dtype}")


def check_step(name: str, value: float) -> float:
    """A step size (``inner_lr``, ``step_size``) as a float, which must be a finite number ``> 0``.

    Raises:
        TypeError: not a real number (a string, ``True``/``False``, ``None``...).
        ValueError: zero, negative, NaN or infinite; the message names the argument.
    """
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a number > 0, got {value!r}")
    try:
        step = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a number > 0, got {value!r}") from err
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return step


def check_step_counts(steps: Sequence[int]) -> list[int]:
    """Adaptation step counts (``adapt``'s ``steps``), sorted without repeats: positive integers only.

    Raises:
        TypeError: ``steps`` is not a sequence, or holds a non-integer (``1.5``, ``"3"``, ``True``).
        ValueError: empty, or a count below 1.
    """
    if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
        raise TypeError(f"steps must be a sequence of positive integers such as (1, 5, 10), got {steps!r}")
    given = tuple(steps)
    counts = {_step_count(n, given) for n in given}
    if not counts or min(counts) < 1:
        raise ValueError(f"steps must be positive step counts, got {given}")
    return sorted(counts)


def _step_count(n: Any, steps: tuple) -> int:
    """One step count as an ``int``: Python and numpy integers, integer 0-d tensors; not ``1.5``, ``"3"``,
    ``True`` (which ``int()`` would truncate or convert silently)."""
    if not isinstance(n, bool):
        try:
            return operator.index(n)
        except TypeError:
            pass
    raise TypeError(f"steps must be positive integers, got {n!r} in {steps!r}")


# -- the stage loop -------------------------------------------------------------------------------------


@dataclass
class Stage:
    """Stage ``index`` (0-based) of every task: its point ``theta [N]`` (``shared``: stage 1, or a stage
    whose row of ``A`` is zero, sits at theta for every task) or ``theta^(j) [T, N]``. With learned rates
    or a learned tableau, ``terms`` are the ``(m, A[j][m], r_m [N], k^(m) [T, N])`` the point was built from
    (what the first-order directions of the coefficients need; ``A[j][m]`` a float or a 0-d tensor); empty
    otherwise."""

    index: int
    point: Tensor
    shared: bool
    terms: tuple[tuple[int, Any, Tensor, Tensor], ...] = ()


def elementwise_stage_point(
    theta: Tensor, slopes: Sequence[Tensor], coefs: Sequence[Tensor], backend: str = "torch"
) -> Tensor:
    """``out[t] = theta - sum_m coefs[m] ⊙ slopes[m][t]`` with per-element coefficient vectors ``coefs[m] [N]``
    (the stage point with learned rates, ``coefs[m] = A[j][m] * r_m``), differentiable in all three.

    The fused :func:`rkfast.kernels.stage_point_elementwise` of ``backend`` (``"torch"``: its pure-PyTorch
    reference)."""
    return stage_point_elementwise(theta, list(slopes), list(coefs), backend=backend)


def stage_points(
    theta: Tensor,
    tableau: Tableau,
    h: float,
    tasks: TaskMap,
    support_loss: TaskLoss,
    support_data: TaskData,
    *,
    second_order: bool,
    backend: str,
    workspace: Workspace | None = None,
    rates: Callable[[int], Tensor] | None = None,
    matrix: Tensor | None = None,
) -> Iterator[Stage]:
    """The stages whose query loss the meta-loss weighs (``b_j != 0``), in order.

    ``theta^(j) = theta - h sum_{m<j} A[j][m] k^(m)`` with the slopes ``k^(m) = grad L_S(theta^(m))``; a slope
    is computed only if a later stage reads it, and differentiably in ``theta`` (``create_graph``) for
    second order, with :func:`rkfast.norms.current_step` at ``j`` (the caller sets it around what it
    computes at a yielded stage). ``workspace`` (first order only: nothing is differentiated through the
    points then) holds the stage points between steps.

    ``rates`` (learned inner rates, :mod:`rkfast.learned`): ``rates(m)`` is the rate vector ``r_m [N]`` of
    slope ``m``, and ``theta^(j) = theta - sum_{m<j} A[j][m] (r_m ⊙ k^(m))`` replaces the step ``h``
    (:func:`elementwise_stage_point`; differentiable in the rates, the yielded stages carry their ``terms``).
    ``matrix`` (a learned tableau, with ``rates``): the values ``A [s, s]`` (a tensor, differentiable) that
    replace ``tableau``'s at its non-zero positions (``tableau`` then gives the pattern only).
    """
    slopes: dict[int, Tensor] = {}  # the slopes a later stage still reads
    for step in tableau.schedule:
        j, coefs = step.index, step.coefficients
        shared = not coefs
        terms: tuple[tuple[int, Any, Tensor, Tensor], ...] = ()
        if shared:
            point = theta
        elif rates is not None:
            terms = tuple((m, a if matrix is None else matrix[j, m], rates(m), slopes[m]) for m, a in coefs)
            point = elementwise_stage_point(theta, [k for *_, k in terms], [a * r for _, a, r, _ in terms], backend)
        else:
            out = (
                workspace.get(("point", j, tasks.num_tasks), (tasks.num_tasks, theta.shape[0]), theta)
                if workspace
                else None
            )
            point = stage_point(
                theta, [slopes[m] for m, _ in coefs], [h * a for _, a in coefs], out=out, backend=backend
            )
        for m in step.frees:  # a slope no later stage reads is freed now (autograd keeps what it needs)
            del slopes[m]
        if step.support_grad:
            with at_step(j):  # per-step layers (rkfast.norms) normalize for stage j
                data = tasks.data(support_data, j, point, shared)
                slopes[j] = tasks.grads(support_loss, point, data, shared, create_graph=second_order)
        if step.query_loss:
            yield Stage(j, point, shared, terms)


# -- the meta-direction, second and first order ----------------------------------------------------------


class _MetaLoss:
    """What both orders record per stage: the meta-loss ``sum_j b_j mean_i q_i^(j)`` and per-stage means."""

    def __init__(self, theta: Tensor, tasks: TaskMap) -> None:
        self.tasks = tasks
        self.loss = theta.new_zeros(())
        self.stage_losses: dict[int, Tensor] = {}
        self.stage_metrics: dict[str, dict[int, Tensor]] = {}

    def record(self, stage: Stage, weight: float, q: Tensor, metrics: Metrics) -> None:
        mean = q.mean()
        self.loss = self.loss + weight * mean
        self.stage_losses[stage.index + 1] = mean.detach()  # stages numbered from 1, as in the method
        for name, value in metrics.items():
            self.stage_metrics.setdefault(name, {})[stage.index + 1] = value.detach().float().mean()

    def output(self, direction: Tensor) -> MetaStepOutput:
        return MetaStepOutput(direction.detach(), self.loss.detach(), self.stage_losses, self.stage_metrics)


class SecondOrderDirection(_MetaLoss):
    """``d = grad_theta sum_j b_j mean_i L_Q,i(theta_i^(j)(theta))``: one backward through every stage point,
    the slopes included (their Hessian-vector products). With learned ``rates`` the same backward also gives
    the meta-loss's gradient with respect to the rate tensors (:class:`~rkfast.learned.RatesStepOutput`)."""

    second_order = True

    def __init__(
        self,
        theta: Tensor,
        tasks: TaskMap,
        backend: str,
        workspace: Workspace | None,
        rates: LearnedRates | None = None,
        learned: TableauCoefficients | None = None,
    ) -> None:
        self.theta = theta.detach().requires_grad_()  # a fresh leaf: the caller's theta is left alone
        self.rates, self.learned = rates, learned
        super().__init__(self.theta, tasks)

    def grad_mode(self) -> AbstractContextManager:
        return torch.enable_grad()

    def add(self, stage: Stage, weight: float, query_loss: TaskLoss, data: Any) -> None:
        q, metrics = self.tasks.values(query_loss, stage.point, data, stage.shared)
        self.record(stage, weight, q, metrics)

    def result(self) -> MetaStepOutput:
        if self.rates is not None or self.learned is not None:
            return self._result_with_coefficients()
        if not self.stage_losses:  # every b_j == 0: no query loss, the meta-loss is constant
            return self.output(torch.zeros_like(self.theta))
        with self.tasks.vmap_errors():
            return self.output(loss_gradient(self.loss, self.theta))

    def _result_with_coefficients(self) -> MetaStepOutput:
        rate_leaves = self.rates.tensors if self.rates is not None else []
        leaves = [*rate_leaves, *(self.learned.tensors if self.learned is not None else [])]
        if not self.stage_losses:
            grads: Sequence[Tensor | None] = [torch.zeros_like(self.theta), *([None] * len(leaves))]
        else:
            with self.tasks.vmap_errors():
                grads = torch.autograd.grad(_tracked(self.loss), [self.theta, *leaves], allow_unused=True)
        direction, *leaf_grads = grads
        if direction is None:
            raise ValueError(DETACHED_LOSS)
        extra = [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(leaves, leaf_grads, strict=True)]
        n = len(rate_leaves)
        return RatesStepOutput(self.output(direction), extra[:n], extra[n:])


class FirstOrderDirection(_MetaLoss):
    """``d = (1/T) sum_j b_j sum_i grad L_Q,i(theta_i^(j))`` with the slopes held constant.

    Each stage's query gradients come from one ordinary backward through the vmapped losses at a detached
    copy of the point (cheaper than per-task gradients inside vmap), and that stage's graph is freed before
    the next stage is built; the weighted sum over stages and tasks is one fused ``combine``.
    """

    second_order = False

    def __init__(
        self,
        theta: Tensor,
        tasks: TaskMap,
        backend: str,
        workspace: Workspace | None,
        rates: LearnedRates | None = None,
        learned: TableauCoefficients | None = None,
    ) -> None:
        self.theta = theta.detach()
        super().__init__(self.theta, tasks)
        self.backend, self.workspace = backend, workspace
        self.rates, self.learned = rates, learned
        self.rate_grads: dict[int, Tensor] = {}  # d meta-loss / d r_set [N], slopes held constant
        if learned is not None:  # d meta-loss / d A [s, s] (slopes held constant) and / d b [s]
            self.grad_A = theta.new_zeros(learned.stages, learned.stages)
            self.grad_b = theta.new_zeros(learned.stages)
        self.per_task: list[tuple[Tensor, float]] = []  # query gradients [T, N] and their weights b_j / T
        self.summed: list[tuple[Tensor, float]] = []  # at a shared point the backward already summed the tasks

    def grad_mode(self) -> AbstractContextManager:
        return nullcontext()

    def add(self, stage: Stage, weight: float, query_loss: TaskLoss, data: Any) -> None:
        leaf = stage.point.detach().requires_grad_()
        with torch.enable_grad():
            q, metrics = self.tasks.values(query_loss, leaf, data, stage.shared)
            with self.tasks.vmap_errors():
                g = loss_gradient(q.sum(), leaf)
        (self.summed if stage.shared else self.per_task).append((g, weight / self.tasks.num_tasks))
        learned_rates = self.rates if self.rates is not None and self.rates.learned else None
        if learned_rates is not None or self.learned is not None:
            # with u_jm = sum_i g_ij ⊙ k_im, the meta-loss b_j mean_i L_Q,i(theta - sum_m A_jm r_m ⊙ k_im) has
            # d/d r_m = -(b_j / T) A_jm u_jm and d/d A_jm = -(b_j / T) <r_m, u_jm>
            scale = -weight / self.tasks.num_tasks
            for m, a, r, k in stage.terms:
                u = (g * k).sum(0)
                if learned_rates is not None:
                    s = min(m, learned_rates.sets - 1)
                    term = u * (a * scale)
                    self.rate_grads[s] = term if s not in self.rate_grads else self.rate_grads[s] + term
                if self.learned is not None:
                    self.grad_A[stage.index, m] += scale * torch.dot(r, u)
        if self.learned is not None:
            self.grad_b[stage.index] = q.detach().mean()  # d/d b_j: the stage's mean query loss
        self.record(stage, weight, q.detach(), metrics)

    def result(self) -> MetaStepOutput:
        out = self.workspace.get("direction", tuple(self.theta.shape), self.theta) if self.workspace else None
        if self.per_task:
            grads, weights = zip(*self.per_task, strict=True)
            direction = combine(list(grads), list(weights), out=out, backend=self.backend)
        else:
            direction = out.zero_() if out is not None else torch.zeros_like(self.theta)
        for g, w in self.summed:
            axpy_(direction, g, w, backend=self.backend)
        if self.rates is not None or self.learned is not None:
            rate_grads = self.rates.reduce(self.rate_grads) if self.rates is not None else []
            tableau_grads = self.learned.reduce(self.grad_A, self.grad_b) if self.learned is not None else []
            return RatesStepOutput(self.output(direction), rate_grads, tableau_grads)
        return self.output(direction)


# -- the RK meta-step -----------------------------------------------------------------------------------


def rk_meta_step(
    theta: Tensor,
    support_loss: TaskLoss,
    query_loss: TaskLoss,
    support_data: TaskData,
    query_data: TaskData,
    tableau: Tableau | TableauCoefficients | str,
    inner_lr: float,
    *,
    first_order: bool = False,
    vectorize: bool = True,
    num_tasks: int | None = None,
    randomness: Randomness = "different",
    backend: Backend = "auto",
    workspace: Workspace | None = None,
    rates: LearnedRates | None = None,
    memory: Memory | None = None,
) -> MetaStepOutput:
    """One Runge-Kutta meta-step over a batch of tasks (``docs/method.md``).

    Stage points ``theta_i^(j) = theta - h sum_{m<j} A[j][m] k_i^(m)`` with the support slopes ``k_i^(m)``;
    the meta-direction is the gradient of ``(1/T) sum_i sum_j b_j L_Q,i(theta_i^(j))``
    (:class:`SecondOrderDirection`), or with the slopes held constant (:class:`FirstOrderDirection`).

    Args:
        theta: flat meta-parameters ``[N]`` (not modified).
        support_loss, query_loss: per-task losses ``loss(row, data)`` (see :mod:`rkfast.taskmap`).
        support_data, query_data: task data, pytrees with the task dimension first or stage callables.
        tableau: a :class:`~rkfast.tableau.Tableau`, its name (``"maml"``, ``"rk4"``, ``"maml(3)"``...), or a
            bound ``LearnedTableau`` (:class:`~rkfast.learned.TableauCoefficients`): ``A`` (and ``b``) at its
            tensors' current values; the result's ``tableau_directions`` are the meta-loss's gradients for them.
        inner_lr: the RK step ``h`` of the stages, a finite number ``> 0`` (:func:`check_step`).
        first_order: treat the support gradients as constants (no Hessian-vector products).
        vectorize: all tasks at once under ``vmap``; ``False`` runs them one by one with plain autograd.
        num_tasks: ``T``; needed only when both data are callables. randomness: ``vmap``'s, for dropout.
        backend: kernels for the stage points and the first-order reduction (:mod:`rkfast.kernels`).
        workspace: reuse its buffers for the first-order stage points and meta-direction (:class:`Workspace`).
        rates: learned (or fixed per-tensor) inner rates, :class:`~rkfast.learned.LearnedRates`: ``h`` becomes
            ``r_m = rates.vector(m)`` in the stage points, and the result is a
            :class:`~rkfast.learned.RatesStepOutput` with the gradients for ``rates.tensors`` (first order: slopes
            held constant; ``docs/method.md``, "Learned inner rates" and "Learned tableaus").
        memory: the memory levers (:class:`~rkfast.memory.Memory`; default: none, but the task-by-task path
            back-propagates one task at a time). Chunks change only the rounding (and random draws under vmap).

    Returns:
        :class:`MetaStepOutput` with the flat meta-direction, meta-loss and per-stage query losses.

    Raises:
        ValueError: a per-task loss that is not a 0-d tensor or does not depend on the parameters (detached);
            ``inner_lr`` not a finite number ``> 0``; ``memory.recompute`` with ``first_order``.
        VmapUnsupportedError: (``vectorize=True``) the model or loss cannot run under ``vmap`` (:mod:`rkfast.taskmap`).
    """
    check_theta(theta)
    plan = Memory() if memory is None else memory
    h = check_step("inner_lr", inner_lr)
    backend = resolve_backend(backend, theta.device, theta.dtype)  # a bad choice fails before any work
    plan.check_compatible(first_order=first_order)
    if plan.amp_dtype is not None:
        support_loss, query_loss = AutocastLoss(support_loss, plan.amp_dtype), AutocastLoss(query_loss, plan.amp_dtype)
    count = resolve_num_tasks(num_tasks, support_data, query_data)
    learned = tableau if isinstance(tableau, TableauCoefficients) else None
    tab = tableau.structure if isinstance(tableau, TableauCoefficients) else get_tableau(tableau)
    step = _StepPlan(theta, support_loss, query_loss, tab, learned, h, first_order, backend, workspace, rates)
    map_type = _task_map_type(plan, tab)
    chunk = plan.chunk_size(count, vectorize, callable(support_data) or callable(query_data))
    if chunk >= count:
        return step.run(support_data, query_data, map_type(count, vectorize, randomness))
    support_data, query_data = step.recorded_stage_data(support_data, query_data, TaskMap(count, vectorize, randomness))
    total = ChunkSum(count)
    for start, stop in task_ranges(count, chunk):
        support, query = (
            d.chunk(start, stop) if isinstance(d, RecordedStages) else slice_tasks(d, start, stop)
            for d in (support_data, query_data)
        )
        total.add(step.run(support, query, map_type(stop - start, vectorize, randomness)), stop - start)
    return total.result()


def _task_map_type(plan: Memory, tab: Tableau) -> Callable[..., TaskMap]:
    """How the step maps its tasks: :class:`~rkfast.recompute.RecomputingTaskMap` with ``plan.recompute`` (the
    last stage's query graph kept, see there), else the plain :class:`~rkfast.taskmap.TaskMap`."""
    if not plan.recompute:
        return TaskMap
    last_query = max((j for j, q in enumerate(tab.needs_query_loss) if q), default=None)
    return functools.partial(RecomputingTaskMap, keep_step=last_query)


@dataclass(frozen=True)
class _StepPlan:
    """One meta-step's checked settings (:func:`rk_meta_step`), what each of its task chunks runs with:
    ``tab`` the tableau's structure, ``learned`` its bound learned coefficients (``None``: fixed)."""

    theta: Tensor
    support_loss: TaskLoss
    query_loss: TaskLoss
    tab: Tableau
    learned: TableauCoefficients | None
    h: float
    first_order: bool
    backend: str
    workspace: Workspace | None
    rates: LearnedRates | None

    def run(self, support_data: TaskData, query_data: TaskData, tasks: TaskMap) -> MetaStepOutput:
        """The meta-step over the tasks of ``tasks``."""
        rule = FirstOrderDirection if self.first_order else SecondOrderDirection
        direction = rule(self.theta, tasks, self.backend, self.workspace, self.rates, self.learned)
        one_pass = _one_pass_direction(
            direction, self.tab, self.h, self.backend, self.support_loss, support_data, self.query_loss, query_data
        )
        if one_pass is not None:
            return one_pass
        with direction.grad_mode():
            rate_of, matrix, weights = _stage_coefficients(
                self.theta, self.tab, self.h, self.rates, self.learned, self.first_order
            )
            points = stage_points(
                direction.theta, self.tab, self.h, tasks, self.support_loss, support_data,
                second_order=rule.second_order, backend=self.backend,
                workspace=self.workspace if self.first_order else None, rates=rate_of, matrix=matrix,
            )  # fmt: skip
            for stage in points:
                with at_step(stage.index):
                    data = tasks.data(query_data, stage.index, stage.point, stage.shared)
                    direction.add(stage, weights[stage.index], self.query_loss, data)
            return direction.result()

    def recorded_stage_data(self, support_data: TaskData, query_data: TaskData, tasks: TaskMap) -> tuple[Any, Any]:
        """The task data for chunks: stage callables are called once for the whole meta-batch ``tasks``, in a
        graph-free pass over the stages in the unchunked step's order and at its points, each call's data
        recorded for the chunks to slice (:class:`~rkfast.chunks.RecordedStages`); pytrees as they are."""
        if not (callable(support_data) or callable(query_data)):
            return support_data, query_data
        support, query = (RecordedStages(d) if callable(d) else d for d in (support_data, query_data))
        with torch.no_grad():
            rate_of, matrix, _ = _stage_coefficients(self.theta, self.tab, self.h, self.rates, self.learned, True)
            points = stage_points(
                self.theta.detach(), self.tab, self.h, tasks, self.support_loss, support, second_order=False,
                backend=self.backend, rates=rate_of, matrix=matrix,
            )  # fmt: skip
            for stage in points:
                with at_step(stage.index):
                    tasks.data(query, stage.index, stage.point, stage.shared)
        return support, query


def _one_pass_direction(
    direction: SecondOrderDirection | FirstOrderDirection,
    tab: Tableau,
    h: float,
    backend: str,
    support_loss: TaskLoss,
    support_data: TaskData,
    query_loss: TaskLoss,
    query_data: TaskData,
) -> MetaStepOutput | None:
    """The second-order meta-direction from every stage's query losses computed in one ``vmap`` over the tasks
    (:func:`~rkfast.taskmap.stage_query_losses`), where that applies; ``None``, with nothing recorded, where
    not: the stage-by-stage loop of :func:`rk_meta_step` runs then.

    It applies where it gives the stage-by-stage step's very bits: the pure-PyTorch kernels (``backend``
    ``"torch"``: one pass computes the stage points with their arithmetic; the fused kernels round the points
    and sum their gradients over the tasks in another order), no learned coefficients, no stage
    recomputation, and :func:`~rkfast.taskmap.one_pass_applies`. So a faster schedule never changes a result.
    """
    if backend != "torch" or not isinstance(direction, SecondOrderDirection):
        return None
    if direction.rates is not None or direction.learned is not None:
        return None
    if isinstance(direction.tasks, RecomputingTaskMap):  # one pass keeps every stage's graph
        return None
    tasks, theta = direction.tasks, direction.theta
    if not any(tab.needs_query_loss) or not one_pass_applies(tasks, theta, support_loss, support_data, query_data):
        return None
    with direction.grad_mode():
        stages = stage_query_losses(tasks, theta, tab, h, support_loss, support_data, query_loss, query_data)
        if stages is None:
            return None
        for j, q, metrics in stages:  # the meta-loss reads each stage's index, not its point
            direction.record(Stage(j, theta, not tab.coefficients(j)), tab.b[j], q, metrics)
        return direction.result()


def _stage_coefficients(
    theta: Tensor,
    tab: Tableau,
    h: float,
    rates: LearnedRates | None,
    learned: TableauCoefficients | None,
    first_order: bool,
) -> tuple[Callable[[int], Tensor] | None, Tensor | None, list[Any]]:
    """What the stage points and the meta-loss read of the learned coefficients: the rate vector of slope
    ``m`` (``None``: the fixed step ``h``), the learned ``A`` (``None``: the tableau's) and the weights ``b``
    (tensors for second order, differentiated; plain numbers for first order, whose coefficient directions
    are formulas, so nothing is differentiated through them)."""
    rate_of: Callable[[int], Tensor] | None = None
    matrix: Tensor | None = None
    weights: list[Any] = list(tab.b)
    with torch.no_grad() if first_order else nullcontext():
        if rates is not None:
            rate_of = _rate_vectors([rates.vector(s) for s in range(rates.sets)])
        if learned is not None:
            capturing = theta.is_cuda and torch.cuda.is_current_stream_capturing()
            if capturing and first_order:
                raise ValueError(
                    "a learned tableau's first-order step reads its weights b on the host, which a "
                    "CUDA graph cannot capture: use second order or capture=False"
                )
            matrix = learned.matrix().to(theta.dtype)
            b = learned.weights(matrix, check=not capturing)  # captured: a singular b skips the step
            weights = b.tolist() if first_order else list(b.unbind())  # first order: plain weights for combine
            if rate_of is None:  # the fixed step h as a rate vector: the points' coefficients are A's tensors
                rate_of = _rate_vectors([theta.new_full(theta.shape, h)])
    return rate_of, matrix, weights


def _rate_vectors(vectors: list[Tensor]) -> Callable[[int], Tensor]:
    """Slope ``m``'s rate vector: set ``m``, the last set for later slopes (one set: every slope's)."""
    return lambda m: vectors[min(m, len(vectors) - 1)]


def adapt(
    theta: Tensor,
    support_loss: TaskLoss,
    query_loss: TaskLoss,
    support_data: TaskData,
    query_data: TaskData,
    step_size: float,
    steps: Sequence[int] = (1, 5, 10),
    *,
    vectorize: bool = True,
    num_tasks: int | None = None,
    randomness: Randomness = "different",
    keep_params: bool = False,
    rates: Callable[[int], Tensor] | None = None,
    stages: StageMap | None = None,
) -> AdaptationOutput:
    """Meta-test adaptation: from ``theta``, plain gradient steps on each task's support set.

    ``stages`` (a :class:`StageMap`) replaces each gradient step by the tableau's own adaptation: the stage
    points of one RK meta-step from the current parameters, computed from support gradients only, ending at
    the last stage's point (``docs/method.md``, "Meta-test"); ``step_size`` is then the RK step ``h``. For
    ``maml(k)`` one such step is ``k`` gradient steps; for ``rk4`` it is the point its last stage trained.

    ``rates`` (learned inner rates): ``rates(n)`` is a per-element rate vector ``[N]`` for step ``n``
    (0-based: the step from the parameters after ``n`` steps), and that step is
    ``params - (step_size * rates(n)) ⊙ grad``: ``step_size`` is then the factor that scales the rates
    (``MetaOptimizer.evaluate`` passes ``Tableau.test_step(h) / h``), and is what the output reports.

    Reports every task's query loss (and metrics) before adaptation and after each count in ``steps``,
    and with ``keep_params`` the adapted parameters too. Callable data are called with the number of
    steps taken so far as ``stage``, which is also :func:`rkfast.norms.current_step` meanwhile (per-step
    norm layers use its row). ``theta`` is not modified and no autograd graph is kept.

    ``step_size`` must be a finite number ``> 0`` (:func:`check_step`) and ``steps`` positive integers
    (:func:`check_step_counts`). The support losses are checked as in :func:`rk_meta_step` (0-d per task,
    dependent on the parameters), and ``vectorize=True`` raises :class:`VmapUnsupportedError` for a model
    or loss that cannot run under ``vmap``.
    """
    check_theta(theta)
    alpha = check_step("step_size", step_size)
    counts = check_step_counts(steps)
    tasks = TaskMap(resolve_num_tasks(num_tasks, support_data, query_data), vectorize, randomness)
    report = (0, *counts)
    losses: list[Tensor] = []
    metrics: dict[str, list[Tensor]] = {}
    kept: list[Tensor] = []
    params, shared = theta.detach(), True
    with torch.no_grad():
        for n in range(counts[-1] + 1):
            with at_step(n):  # per-step layers (rkfast.norms) normalize for the n-th step
                if n in report:
                    q, m = tasks.values(query_loss, params, tasks.data(query_data, n, params, shared), shared)
                    losses.append(q.detach())
                    for name, value in m.items():
                        metrics.setdefault(name, []).append(value.detach())
                    if keep_params:
                        kept.append(params.expand(tasks.num_tasks, -1) if shared else params)
                if n < counts[-1] and stages is not None:
                    params = stages.last_point(params, shared, alpha, tasks, support_loss, support_data)
                    shared = False
                elif n < counts[-1]:
                    data = tasks.data(support_data, n, params, shared)
                    g = tasks.grads(support_loss, params, data, shared, create_graph=False)
                    params = params - (alpha if rates is None else alpha * rates(n).detach()) * g
                    shared = False
    return AdaptationOutput(
        report,
        alpha,
        torch.stack(losses),
        {k: torch.stack(v) for k, v in metrics.items()},
        torch.stack(kept) if keep_params else None,
    )


@dataclass
class StageMap:
    """The adaptation one RK meta-step trains: from parameters ``p`` (``[N]`` shared, or ``[T, N]``), the stage
    points ``p^(j) = p - sum_{m<j} A[j][m] (r_m ⊙ k^(m))`` with the support slopes ``k^(m)``, up to the last
    stage, whose point is the adapted parameters (what :func:`adapt` uses with ``stages=``).

    Attributes:
        tableau: a fixed tableau, or a learned one at its current values (``TableauCoefficients.current()``).
        rates: per-slope rate vectors ``rates(m) [N]`` (learned inner rates), or ``None``: the step ``h``.
    """

    tableau: Tableau
    rates: Callable[[int], Tensor] | None = None

    def last_point(
        self, params: Tensor, shared: bool, h: float, tasks: TaskMap, support_loss: TaskLoss, support_data: TaskData
    ) -> Tensor:
        """The last stage's point from ``params`` (no graph kept; per-step layers use stage ``j``'s row)."""
        slopes: dict[int, Tensor] = {}

        def point(j: int) -> tuple[Tensor, bool]:
            p, p_shared = params, shared
            for m, a in self.tableau.coefficients(j):
                step = h if self.rates is None else h * self.rates(m).detach()
                p, p_shared = p - (step * a) * slopes[m], False
            return p, p_shared

        last = self.tableau.stages - 1
        for j in range(last):
            if self.tableau.needs_support_grad[j]:
                p, p_shared = point(j)
                with at_step(j):
                    data = tasks.data(support_data, j, p, p_shared)
                    slopes[j] = tasks.grads(support_loss, p, data, p_shared, create_graph=False)
        return point(last)[0]


# -- losses over a module's functional call -------------------------------------------------------------


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, PerStepBatchNorm)


def has_norm_layers(module: nn.Module) -> bool:
    """Whether ``module`` has batch/instance/layer norm layers, :class:`~rkfast.norms.PerStepBatchNorm`
    included (their second derivatives need the exact rewrite under ``vmap``: :mod:`rkfast._norms`)."""
    return any(isinstance(m, _NORM_TYPES) for m in module.modules())


def model_call(module: nn.Module, *, batch_statistics: bool = True) -> Callable[..., Any]:
    """``call(params, *inputs, **kwargs)``: ``module`` run on ``params`` (names to tensors; the others are the
    module's own) with ``torch.func.functional_call``.

    With ``batch_statistics`` (MAML's convention) its BatchNorm/InstanceNorm layers normalize with each
    call's batch statistics and neither read nor update their running statistics, which stay on the module
    untouched (:func:`rkfast.norms.batch_statistics`, entered for the call only); ``False`` runs the layers
    as they are configured (running statistics read in ``eval()`` and updated in ``train()`` mode, which
    ``vmap`` cannot do).
    """
    layers = statistics_layers(module) if batch_statistics else ()

    def call(params: dict[str, Tensor], *inputs: Any, **kwargs: Any) -> Any:
        if not layers:
            return functional_call(module, params, inputs, kwargs)
        with norms.batch_statistics(layers):
            return functional_call(module, params, inputs, kwargs)

    return call


def model_task_loss(
    module: nn.Module,
    loss: ModelLoss,
    layout: ParamLayout | None = None,
    *,
    norm_layers: bool | None = None,
    batch_statistics: bool = True,
) -> TaskLoss:
    """The per-task loss ``row, data -> loss(model, data)`` for the core functions.

    ``model(*inputs)`` runs ``module`` with ``torch.func.functional_call`` on the parameters viewed out of
    ``row`` (``layout`` says where each one lives; default: all of the module's parameters); its buffers
    are its own. ``batch_statistics`` (default): norm layers use each call's batch statistics and leave
    their running statistics alone (:func:`model_call`). ``norm_layers`` (default: looked up in ``module``)
    says whether the model normalizes.
    """
    return _ModelTaskLoss(
        layout or ParamLayout.from_module(module),
        model_call(module, batch_statistics=batch_statistics),
        loss,
        has_norm_layers(module) if norm_layers is None else norm_layers,
    )


class _ModelTaskLoss:
    """:func:`model_task_loss`'s loss; ``has_norm_layers`` is what :mod:`rkfast.taskmap` reads of a loss."""

    def __init__(self, layout: ParamLayout, call: Callable[..., Any], loss: ModelLoss, norm_layers: bool) -> None:
        self.layout, self.call, self.loss, self.has_norm_layers = layout, call, loss, norm_layers

    def __call__(self, row: Tensor, data: Any) -> Any:
        params = self.layout.unflatten(row)
        return self.loss(lambda *inputs, **kwargs: self.call(params, *inputs, **kwargs), data)


_REGRESSION_LOSSES = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)
_REGRESSION_MODULES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)
_CLASS_LOSSES = (F.cross_entropy, F.nll_loss)
_CLASS_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)


def _loss_name(loss_fn: Callable) -> str:
    return getattr(loss_fn, "__name__", None) or type(loss_fn).__name__


def _reshape_hint(out: tuple[int, ...], y: tuple[int, ...]) -> str:
    if out == (*y, 1):
        return (
            "give the targets the outputs' trailing dimension (y.unsqueeze(-1)) "
            "or squeeze the outputs (out.squeeze(-1))"
        )
    if y == (*out, 1):
        return "squeeze the targets' trailing dimension (y.squeeze(-1)) or give the outputs one (out.unsqueeze(-1))"
    return "reshape the targets or the model's outputs so that they match"


def _same_shape(name: str) -> Callable[[Tensor, Tensor], None]:
    """The check of a regression loss: outputs and targets of one shape (no silent broadcasting)."""

    def check(out: Tensor, y: Tensor) -> None:
        o, t = tuple(out.shape), tuple(y.shape)
        if o != t:
            raise ValueError(
                f"{name} needs outputs and targets of the same shape, got outputs {o} and targets {t} per task "
                f"(they would broadcast against each other); {_reshape_hint(o, t)}"
            )

    return check


def _class_targets(name: str) -> Callable[[Tensor, Tensor], None]:
    """The check of a classification loss: class indices ``[K]`` for outputs ``[K, C]`` (torch's layout,
    ``[K, C, d...]`` for ``[K, d...]`` too); class probabilities of the outputs' shape."""

    def check(out: Tensor, y: Tensor) -> None:
        o, t = tuple(out.shape), tuple(y.shape)
        if y.is_floating_point():
            if o != t:
                raise ValueError(
                    f"{name} with class-probability targets needs targets of the outputs' shape, got outputs {o} "
                    f"and targets {t} per task; {_reshape_hint(o, t)}"
                )
            return
        expected = o[:1] + o[2:] if len(o) >= 2 else ()
        if len(o) == 0 or t != expected:
            hint = (
                "squeeze the targets' trailing dimension (y.squeeze(-1))"
                if t == (*expected, 1)
                else "reshape the targets to one class index per output row"
            )
            raise ValueError(
                f"{name} with class-index targets needs outputs [K, C] and targets [K] per task (or [K, C, d...] "
                f"and [K, d...]), got outputs {o} and targets {t} per task; {hint}"
            )

    return check


def target_check(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], None] | None:
    """The output/target shape check for a built-in loss (through ``functools.partial``), or ``None``.

    Regression losses (``F.mse_loss``, ``F.l1_loss``, ``F.smooth_l1_loss``, ``F.huber_loss`` and their
    modules) need outputs and targets of equal shape: torch would broadcast ``[K, 1]`` against ``[K]`` to
    ``[K, K]`` with only a warning. Classification losses (``F.cross_entropy``, ``F.nll_loss`` and their
    modules) need torch's layout. Other loss functions are not checked.
    """
    fn = loss_fn
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = _loss_name(fn)
    if any(fn is f for f in _REGRESSION_LOSSES) or isinstance(fn, _REGRESSION_MODULES):
        return _same_shape(name)
    if any(fn is f for f in _CLASS_LOSSES) or isinstance(fn, _CLASS_MODULES):
        return _class_targets(name)
    return None


def supervised_loss(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> ModelLoss:
    """``model, (x, y) -> loss_fn(model(x), y)``; with integer targets and outputs that carry a class
    dimension last, the loss also reports ``accuracy`` (argmax over the last dimension).

    For the built-in regression and classification losses the shapes of each task's outputs and targets
    are checked first (:func:`target_check`: ``ValueError`` naming both shapes and how to fix them).
    """
    check = target_check(loss_fn)

    def loss(model: Callable[..., Tensor], data: tuple[Tensor, Tensor]) -> tuple[Tensor, Metrics]:
        x, y = data
        out = model(x)
        if check is not None:
            check(out, y)
        value = loss_fn(out, y)
        metrics: Metrics = {}
        if not y.is_floating_point() and out.dim() == y.dim() + 1:
            metrics["accuracy"] = (out.argmax(-1) == y).to(value.dtype).mean()
        return value, metrics

    return loss


def module_task_loss(
    module: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    layout: ParamLayout | None = None,
    *,
    batch_statistics: bool = True,
) -> TaskLoss:
    """The per-task loss ``row, (x, y) -> loss_fn(module(x; row), y)`` (plus ``accuracy`` for class
    indices, see :func:`supervised_loss`) for the core functions; ``batch_statistics`` as in
    :func:`model_call`."""
    return model_task_loss(module, supervised_loss(loss_fn), layout, batch_statistics=batch_statistics)


def meta_step(
    module: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    theta: Tensor,
    batch: TaskBatch,
    tableau: Tableau | str,
    inner_lr: float,
    *,
    first_order: bool = False,
    vectorize: bool = True,
    layout: ParamLayout | None = None,
    backend: Backend = "auto",
    workspace: Workspace | None = None,
    batch_statistics: bool = True,
    rates: LearnedRates | None = None,
    memory: Memory | None = None,
) -> MetaStepOutput:
    """:func:`rk_meta_step` for a module, a loss function and a :class:`~rkfast.batch.TaskBatch`
    (``batch_statistics``: see :func:`model_call`; ``rates``: learned inner rates and ``memory``: the memory
    levers, see :func:`rk_meta_step`)."""
    loss = module_task_loss(module, loss_fn, layout, batch_statistics=batch_statistics)
    return rk_meta_step(
        theta,
        loss,
        loss,
        batch.support,
        batch.query,
        tableau,
        inner_lr,
        first_order=first_order,
        vectorize=vectorize,
        backend=backend,
        workspace=workspace,
        rates=rates,
        memory=memory,
    )


def evaluate(
    module: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    theta: Tensor,
    batch: TaskBatch,
    step_size: float,
    steps: Sequence[int] = (1, 5, 10),
    *,
    vectorize: bool = True,
    layout: ParamLayout | None = None,
    keep_params: bool = False,
    batch_statistics: bool = True,
    rates: Callable[[int], Tensor] | None = None,
) -> AdaptationOutput:
    """:func:`adapt` for a module, a loss function and a :class:`~rkfast.batch.TaskBatch`
    (``batch_statistics``: see :func:`model_call`; ``rates``: per-step rate vectors, see :func:`adapt`)."""
    loss = module_task_loss(module, loss_fn, layout, batch_statistics=batch_statistics)
    return adapt(
        theta,
        loss,
        loss,
        batch.support,
        batch.query,
        step_size,
        steps,
        vectorize=vectorize,
        keep_params=keep_params,
        rates=rates,
    )


def use_batch_statistics(module: nn.Module) -> nn.Module:
    """Make every normalization layer use per-call batch statistics for good, removing its running statistics.

    Destructive: modifies ``module`` in place (``track_running_stats=False``, running buffers removed: a
    ``state_dict`` saved before no longer loads strictly, and ``eval()`` normalizes with batch statistics
    too) and returns it. rkfast does not need it: its own calls (:func:`model_call`, ``MetaOptimizer`` with
    ``batch_statistics=True``) already normalize with each task's batch statistics and leave the running
    statistics untouched; :func:`rkfast.norms.batch_statistics` does the same for a block of your code.
    Use this only to make the switch permanent, e.g. for a model that should never use running statistics.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return module
