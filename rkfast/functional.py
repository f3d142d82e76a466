"""The batched Runge-Kutta meta-step and meta-test adaptation, as pure functions over flat parameters.

The core (:func:`rk_meta_step`, :func:`adapt`) knows nothing of modules or ``(x, y)`` data: it works on

* ``theta``: the meta-parameters as one flat vector ``[N]``;
* per-task losses ``loss(row, data)``, where ``row`` is one task's flat parameters ``[N]`` and ``data``
  one task's data (any pytree); a loss returns a scalar, or ``(scalar, {"metric": scalar})``;
* task data, either a pytree whose leaves carry the task dimension first, or a callable
  ``data(stage, params[T, N]) -> pytree`` that produces each stage's data from that stage's (detached)
  parameters, as reinforcement learning does with rollouts of each stage's own policy.

All tasks run at once under ``torch.func.vmap`` (``vectorize=True``) or one after another with plain
autograd (``vectorize=False``, for models that cannot run under vmap); both compute the same math.
:func:`meta_step` and :func:`evaluate` build the common ``module + loss_fn + TaskBatch`` case on top.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

from ._norms import elementary_norms
from .batch import TaskBatch
from .kernels import Backend, axpy_, combine, resolve_backend, stage_point
from .tableau import Tableau, get_tableau

__all__ = [
    "ParamLayout",
    "TaskLoss",
    "TaskData",
    "MetaStepOutput",
    "AdaptationOutput",
    "Workspace",
    "rk_meta_step",
    "adapt",
    "stage_point",
    "combine",
    "module_task_loss",
    "meta_step",
    "evaluate",
    "use_batch_statistics",
    "mean_ci95",
]

Metrics = dict[str, Tensor]
TaskLoss = Callable[[Tensor, Any], Union[Tensor, tuple[Tensor, Metrics]]]
"""``loss(row[N], one_task_data) -> scalar`` or ``(scalar, {name: scalar})``.

A loss may carry ``has_norm_layers = False`` to say it calls no batch/instance/layer norm, which lets
the vectorized path skip the exact-norm rewrite (:mod:`rkfast._norms`); without it the rewrite is on."""
TaskData = Union[Any, Callable[[int, Tensor], Any]]
"""A pytree with the task dimension first, or ``data(stage, params[T, N]) -> pytree``."""
Randomness = Literal["error", "different", "same"]


# -- flat parameters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamLayout:
    """Where each named parameter lives inside a flat vector: ``row[offset : offset + numel].view(shape)``."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_named(cls, named: Iterable[tuple[str, Tensor]]) -> ParamLayout:
        pairs = list(named)
        return cls(tuple(n for n, _ in pairs), tuple(t.shape for _, t in pairs))

    @classmethod
    def from_module(cls, module: nn.Module) -> ParamLayout:
        """The layout of ``module.named_parameters()`` (tied parameters once)."""
        return cls.from_named(module.named_parameters())

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        """``N``, the length of the flat vector."""
        return sum(self.numels)

    def flatten(self, tensors: Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        """Concatenate tensors (in layout order) into a new flat vector."""
        if isinstance(tensors, Mapping):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, row: Tensor) -> dict[str, Tensor]:
        """Views of a flat ``row [N]`` (or ``[..., N]``) as the named parameter shapes."""
        chunks = torch.split(row, self.numels, dim=-1)
        lead = row.shape[:-1]
        return {n: c.view(*lead, *s) for n, c, s in zip(self.names, chunks, self.shapes)}


# -- results ------------------------------------------------------------------------------------------


@dataclass
class MetaStepOutput:
    """What one RK meta-step computed (all tensors detached).

    Attributes:
        direction: the meta-direction ``d = grad_theta L(theta)``, flat ``[N]``.
        loss: the meta-loss ``L(theta) = sum_j b_j * mean_i L_Q,i(theta_i^(j))``, 0-d.
        stage_losses: ``{stage: mean query loss over tasks}`` for each stage with ``b_j != 0``; stages are
            numbered from 1 as in the method (stage 1 is ``theta`` itself).
        stage_metrics: ``{metric: {stage: mean over tasks}}``, e.g. ``{"accuracy": {2: ...}}``.
    """

    direction: Tensor
    loss: Tensor
    stage_losses: dict[int, Tensor]
    stage_metrics: dict[str, dict[int, Tensor]] = field(default_factory=dict)


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval (``1.96 * std / sqrt(n)``)."""
    v = values.detach().double().reshape(-1)
    n = v.numel()
    if n == 0:
        raise ValueError("mean_ci95 of an empty tensor")
    half = 1.96 * v.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return v.mean().item(), half


@dataclass
class AdaptationOutput:
    """Query loss (and metrics) per task after each number of plain support-gradient steps.

    Attributes:
        steps: the step counts, always starting with 0 (before adaptation).
        step_size: the adaptation step that was used.
        losses: ``[len(steps), T]`` per-task query losses.
        metrics: ``{name: [len(steps), T]}``.
        params: ``[len(steps), T, N]`` adapted flat parameters, when asked for (``keep_params=True``).
    """

    steps: tuple[int, ...]
    step_size: float
    losses: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    params: Tensor | None = None

    def summary(self) -> dict[str, Any]:
        """``{"step_size", "steps", "loss": {step: (mean, ci95)}, <metric>: {...}}``, JSON-friendly."""
        out: dict[str, Any] = {"step_size": self.step_size, "steps": list(self.steps)}
        for name, table in {"loss": self.losses, **self.metrics}.items():
            out[name] = {n: mean_ci95(row) for n, row in zip(self.steps, table)}
        return out

    @staticmethod
    def cat(parts: Sequence[AdaptationOutput]) -> AdaptationOutput:
        """Join results of several task batches (same steps and step size) along the task dimension."""
        if not parts:
            raise ValueError("AdaptationOutput.cat needs at least one result")
        first = parts[0]
        if any(p.steps != first.steps or p.step_size != first.step_size for p in parts):
            raise ValueError("AdaptationOutput.cat: results differ in steps or step size")
        keep = all(p.params is not None for p in parts)
        return AdaptationOutput(
            first.steps,
            first.step_size,
            torch.cat([p.losses for p in parts], dim=1),
            {k: torch.cat([p.metrics[k] for p in parts], dim=1) for k in first.metrics},
            torch.cat([p.params for p in parts], dim=1) if keep else None,  # type: ignore[misc]
        )


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


# -- evaluating a per-task function over all tasks ----------------------------------------------------


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


class _TaskMap:
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
        exact under vmap (measured: first-order directions through BatchNorm equal the sequential ones to
        1e-15), so every other call keeps the fused, faster and leaner, kernels."""
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


def _resolve_num_tasks(num_tasks: int | None, *datas: TaskData) -> int:
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


def _check_theta(theta: Tensor) -> None:
    if not isinstance(theta, Tensor) or theta.dim() != 1:
        shape = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
        raise ValueError(f"theta must be a flat parameter vector [N], got {shape}")
    if not theta.is_floating_point():
        raise TypeError(f"theta must be floating point, got {theta.dtype}")


def _check_step(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


# -- the RK meta-step -----------------------------------------------------------------------------------


def rk_meta_step(
    theta: Tensor,
    support_loss: TaskLoss,
    query_loss: TaskLoss,
    support_data: TaskData,
    query_data: TaskData,
    tableau: Tableau | str,
    inner_lr: float,
    *,
    first_order: bool = False,
    vectorize: bool = True,
    num_tasks: int | None = None,
    randomness: Randomness = "different",
    backend: Backend = "auto",
    workspace: Workspace | None = None,
) -> MetaStepOutput:
    """One Runge-Kutta meta-step over a batch of tasks (DESIGN.md, sections 1-2).

    For each task ``i`` and stage ``j`` the stage point is
    ``theta_i^(j) = theta - h * sum_{l<j} A[j][l] * k_i^(l)`` with ``k_i^(l)`` the support gradient at
    ``theta_i^(l)``; the meta-loss is ``(1/T) sum_i sum_j b_j L_Q,i(theta_i^(j))`` and the meta-direction
    its gradient. Only the support gradients a later stage uses and the query losses with ``b_j != 0`` are
    computed.

    Args:
        theta: flat meta-parameters ``[N]`` (not modified).
        support_loss, query_loss: per-task losses ``loss(row, data)`` (see module docstring).
        support_data, query_data: task data, pytrees with the task dimension first or stage callables.
        tableau: a :class:`~rkfast.tableau.Tableau` or its name (``"maml"``, ``"rk4"``, ``"maml(3)"``...).
        inner_lr: the RK step ``h`` of the stages.
        first_order: treat the support gradients as constants (no Hessian-vector products).
        vectorize: all tasks at once under ``vmap``; ``False`` runs them one by one with plain autograd.
        num_tasks: ``T``; needed only when both data are callables.
        randomness: ``vmap`` randomness for stochastic layers (dropout): ``"different"`` per task.
        backend: kernels for the stage points and the first-order reduction (:mod:`rkfast.kernels`):
            ``"auto"`` (C++ on CPU, Triton on CUDA, where available), ``"torch"``, ``"cpp"``, ``"triton"``.
        workspace: reuse its buffers for the first-order stage points and meta-direction (no allocation
            for them after the first step of a shape); the returned direction is then one of them.

    Returns:
        :class:`MetaStepOutput` with the flat meta-direction, meta-loss and per-stage query losses.
    """
    _check_theta(theta)
    tab = get_tableau(tableau)
    h = _check_step("inner_lr", inner_lr)
    backend = resolve_backend(backend, theta.device, theta.dtype)  # a bad choice fails before any work
    tasks = _TaskMap(_resolve_num_tasks(num_tasks, support_data, query_data), vectorize, randomness)
    second_order = not first_order
    n = theta.shape[0]
    # a fresh leaf: the meta-gradient is taken w.r.t. it and the caller's theta is left alone
    theta = theta.detach().requires_grad_(second_order)

    slopes: list[Tensor | None] = [None] * tab.stages
    last_reader = tab.last_reader
    query_grads: list[Tensor] = []  # first order: per-task query gradients [T, N] of the stages ...
    query_weights: list[float] = []
    shared_grads: list[Tensor] = []  # ... and, at a stage that sits at theta, their sum over tasks [N]
    shared_weights: list[float] = []
    meta_loss = theta.new_zeros(())
    stage_losses: dict[int, Tensor] = {}
    stage_metrics: dict[str, dict[int, Tensor]] = {}

    with torch.enable_grad() if second_order else nullcontext():
        for j in range(tab.stages):
            need_slope, need_query = tab.needs_support_grad[j], tab.needs_query_loss[j]
            if not (need_slope or need_query):
                continue
            coefs = tab.coefficients(j)
            shared = not coefs  # stage 1 (or an all-zero row) sits at theta itself
            if shared:
                point = theta
            else:
                # first order: nothing is differentiated through the point, so it can live in a reused buffer
                out = workspace.get(("point", j), (tasks.num_tasks, n), theta) if first_order and workspace else None
                point = stage_point(theta, [slopes[l] for l, _ in coefs], [h * a for _, a in coefs],
                                    out=out, backend=backend)
                for l, _ in coefs:  # a slope no later stage reads is freed now (autograd keeps what it needs)
                    if last_reader[l] == j:
                        slopes[l] = None
            if need_slope:
                data = tasks.data(support_data, j, point, shared)
                slopes[j] = tasks.grads(support_loss, point, data, shared, create_graph=second_order)
            if need_query:
                data = tasks.data(query_data, j, point, shared)
                if first_order:
                    # the query gradients at this stage by one ordinary backward through the vmapped losses
                    # (cheaper than per-task gradients taken inside vmap); each stage's graph is freed
                    # before the next stage is built. At a shared point the backward already sums the tasks.
                    leaf = point.detach().requires_grad_()
                    with torch.enable_grad():
                        q, metrics = tasks.values(query_loss, leaf, data, shared)
                        (g,) = torch.autograd.grad(q.sum(), leaf)
                    (shared_grads if shared else query_grads).append(g)
                    (shared_weights if shared else query_weights).append(tab.b[j] / tasks.num_tasks)
                    q = q.detach()
                else:
                    q, metrics = tasks.values(query_loss, point, data, shared)
                meta_loss = meta_loss + tab.b[j] * q.mean()
                stage_losses[j + 1] = q.detach().mean()
                for name, value in metrics.items():
                    stage_metrics.setdefault(name, {})[j + 1] = value.detach().float().mean()

        if first_order:
            out = workspace.get("direction", (n,), theta) if workspace else None
            if query_grads:
                direction = combine(query_grads, query_weights, out=out, backend=backend)
            else:
                direction = out.zero_() if out is not None else torch.zeros_like(theta)
            for g, w in zip(shared_grads, shared_weights):
                axpy_(direction, g, w, backend=backend)
        elif meta_loss.requires_grad:
            (direction,) = torch.autograd.grad(meta_loss, theta)
        else:  # all b_j == 0: the meta-loss is constant
            direction = torch.zeros_like(theta)
    return MetaStepOutput(direction.detach(), meta_loss.detach(), stage_losses, stage_metrics)


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
) -> AdaptationOutput:
    """Meta-test adaptation: from ``theta``, plain gradient steps on each task's support set.

    Reports every task's query loss (and metrics) before adaptation and after each count in ``steps``,
    and with ``keep_params`` the adapted parameters too. Callable data are called with the number of
    steps taken so far as ``stage``. ``theta`` is not modified and no autograd graph is kept.
    """
    _check_theta(theta)
    alpha = _check_step("step_size", step_size)
    counts = sorted({int(n) for n in steps})
    if not counts or counts[0] < 1:
        raise ValueError(f"steps must be positive step counts, got {tuple(steps)}")
    tasks = _TaskMap(_resolve_num_tasks(num_tasks, support_data, query_data), vectorize, randomness)
    report = (0, *counts)
    losses: list[Tensor] = []
    metrics: dict[str, list[Tensor]] = {}
    kept: list[Tensor] = []
    params, shared = theta.detach(), True
    with torch.no_grad():
        for n in range(counts[-1] + 1):
            if n in report:
                q, m = tasks.values(query_loss, params, tasks.data(query_data, n, params, shared), shared)
                losses.append(q.detach())
                for name, value in m.items():
                    metrics.setdefault(name, []).append(value.detach())
                if keep_params:
                    kept.append(params.expand(tasks.num_tasks, -1) if shared else params)
            if n < counts[-1]:
                data = tasks.data(support_data, n, params, shared)
                params = params - alpha * tasks.grads(support_loss, params, data, shared, create_graph=False)
                shared = False
    return AdaptationOutput(
        report,
        alpha,
        torch.stack(losses),
        {k: torch.stack(v) for k, v in metrics.items()},
        torch.stack(kept) if keep_params else None,
    )


# -- the module + loss_fn + TaskBatch form ------------------------------------------------------------


def module_task_loss(
    module: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    layout: ParamLayout | None = None,
) -> TaskLoss:
    """The per-task loss ``row, (x, y) -> loss_fn(module(x; row), y)`` for the core functions.

    The module runs with ``torch.func.functional_call`` on the parameters viewed out of ``row``; its
    buffers are its own. With integer targets and outputs that carry a class dimension last, the loss also
    reports ``accuracy`` (argmax over the last dimension).
    """
    layout = layout or ParamLayout.from_module(module)

    def task_loss(row: Tensor, data: tuple[Tensor, Tensor]) -> tuple[Tensor, Metrics]:
        x, y = data
        out = functional_call(module, layout.unflatten(row), (x,))
        loss = loss_fn(out, y)
        metrics: Metrics = {}
        if not y.is_floating_point() and out.dim() == y.dim() + 1:
            metrics["accuracy"] = (out.argmax(-1) == y).to(loss.dtype).mean()
        return loss, metrics

    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm)
    task_loss.has_norm_layers = any(isinstance(m, norm_types) for m in module.modules())  # type: ignore[attr-defined]
    return task_loss


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
) -> MetaStepOutput:
    """:func:`rk_meta_step` for a module, a loss function and a :class:`~rkfast.batch.TaskBatch`."""
    loss = module_task_loss(module, loss_fn, layout)
    return rk_meta_step(
        theta, loss, loss, batch.support, batch.query, tableau, inner_lr,
        first_order=first_order, vectorize=vectorize, backend=backend, workspace=workspace,
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
) -> AdaptationOutput:
    """:func:`adapt` for a module, a loss function and a :class:`~rkfast.batch.TaskBatch`."""
    loss = module_task_loss(module, loss_fn, layout)
    return adapt(
        theta, loss, loss, batch.support, batch.query, step_size, steps, vectorize=vectorize, keep_params=keep_params
    )


def use_batch_statistics(module: nn.Module) -> nn.Module:
    """Make every normalization layer use per-call batch statistics and keep no running statistics.

    MAML's convention: each task normalizes with its own batch statistics, and nothing is shared across
    tasks through running averages (which ``vmap`` could not update in place anyway). Modifies ``module``
    in place (``track_running_stats=False``, running buffers removed) and returns it.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return module
