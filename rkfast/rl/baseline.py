"""Discounted returns and the linear feature baseline of Duan et al. 2016 ("Benchmarking Deep Reinforcement
Learning for Continuous Control"), fitted per task for all tasks at once.

A baseline is a value estimate subtracted from the returns to reduce the variance of policy gradients; any
baseline that does not depend on the action leaves their expectation unchanged, so it is computed without
gradients and never differentiated.
"""

from __future__ import annotations

import math
import warnings
from numbers import Real

import torch
from torch import Tensor

__all__ = ["discounted_returns", "baseline_features", "fit_linear_baseline"]

# Duan et al. 2016's features: time is scaled by this constant and observations are clipped to this bound.
_TIME_SCALE = 100.0
_OBSERVATION_BOUND = 10.0
# The published baseline solves with the ridge coefficient reg, then 10 reg, ... (at most this many tries).
_ATTEMPTS = 5


def discounted_returns(rewards: Tensor, discount: float) -> Tensor:
    """The reward-to-go of every time step: ``G_t = sum_{t' >= t} discount^(t' - t) r_t'``.

    Computed as one product with the ``[H, H]`` matrix of the weights ``discount^(t' - t)`` (zero for
    ``t' < t``): every weight is at most 1, so no power overflows whatever ``discount`` and ``H`` (a cumulative
    sum of ``discount^-t``-scaled rewards would). The product runs in float64 (exact weights, and no
    reduced-precision GPU matmul) and the result has the rewards' dtype; memory grows as ``H^2``.

    Args:
        rewards: ``[..., H]``, time last.
        discount: the discount factor, in ``(0, 1]``.

    Returns:
        ``[..., H]``, the discounted reward-to-go.

    Raises:
        ValueError: a ``discount`` outside ``(0, 1]``, or ``rewards`` that are not floating point with a time
            dimension.
    """
    if isinstance(discount, bool) or not isinstance(discount, Real) or not 0.0 < float(discount) <= 1.0:
        raise ValueError(f"discount must be a real number in (0, 1], got {discount!r}")
    if rewards.dim() < 1 or not rewards.is_floating_point():
        raise ValueError(
            f"rewards must be a floating point [..., H] tensor, got shape {tuple(rewards.shape)} and "
            f"dtype {rewards.dtype}"
        )
    horizon = rewards.shape[-1]
    steps = torch.arange(horizon, dtype=torch.float64, device=rewards.device)
    # delays[t', t] = t' - t: how many steps after t the reward r_t' comes
    delays = steps[:, None] - steps[None, :]
    weights = torch.where(delays >= 0, torch.pow(float(discount), delays.clamp(min=0)), 0.0)
    return (rewards.to(torch.float64) @ weights).to(rewards.dtype)


def baseline_features(observations: Tensor) -> Tensor:
    """Duan et al. 2016's features of every time step of every episode.

    With observations clipped to ``[-10, 10]`` and ``t = time index / 100``, the features are
    ``[obs, obs^2, t, t^2, t^3, 1]``.

    Args:
        observations: ``[..., H, D]``, time second to last.

    Returns:
        ``[..., H, 2 D + 4]``, in the observations' dtype.

    Raises:
        ValueError: ``observations`` that are not floating point ``[..., H, D]``.
    """
    if observations.dim() < 2 or not observations.is_floating_point():
        raise ValueError(
            f"observations must be a floating point [..., H, D] tensor, got shape "
            f"{tuple(observations.shape)} and dtype {observations.dtype}"
        )
    clipped = observations.clamp(-_OBSERVATION_BOUND, _OBSERVATION_BOUND)
    horizon = observations.shape[-2]
    time = torch.arange(horizon, dtype=observations.dtype, device=observations.device) / _TIME_SCALE
    time = time[:, None].expand(*observations.shape[:-1], 1)
    return torch.cat([clipped, clipped.square(), time, time.square(), time.pow(3), torch.ones_like(time)], dim=-1)


def fit_linear_baseline(observations: Tensor, returns: Tensor, reg: float = 1e-5) -> Tensor:
    """Fit Duan et al. 2016's linear feature baseline in every task and give its values.

    Per task, the coefficients ``c`` minimize ``|X c - G|^2 + reg |c|^2`` over all that task's episodes and
    time steps (``X`` the :func:`baseline_features`, ``G`` the returns): the normal equations
    ``(X^T X + reg I) c = X^T G`` of all ``T`` tasks are solved as one batch of ``[T, F, F]`` systems, in
    float64. As in the published baseline, a task whose solution is not finite (a singular system) is solved
    again with ``10 reg``, then ``100 reg``, ... (5 tries in all); a task still without a finite solution
    gets a zero baseline, with a warning (a zero baseline is unbiased too, merely noisier).

    Args:
        observations: ``[T, E, H, D]``, the observations of every time step.
        returns: ``[T, E, H]``, the returns to fit (e.g. :func:`discounted_returns` of the rewards).
        reg: the ridge coefficient, positive.

    Returns:
        ``[T, E, H]``, the fitted values ``X c`` in the returns' dtype, detached.

    Raises:
        ValueError: shapes other than ``[T, E, H, D]`` and ``[T, E, H]``, tensors that are not floating point,
            or a ``reg`` that is not a positive finite number.
    """
    if observations.dim() != 4 or not observations.is_floating_point():
        raise ValueError(
            f"observations must be a floating point [T, E, H, D] tensor, got shape "
            f"{tuple(observations.shape)} and dtype {observations.dtype}"
        )
    if returns.shape != observations.shape[:-1] or not returns.is_floating_point():
        raise ValueError(
            f"returns must be a floating point [T, E, H] tensor matching the observations "
            f"{tuple(observations.shape[:-1])}, got shape {tuple(returns.shape)} and dtype "
            f"{returns.dtype}"
        )
    if isinstance(reg, bool) or not isinstance(reg, Real) or not math.isfinite(float(reg)) or reg <= 0:
        raise ValueError(f"reg must be a positive finite number, got {reg!r}")
    num_tasks = observations.shape[0]
    with torch.no_grad():
        features = baseline_features(observations.detach().to(torch.float64))
        num_features = features.shape[-1]
        design = features.reshape(num_tasks, -1, num_features)
        targets = returns.detach().to(torch.float64).reshape(num_tasks, -1, 1)
        gram = design.mT @ design
        moments = design.mT @ targets
        identity = torch.eye(num_features, dtype=torch.float64, device=design.device)
        ridge = torch.full((num_tasks,), float(reg), dtype=torch.float64, device=design.device)
        for attempt in range(_ATTEMPTS):
            coefficients, info = torch.linalg.solve_ex(gram + ridge[:, None, None] * identity, moments)
            solved = (info == 0) & torch.isfinite(coefficients).all(dim=-1).all(dim=-1)
            if attempt == _ATTEMPTS - 1 or bool(solved.all()):
                break
            # only the failed tasks get more regularization: the others solve the same system again
            ridge = torch.where(solved, ridge, 10.0 * ridge)
        values = (design @ coefficients).squeeze(-1)
        if not bool(solved.all()):
            failed = torch.nonzero(~solved).flatten().tolist()
            warnings.warn(
                f"the linear baseline has no finite fit in tasks {failed} even with reg x "
                f"{10 ** (_ATTEMPTS - 1)} (non-finite observations or returns, or too small a reg?): their "
                "baseline is 0",
                RuntimeWarning,
                stacklevel=2,
            )
            values = torch.where(solved[:, None], values, torch.zeros_like(values))
    return values.reshape(returns.shape).to(returns.dtype)
