"""Normalization for meta-learning: per-task batch statistics that leave the model's buffers alone, and
MAML++'s per-step batch norm.

* :func:`batch_statistics`: within the block, BatchNorm/InstanceNorm layers normalize with the statistics
  of the batch they see and neither read nor update their running statistics; on exit every layer is as it
  was (the same buffer tensors, untouched). rkfast runs every model call of a meta-step, of meta-test
  adaptation and of :meth:`~rkfast.optim.MetaOptimizer.task_models` this way by default.
* :class:`PerStepBatchNorm1d` / :class:`PerStepBatchNorm2d`: batch norm with one affine weight and bias per
  inner step (Antoniou et al. 2019, *How to train your MAML*: "BNWB", with per-step batch statistics).
  The step is published by rkfast while it computes (:func:`current_step`, :func:`at_step`): stage ``j``
  of a meta-step (``j = 0`` at theta), or the number of adaptation steps taken so far in meta-test.

``docs/method.md`` ("Normalization layers") states the conventions.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = [
    "batch_statistics",
    "statistics_layers",
    "current_step",
    "at_step",
    "PerStepBatchNorm",
    "PerStepBatchNorm1d",
    "PerStepBatchNorm2d",
]


# -- per-task batch statistics, non-destructively -------------------------------------------------------

_SWITCHED = ("running_mean", "running_var", "num_batches_tracked")


def statistics_layers(module: nn.Module) -> tuple[_NormBase, ...]:
    """The layers of ``module`` that can keep running statistics (BatchNorm*, InstanceNorm*, SyncBatchNorm)."""
    return tuple(m for m in module.modules() if isinstance(m, _NormBase))


@contextlib.contextmanager
def batch_statistics(layers: nn.Module | Iterable[_NormBase]) -> Iterator[None]:
    """Within the block, normalize with each call's own batch statistics, never touching running statistics.

    ``layers`` is a module (all of its :func:`statistics_layers`) or those layers themselves. Each layer
    gets ``track_running_stats = False`` and its running buffers hidden (``None``) for the block, so that
    BatchNorm uses the batch's statistics in ``train()`` and ``eval()`` mode alike and updates nothing, and
    InstanceNorm uses the input's statistics: MAML's convention, and what ``vmap`` needs (a running average
    cannot be updated in place from inside a vmapped function). On exit, also on an exception, every layer
    gets back its own ``track_running_stats`` and the very same buffer tensors, unchanged; the module's
    ``state_dict`` and its ``eval()`` behaviour are the user's as before.

    Not thread-safe with other code that calls the same module at the same time (the attributes are
    switched on the module object, as ``torch.func.functional_call`` switches its parameters).
    """
    candidates = statistics_layers(layers) if isinstance(layers, nn.Module) else tuple(layers)
    # a layer that tracks nothing already normalizes with batch statistics: leave it alone (switching
    # attributes costs a Module.__setattr__ per buffer, per call, per task)
    switched = [m for m in candidates if m.track_running_stats or any(getattr(m, n) is not None for n in _SWITCHED)]
    saved = [(m, m.track_running_stats, [getattr(m, name) for name in _SWITCHED]) for m in switched]
    try:
        for m in switched:
            m.track_running_stats = False
            for name in _SWITCHED:
                setattr(m, name, None)
        yield
    finally:
        for m, tracked, buffers in saved:
            m.track_running_stats = tracked
            for name, buffer in zip(_SWITCHED, buffers, strict=True):
                setattr(m, name, buffer)


# -- the step that per-step layers normalize for -------------------------------------------------------

_STEP: ContextVar[int] = ContextVar("rkfast_norm_step", default=0)


def current_step() -> int:
    """The inner step being computed: stage ``j`` of a meta-step (0 at theta), or in meta-test adaptation
    the number of steps taken so far; 0 outside rkfast's computations (and outside :func:`at_step`)."""
    return _STEP.get()


@contextlib.contextmanager
def at_step(step: int) -> Iterator[None]:
    """Within the block, :func:`current_step` is ``step`` (a non-negative integer); restored on exit.

    rkfast sets it around each stage's support gradient and query loss and each adaptation step; use it to
    run a model with per-step layers at a given step yourself (``with at_step(5): model(x)``).
    """
    index = operator.index(step)
    if index < 0:
        raise ValueError(f"a step index is a non-negative integer, got {step!r}")
    token = _STEP.set(index)
    try:
        yield
    finally:
        _STEP.reset(token)


# -- per-step batch norm (MAML++) ------------------------------------------------------------------------


class PerStepBatchNorm(nn.Module):
    """Batch norm with per-step affine parameters: ``weight`` and ``bias`` of shape ``[steps, C]``.

    Input ``[B, C, *]`` is normalized per channel with the statistics of this call's batch (no running
    statistics are kept), then scaled and shifted by row ``min(current_step(), steps - 1)`` of ``weight``
    and ``bias``: stage ``j`` of a meta-step uses row ``j``, adaptation step ``n`` row ``n``, and steps
    beyond the last row share it. Under ``vmap`` the second-order path computes it through group norm,
    as every batch norm (``rkfast._norms``), so its meta-gradients are exact.

    Args:
        num_features: ``C``, the channel dimension (dim 1 of the input).
        steps: the number of per-step rows (MAML++: the number of inner steps); at least 1.
        eps: added to the variance, as in :class:`torch.nn.BatchNorm2d`.
    """

    input_dims: tuple[int, ...] = ()
    """The input ranks a subclass accepts (empty: any rank >= 2)."""

    def __init__(
        self,
        num_features: int,
        steps: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if operator.index(num_features) < 1 or operator.index(steps) < 1:
            raise ValueError(f"num_features and steps must be positive integers, got {num_features} and {steps}")
        self.num_features, self.steps, self.eps = int(num_features), int(steps), float(eps)
        self.weight = nn.Parameter(torch.ones(self.steps, self.num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(self.steps, self.num_features, device=device, dtype=dtype))

    def step_row(self) -> int:
        """The row of ``weight``/``bias`` that the current step uses."""
        return min(current_step(), self.steps - 1)

    def forward(self, x: Tensor) -> Tensor:
        if (self.input_dims and x.dim() not in self.input_dims) or x.dim() < 2:
            accepted = " or ".join(f"{d}-d" for d in self.input_dims) or "at least 2-d"
            raise ValueError(f"{type(self).__name__} expects {accepted} input [B, C, ...], got shape {tuple(x.shape)}")
        row = self.step_row()
        return F.batch_norm(x, None, None, self.weight[row], self.bias[row], True, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, steps={self.steps}, eps={self.eps}"


class PerStepBatchNorm1d(PerStepBatchNorm):
    """:class:`PerStepBatchNorm` over ``[B, C]`` or ``[B, C, L]`` input (as :class:`torch.nn.BatchNorm1d`)."""

    input_dims = (2, 3)


class PerStepBatchNorm2d(PerStepBatchNorm):
    """:class:`PerStepBatchNorm` over ``[B, C, H, W]`` input (as :class:`torch.nn.BatchNorm2d`)."""

    input_dims = (4,)
