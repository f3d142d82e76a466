"""The DiCE objective: a surrogate of the expected return whose derivatives of every order are unbiased.

A Runge-Kutta meta-step differentiates the support loss twice in second order: once for the slope
``k = grad L_S(theta^(j))`` at each stage, and once more when the meta-direction is back-propagated through
the stage points (``docs/method.md``). In reinforcement learning the loss is minus an expected return
``J(theta) = E_{tau ~ pi_theta}[R(tau)]``, estimated from rollouts sampled with the stage's own (detached)
parameters, so the surrogate must give unbiased estimates of ``grad J`` *and* of ``grad^2 J``. The classic
REINFORCE surrogate ``sum_t log pi(a_t | s_t) * G_t`` gets the first derivative right but its second
derivative misses the products of scores ``grad log pi * grad log pi^T`` (Foerster et al. 2018): MAML
with it would follow a biased second-order direction.

DiCE (Foerster et al., *DiCE: The Infinitely Differentiable Monte-Carlo Estimator*, ICML 2018) fixes this
with the operator :func:`magic_box`, ``magic_box(x) = exp(x - stop_gradient(x))``: its value is 1 and its
derivative is ``x' * magic_box(x)``. For episodes ``e = 1..E`` of ``H`` steps with log-probabilities
``l_t = log pi(a_t | s_t)`` and rewards ``r_t``, the objective is

    J_dice = mean_e  sum_t  discount^t * magic_box(W_t) * r_t
                   + sum_t  discount^t * (magic_box(W_{t-1}) - magic_box(W_t)) * v_t,
    W_t = sum_{t' <= t} l_t'   (W_{-1} = 0),

the second line being the baseline term of Mao et al., *A Baseline for Any Order Gradient Estimation in
Stochastic Computation Graphs* (ICML 2019), with ``v_t`` an estimate of the discounted reward-to-go from
step ``t`` that does not depend on ``a_t`` or later (a value function of the state, a per-task constant,
a leave-one-out mean of the other episodes). Its value is the mean discounted return (every magic box is 1,
the baseline term is 0). Each reward is weighted by the magic box of every action that influenced it, so
each derivative of the objective is the derivative of the likelihood ratio of those actions: in
expectation over the sampling distribution the derivatives of every order equal those of the expected
return. The baseline term has value 0 and derivatives of zero expectation at every order: with
``magic_box(W_t) = magic_box(W_{t-1}) * magic_box(l_t)``, every derivative of the difference is a product of
derivatives of ``magic_box(W_{t-1})`` and of ``magic_box(l_t) - 1``, and given the history
``E[d^n magic_box(l_t)] = E[d^n pi / pi] = d^n (integral of pi) = 0`` for ``n >= 1``; so it changes no
expectation, only the variance. Weighting each baseline by the magic box of the earlier actions
(``magic_box(W_{t-1})``, Mao et al.'s form, rather than the first-order form ``(1 - magic_box(l_t)) * v_t``)
lets it also cancel noise in the second-order terms that couple step ``t`` with earlier steps; both forms
have the same first derivative.

First order: with ``magic_box(x)' = x'``, the gradient is REINFORCE with a baseline,

    grad J_dice = mean_e  sum_t  grad(l_t) * discount^t * (G_t - v_t),
    G_t = sum_{t' >= t} discount^(t' - t) * r_t'   (the discounted reward-to-go),

because ``r_t'`` carries the score of every ``l_t`` with ``t <= t'``: collecting the terms of ``grad(l_t)``
gives ``sum_{t' >= t} discount^t' r_t' = discount^t G_t``, and the baseline term contributes
``-discount^t v_t grad(l_t)``.

Second order (what makes RK/MAML meta-policy-gradients exact in expectation): the Hessian of ``J_dice``
contains ``grad^2 l_t`` and the products of the scores of all actions up to each reward, the terms the
REINFORCE surrogate misses. Inside a :class:`~rkfast.batch.TaskSet`, sample each stage's rollouts with its
own detached parameters (a data callable ``data(stage, params)``) and use ``-dice_objective(...)`` as the
loss, with the log-probabilities computed from the model the loss is given (so they depend on the stage's
parameters differentiably): the meta-step then estimates the exact meta-gradient of the expected returns.
(Up to a bias of order ``h^2 / E``: the later stage points are themselves built from sampled slopes, and a
gradient that is not linear in the point is not unbiased at a random point.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["magic_box", "dice_objective"]


def magic_box(x: Tensor) -> Tensor:
    """DiCE's operator ``exp(x - x.detach())``: value 1, derivative ``x' * magic_box(x)`` (at every order).

    Args:
        x: a tensor (typically a sum of log-probabilities), differentiable in the parameters.

    Returns:
        A tensor of ones of ``x``'s shape whose derivatives are those of ``exp(x) / exp(x0)`` at ``x = x0``.
    """
    return torch.exp(x - x.detach())


def dice_objective(
    log_probs: Tensor,
    rewards: Tensor,
    values: Tensor | None = None,
    discount: float = 1.0,
) -> Tensor:
    """The DiCE surrogate of the expected discounted return, averaged over episodes (to maximize).

    ``mean_e sum_t discount^t * (magic_box(W_t) * rewards_t + (magic_box(W_{t-1}) - magic_box(W_t)) *
    values_t)`` with ``W_t = sum_{t'<=t} log_probs_t'``; see the module docstring. Its value is the mean discounted
    return; its derivatives of every order w.r.t. the policy parameters are, in expectation over the
    sampling distribution, those of the expected return. Minimize ``-dice_objective(...)``.

    Args:
        log_probs: ``[..., E, H]``, ``log pi(a_t | s_t)`` of each episode ``e`` and step ``t``, computed from
            the parameters being differentiated (the actions themselves are samples: constants).
        rewards: ``[..., E, H]``, the rewards; treated as constants (detached).
        values: ``None`` or ``[..., E, H]``, a baseline: estimates of the discounted reward-to-go from step
            ``t`` that do not depend on the action at ``t`` or later; treated as constants (detached). It
            changes the variance, not the expectation, of every derivative.
        discount: the discount factor, in ``(0, 1]``.

    Returns:
        ``[...]``, the objective of each leading index (e.g. each task), differentiable in ``log_probs``.

    Raises:
        TypeError: ``log_probs``, ``rewards`` or ``values`` not tensors, or a ``discount`` that is not a real
            number.
        ValueError: ``log_probs`` with fewer than 2 dimensions, ``rewards`` or ``values`` of another shape, or a
            ``discount`` outside ``(0, 1]``.
    """
    for name, tensor in (("log_probs", log_probs), ("rewards", rewards), ("values", values)):
        if not isinstance(tensor, Tensor) and not (name == "values" and tensor is None):
            raise TypeError(f"dice_objective: {name} must be a tensor, got {type(tensor).__name__}")
    if log_probs.dim() < 2:
        raise ValueError(
            f"dice_objective: log_probs must be [..., E, H] (episodes, steps), got shape {tuple(log_probs.shape)}"
        )
    if rewards.shape != log_probs.shape:
        raise ValueError(
            f"dice_objective: rewards have shape {tuple(rewards.shape)} but log_probs "
            f"{tuple(log_probs.shape)}; both must be [..., E, H]"
        )
    if values is not None and values.shape != log_probs.shape:
        raise ValueError(
            f"dice_objective: values have shape {tuple(values.shape)} but log_probs "
            f"{tuple(log_probs.shape)}; both must be [..., E, H]"
        )
    if isinstance(discount, bool) or not isinstance(discount, (int, float)):
        raise TypeError(f"dice_objective: discount must be a real number in (0, 1], got {type(discount).__name__}")
    if not (math.isfinite(discount) and 0.0 < discount <= 1.0):
        raise ValueError(f"dice_objective: discount must be in (0, 1], got {discount!r}")

    steps = log_probs.shape[-1]
    discounts = discount ** torch.arange(steps, dtype=log_probs.dtype, device=log_probs.device)
    # reward t depends on every action up to t: its weight is the likelihood ratio of all of them
    cumulative = log_probs.cumsum(dim=-1)
    through_t = magic_box(cumulative)
    weighted = through_t * rewards.detach()
    if values is not None:
        # value 0; its derivatives, of zero expectation, cancel part of the noise of the reward terms
        before_t = magic_box(cumulative - log_probs)  # the actions before step t
        weighted = weighted + (before_t - through_t) * values.detach()
    return (discounts * weighted).sum(dim=-1).mean(dim=-1)
