"""What a meta-step and a meta-test adaptation return, and the 95% confidence interval of a mean."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["MetaStepOutput", "AdaptationOutput", "mean_ci95", "count_nonfinite", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A step's meta-loss or meta-direction (or ``.grad`` for :meth:`MetaOptimizer.apply`), or the
    parameters its outer update produced, are NaN or infinite (or, for a learned tableau, its weights can no
    longer be formed: :class:`~rkfast.learned.OrderConditionsError`); nothing was updated."""


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

    @property
    def coefficient_directions(self) -> list[Tensor]:
        """The learned coefficients' meta-directions, in the order of the optimizer's learned tensors: none
        here (:class:`~rkfast.learned.RatesStepOutput` carries them)."""
        return []


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval (``1.96 * std / sqrt(n)``)."""
    v = values.detach().double().reshape(-1)
    n = v.numel()
    if n == 0:
        raise ValueError("mean_ci95 of an empty tensor")
    half = 1.96 * v.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return v.mean().item(), half


def count_nonfinite(values: Tensor) -> int:
    """The number of NaN or infinite entries of ``values`` (tasks whose adaptation diverged make a mean
    non-finite; reports give this count beside it)."""
    return int((~torch.isfinite(values.detach())).sum())


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
        """``{"step_size", "steps", "loss": {step: (mean, ci95)}, <metric>: {...}}``, JSON-friendly; where
        some tasks are NaN or infinite (their means are then non-finite) also ``"nonfinite": {name: {step:
        count}}`` for each such loss or metric (:meth:`nonfinite`)."""
        out: dict[str, Any] = {"step_size": self.step_size, "steps": list(self.steps)}
        for name, table in {"loss": self.losses, **self.metrics}.items():
            out[name] = {n: mean_ci95(row) for n, row in zip(self.steps, table, strict=True)}
        nonfinite = self.nonfinite()
        if nonfinite:
            out["nonfinite"] = nonfinite
        return out

    def nonfinite(self) -> dict[str, dict[int, int]]:
        """``{name: {step: number of tasks whose value is NaN or infinite}}`` for the loss and each metric
        with any such task (empty when every value is finite)."""
        out: dict[str, dict[int, int]] = {}
        for name, table in {"loss": self.losses, **self.metrics}.items():
            counts = {n: count_nonfinite(row) for n, row in zip(self.steps, table, strict=True)}
            if any(counts.values()):
                out[name] = counts
        return out

    @staticmethod
    def cat(parts: Sequence[AdaptationOutput]) -> AdaptationOutput:
        """Join results of several task batches (same steps and step size) along the task dimension."""
        if not parts:
            raise ValueError("AdaptationOutput.cat needs at least one result")
        first = parts[0]
        if any(p.steps != first.steps or p.step_size != first.step_size for p in parts):
            raise ValueError("AdaptationOutput.cat: results differ in steps or step size")
        params = [p.params for p in parts if p.params is not None]
        return AdaptationOutput(
            first.steps,
            first.step_size,
            torch.cat([p.losses for p in parts], dim=1),
            {k: torch.cat([p.metrics[k] for p in parts], dim=1) for k in first.metrics},
            torch.cat(params, dim=1) if len(params) == len(parts) else None,
        )
