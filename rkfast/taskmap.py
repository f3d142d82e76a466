"""Evaluating a per-task function over all tasks of a meta-batch: ``vmap`` or a loop with plain autograd.

The functional core works on per-task losses ``loss(row, data)``, where ``row`` is one task's flat
parameters ``[N]`` and ``data`` one task's data (any pytree); a loss returns a scalar, or
``(scalar, {"metric": scalar})``. Both paths refuse a loss that is not a 0-d tensor per task (a loss
with ``reduction='none'``) and, wherever a gradient is taken, a loss that does not depend on the
parameters (a detached loss would give a zero gradient silently). On the ``vmap`` path an error that
comes from a ``vmap`` limitation (recurrent layers, ``.item()``, data-dependent control flow, in-place
writes into unbatched tensors) is re-raised as :class:`VmapUnsupportedError`, which names the original
error and points to ``vectorize=False``. Task data is either a pytree whose leaves carry the task dimension
first, or a callable ``data(stage, params[T, N]) -> pytree`` that produces each stage's data from that
stage's (detached) parameters, as reinforcement learning does with rollouts of each stage's own policy.

:func:`stage_query_losses` maps a task's whole sequence of second-order stages at once: the CPU path of
:func:`rkfast.functional.rk_meta_step` where :func:`one_pass_applies` (``docs/method.md``, "Flat parameters
and kernels").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

from ._norms import exact_norms
from .norms import at_step
from .tableau import Tableau

__all__ = [
    "Metrics",
    "TaskLoss",
    "TaskData",
    "Randomness",
    "TaskMap",
    "VmapUnsupportedError",
    "loss_gradient",
    "resolve_num_tasks",
    "one_pass_applies",
    "stage_query_losses",
]

Metrics = dict[str, Tensor]
TaskLoss = Callable[[Tensor, Any], Tensor | tuple[Tensor, Metrics]]
"""``loss(row[N], one_task_data) -> scalar`` or ``(scalar, {name: scalar})``.

A loss may carry ``has_norm_layers = False`` to say it calls no batch/instance/layer norm, which lets
the vectorized path skip the exact-norm rewrite (:mod:`rkfast._norms`); without it the rewrite is on."""
TaskData = Any | Callable[[int, Tensor], Any]
"""A pytree with the task dimension first, or ``data(stage, params[T, N]) -> pytree``."""
Randomness = Literal["error", "different", "same"]


DETACHED_LOSS = (
    "the task loss does not depend on the parameters it is given, so its gradient would be zero; did it "
    "detach the loss (.detach(), .item(), torch.no_grad()) or compute it with a model other than the one "
    "passed to the loss (the original module instead of model(...))?"
)


def _scalar_loss(loss: Any) -> Tensor:
    """A task's loss value, which must be a 0-d tensor (under ``vmap``: per task)."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"a task loss must return a 0-d tensor (or (tensor, metrics)), got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            f"a task loss must be a scalar (0-d tensor) per task, got a tensor of shape {tuple(loss.shape)} per "
            "task; reduce it over the task's samples, e.g. reduction='mean' (the default of F.mse_loss and "
            "F.cross_entropy) instead of reduction='none'"
        )
    return loss


def _split(out: Tensor | tuple[Tensor, Metrics]) -> tuple[Tensor, Metrics]:
    if isinstance(out, tuple):
        loss, metrics = out
        return _scalar_loss(loss), dict(metrics)
    return _scalar_loss(out), {}


def _with_metrics(loss: TaskLoss) -> Callable[[Tensor, Any], tuple[Tensor, Metrics]]:
    return lambda row, data: _split(loss(row, data))


def _value_or_pair(loss: TaskLoss) -> Callable[[Tensor, Any], Tensor | tuple[Tensor, Metrics]]:
    """The loss for ``vmap``: its value alone when it reports no metrics, else ``(value, metrics)``. Every
    output of a vmapped function is unwrapped through pytree handling, which costs as much as a small model's
    forward: an empty metrics dict is not worth returning."""

    def run(row: Tensor, data: Any) -> Tensor | tuple[Tensor, Metrics]:
        value, metrics = _split(loss(row, data))
        return (value, metrics) if metrics else value

    return run


def _tracked(value: Tensor) -> Tensor:
    """``value``, which must require grad (be a function of the tracked parameters): a free check, no
    synchronization with the device."""
    if not value.requires_grad:
        raise ValueError(DETACHED_LOSS)
    return value


def _differentiable(loss: TaskLoss) -> Callable[[Tensor, Any], Tensor]:
    """The loss value for ``torch.func.grad``, which would return zeros for a value that does not depend on
    ``row``; inside the grad transform ``requires_grad`` says whether it does (for a value computed from
    tensors other than ``row`` too: they are not tracked at the transform's level)."""
    return lambda row, data: _tracked(_split(loss(row, data))[0])


def loss_gradient(value: Tensor, wrt: Tensor, create_graph: bool = False) -> Tensor:
    """``torch.autograd.grad(value, wrt)``, refusing (``ValueError``) a value that does not depend on ``wrt``
    (detached, or computed from other tensors) instead of autograd's generic error or a zero gradient."""
    (g,) = torch.autograd.grad(_tracked(value), wrt, create_graph=create_graph, allow_unused=True)
    if g is None:
        raise ValueError(DETACHED_LOSS)
    return g


def _check_depends(q: Tensor, params: Tensor) -> None:
    """Losses computed for differentiation (grad enabled, ``params`` tracked) must depend on ``params``
    (checked on the result: inside ``vmap`` alone ``requires_grad`` reads ``False``)."""
    if torch.is_grad_enabled() and params.requires_grad:
        _tracked(q)


# -- errors from vmap's limitations ----------------------------------------------------------------------


class VmapUnsupportedError(RuntimeError):
    """The model or loss cannot run under ``torch.func.vmap``; ``vectorize=False`` runs the tasks one by one.

    Raised from the original error (``__cause__``), whose message it repeats.
    """


# Messages of vmap's and functorch's own refusals (torch 2.x): missing batching rules (nn.LSTM, nn.GRU),
# .item() and data-dependent Python control flow, dynamic shapes, .numpy()/.tolist() on batched tensors.
_VMAP_LIMITATION = re.compile(
    r"vmap|functorch|batching rule|batched tensor|\.item\(\)|data-dependent|dynamic shape"
    r"|cannot access data pointer|cudnn rnn",
    re.IGNORECASE,
)


def _vmap_unsupported(err: BaseException) -> VmapUnsupportedError:
    return VmapUnsupportedError(
        f"the model or loss cannot run under torch.func.vmap ({type(err).__name__}: {err}). "
        "Run the tasks one by one with plain autograd instead: vectorize=False "
        "(MetaOptimizer(..., vectorize=False), or rk_meta_step/adapt(..., vectorize=False))."
    )


def _is_vmap_limitation(err: RuntimeError, probe: Callable[[], Any] | None) -> bool:
    """Whether ``err``, raised under vmap, is vmap's: its message says so, or (``probe``) the same
    computation for one task without vmap succeeds (an in-place write into an unbatched tensor, as
    ``nn.GRU``'s backward does, reads like a plain shape error)."""
    if _VMAP_LIMITATION.search(str(err)):
        return True
    if probe is None:
        return False
    try:
        probe()
    except Exception:  # noqa: BLE001 - the task fails without vmap too: the error is the model's or the loss's own
        return False
    return True


def _task(data: Any, i: int) -> Any:
    return tree_map(lambda x: x[i] if isinstance(x, Tensor) else x, data)


def _stack(outs: list[Any]) -> Any:
    leaves = [tree_flatten(o) for o in outs]
    spec = leaves[0][1]
    columns = zip(*(lv for lv, _ in leaves), strict=True)
    return spec.unflatten([torch.stack(list(c)) for c in columns])


def _num_tasks(data: Any) -> int | None:
    if callable(data):
        return None
    # the common (x, y) pair answers without flattening the pytree (its first leaf is data[0])
    first = data[0] if type(data) in (tuple, list) and data else data
    if isinstance(first, Tensor) and first.dim() > 0:
        return int(first.shape[0])
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
        second-order support gradients), norm layers run through group norm (:func:`rkfast._norms.exact_norms`):
        the fused batch norm's backward has a wrong batching rule for its own derivative. Their first derivatives are
        exact under vmap (the tests compare first-order directions through BatchNorm with the sequential
        path), so every other call keeps the fused, faster and leaner, kernels."""
        mapped = vmap(fn, in_dims=(None if shared else 0, 0), randomness=self.randomness)
        if not differentiated_twice or not getattr(loss, "has_norm_layers", True):
            return mapped

        def run(params: Tensor, data: Any) -> Any:
            with exact_norms():
                return mapped(params, data)

        return run

    @contextmanager
    def vmap_errors(self, probe: Callable[[], Any] | None = None) -> Iterator[None]:
        """On the ``vmap`` path, re-raise an error of vmap's own (see :func:`_is_vmap_limitation`; ``probe``
        recomputes one task without vmap) as :class:`VmapUnsupportedError`; other errors pass unchanged."""
        if not self.vectorize:
            yield
            return
        try:
            yield
        except RuntimeError as err:
            if isinstance(err, VmapUnsupportedError) or not _is_vmap_limitation(err, probe):
                raise
            raise _vmap_unsupported(err) from err

    def data(self, data: TaskData, stage: int, params: Tensor, shared: bool) -> Any:
        if not callable(data):
            return data
        rows = params.detach()
        if shared:
            rows = rows.expand(self.num_tasks, -1)
        return data(stage, rows)

    def _rows(self, params: Tensor, data: Any, shared: bool) -> Iterator[tuple[Tensor, Any]]:
        """Each task's parameters and data. The rows come from one ``unbind``: its backward stacks every task's
        gradient once, where indexing ``params[i]`` would give each task a zero-filled ``[T, N]`` gradient."""
        rows = [params] * self.num_tasks if shared else params.unbind(0)
        for i, row in enumerate(rows):
            yield row, _task(data, i)

    def _loop_grads(
        self, loss: TaskLoss, params: Tensor, data: Any, shared: bool, create_graph: bool
    ) -> Iterator[Tensor]:
        """Task by task with plain autograd: each task's gradient."""
        for row, task_data in self._rows(params, data, shared):
            if not create_graph:
                row = row.detach().requires_grad_()
            with torch.enable_grad():
                g = loss_gradient(_split(loss(row, task_data))[0], row, create_graph=create_graph)
            yield g

    def grads(self, loss: TaskLoss, params: Tensor, data: Any, shared: bool, create_graph: bool) -> Tensor:
        """Per-task gradients ``[T, N]``; differentiable w.r.t. ``params`` when ``create_graph``."""
        if not self.vectorize:
            return torch.stack(list(self._loop_grads(loss, params, data, shared, create_graph)))
        mapped = self._vmap(loss, grad(_differentiable(loss)), shared, differentiated_twice=create_graph)
        with self.vmap_errors(probe=lambda: next(self._loop_grads(loss, params, data, shared, create_graph))):
            return mapped(params, data)

    def values(self, loss: TaskLoss, params: Tensor, data: Any, shared: bool) -> tuple[Tensor, Metrics]:
        """Per-task losses ``[T]`` and metrics, differentiable w.r.t. ``params``."""
        task_loss = _with_metrics(loss)
        if self.vectorize:
            with self.vmap_errors(probe=lambda: task_loss(*next(self._rows(params, data, shared)))):
                out = self._vmap(loss, _value_or_pair(loss), shared, False)(params, data)
            q, metrics = out if isinstance(out, tuple) else (out, {})
        else:
            q, metrics = _stack([task_loss(row, task_data) for row, task_data in self._rows(params, data, shared)])
        _check_depends(q, params)
        return q, metrics


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


# -- every stage of a second-order step in one vmap (the CPU path) -----------------------------------------


def one_pass_applies(tasks: TaskMap, theta: Tensor, support_loss: TaskLoss, support_data: Any, query_data: Any) -> bool:
    """Whether :func:`stage_query_losses` can stand in for the stage-by-stage second-order computation:
    ``vmap``, CPU parameters, task data given as pytrees (stage callables need each stage's point on the
    host first) and a support loss that declares no norm layers (whose second derivatives need
    :func:`~rkfast._norms.exact_norms` around the support gradients alone)."""
    return (
        tasks.vectorize
        and theta.device.type == "cpu"
        and not callable(support_data)
        and not callable(query_data)
        and not getattr(support_loss, "has_norm_layers", True)
    )


def stage_query_losses(
    tasks: TaskMap,
    theta: Tensor,
    tableau: Tableau,
    h: float,
    support_loss: TaskLoss,
    support_data: Any,
    query_loss: TaskLoss,
    query_data: Any,
) -> list[tuple[int, Tensor, Metrics]] | None:
    """Every task's query losses ``[T]`` and metrics at each stage the meta-loss weighs (``b_j != 0``), as
    ``(j, losses, metrics)`` in stage order, from one ``vmap`` of each task's whole stage sequence.

    The same stages as :func:`rkfast.functional.stage_points` with second-order slopes (``grad`` of the
    support loss, differentiable in ``theta``), each point ``theta - h A_jm k^(m)`` computed row by row inside
    the map, in the order of operations of the ``"torch"`` kernels. One ``vmap`` call instead of one per slope
    and per query loss: on the CPU each call's own Python work (wrapping and unwrapping the inputs) costs about
    as much as a small model's forward. ``None`` when that ``vmap`` raises a ``RuntimeError`` (the
    stage-by-stage path then runs and reports a ``vmap`` limitation with its own probes).
    """
    schedule = tableau.schedule  # the stage sequence of every form of the step
    support_grad = grad(_differentiable(support_loss))
    query_value = _value_or_pair(query_loss)

    def task(row: Tensor, support: Any, query: Any) -> tuple[Any, ...]:
        slopes: dict[int, Tensor] = {}
        outs = []
        for step in schedule:
            point = row
            for m, a in step.coefficients:
                point = torch.sub(point, slopes[m], alpha=h * a)
            with at_step(step.index):  # per-step layers (rkfast.norms) normalize for stage j
                if step.support_grad:
                    slopes[step.index] = support_grad(point, support)
                if step.query_loss:
                    outs.append(query_value(point, query))
        return tuple(outs)

    try:
        outs = vmap(task, in_dims=(None, 0, 0), randomness=tasks.randomness)(theta, support_data, query_data)
    except RuntimeError:
        return None
    stages = []
    for j, out in zip([step.index for step in schedule if step.query_loss], outs, strict=True):
        q, metrics = out if isinstance(out, tuple) else (out, {})
        _check_depends(q, theta)
        stages.append((j, q, metrics))
    return stages
