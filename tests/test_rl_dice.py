"""The DiCE objective (rkfast.rl.dice): its value, its first derivative (REINFORCE with a baseline), its
derivatives of every order in expectation, and the key property: second-order RK/MAML meta-policy-gradients
through :class:`rkfast.MetaOptimizer` that are exact in expectation.

Sign convention: ``MetaOptimizer`` minimizes its losses, so every task loss here is minus an objective
(``-dice_objective(...)``, ``-J``)."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from rkfast import MetaOptimizer, TaskSet
from rkfast.rl.dice import dice_objective, magic_box

DTYPE = torch.float64


def discounted_reward_to_go(rewards: Tensor, discount: float) -> Tensor:
    """``G_t = sum_{t' >= t} discount^(t' - t) * rewards_t'`` along the last dimension (steps)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + discount * running
        returns[..., t] = running
    return returns


def discounts_of(steps: int, discount: float) -> Tensor:
    return discount ** torch.arange(steps, dtype=DTYPE)


# -- magic box and the value -------------------------------------------------------------------------------


def test_magic_box_is_one_with_the_derivatives_of_a_likelihood_ratio():
    theta = torch.tensor(0.7, dtype=DTYPE, requires_grad=True)
    box = magic_box(theta ** 2)
    (first,) = torch.autograd.grad(box, theta, create_graph=True)
    (second,) = torch.autograd.grad(first, theta)
    assert box.item() == 1.0
    # d/dθ exp(θ² - c) = 2θ exp(.), d²/dθ² = (2 + 4θ²) exp(.), at value exp(.) = 1
    torch.testing.assert_close(first, 2 * theta.detach(), rtol=1e-15, atol=0)
    torch.testing.assert_close(second, 2 + 4 * theta.detach() ** 2, rtol=1e-15, atol=0)


@pytest.mark.parametrize("discount", [1.0, 0.9])
@pytest.mark.parametrize("with_values", [False, True])
def test_value_is_the_mean_discounted_return(discount, with_values):
    log_probs = torch.randn(2, 7, 5, dtype=DTYPE, requires_grad=True)
    rewards, values = torch.randn(2, 7, 5, dtype=DTYPE), torch.randn(2, 7, 5, dtype=DTYPE)
    objective = dice_objective(log_probs, rewards, values if with_values else None, discount)
    expected = (discounts_of(5, discount) * rewards).sum(-1).mean(-1)
    assert objective.shape == (2,)
    torch.testing.assert_close(objective, expected, rtol=0, atol=0)
    assert objective.requires_grad


# -- first order: REINFORCE with a baseline ---------------------------------------------------------------


@pytest.mark.parametrize("discount", [1.0, 0.9])
def test_first_order_gradient_is_reinforce_with_baseline(discount):
    """Fixed samples, log-probabilities a smooth function of a toy parameter: the gradient of the objective
    is ``mean_e sum_t grad(log_probs_t) * discount^t * (G_t - values_t)`` exactly."""
    tasks, episodes, steps, dim = 2, 6, 4, 3
    features = torch.randn(tasks, episodes, steps, dim, dtype=DTYPE)
    rewards, values = torch.randn(tasks, episodes, steps, dtype=DTYPE), torch.randn(tasks, episodes, steps, dtype=DTYPE)
    theta0 = torch.randn(dim, dtype=DTYPE)

    def log_probs_of(theta: Tensor) -> Tensor:
        return torch.sin(features @ theta) - 0.5 * (theta ** 2).sum()

    theta = theta0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(dice_objective(log_probs_of(theta), rewards, values, discount).sum(), theta)

    scores = torch.autograd.functional.jacobian(log_probs_of, theta0)  # [tasks, episodes, steps, dim]
    advantages = discounts_of(steps, discount) * (discounted_reward_to_go(rewards, discount) - values)
    expected = (scores * advantages[..., None]).sum(2).mean(1).sum(0)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


# -- every order, in expectation: exact enumeration of a small discrete process ----------------------------


def _enumerated_process(discount: float) -> tuple[Callable[[Tensor], Tensor], Callable[..., Tensor], Tensor]:
    """Two steps, three actions: state ``s_0 = 0``, ``s_1 = 1 + a_0``; the policy is a logits table
    ``theta [4, 3]`` (row = state), rewards ``R[s_t, a_t]``, a state baseline ``V[s_t]``.

    Returns the exact expected discounted return ``J(theta)``, ``surrogate_mean(theta, theta0, loss)`` (the
    expectation of a per-trajectory surrogate under the distribution of ``theta0``, by enumeration of the
    9 trajectories) and ``theta0``."""
    generator = torch.Generator().manual_seed(11)
    reward_table = torch.randn(4, 3, generator=generator, dtype=DTYPE)
    value_table = torch.randn(4, generator=generator, dtype=DTYPE)
    theta0 = torch.randn(4, 3, generator=generator, dtype=DTYPE)
    first, second = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    actions = torch.stack([first.reshape(-1), second.reshape(-1)], dim=-1)  # [9, 2]
    states = torch.stack([torch.zeros(9, dtype=torch.long), 1 + actions[:, 0]], dim=-1)
    rewards = reward_table[states, actions]  # [9, 2]
    values = value_table[states]
    discounts = discounts_of(2, discount)

    def log_probs_of(theta: Tensor) -> Tensor:
        return torch.log_softmax(theta, dim=-1)[states, actions]  # [9, 2]

    def expected_return(theta: Tensor) -> Tensor:
        return (log_probs_of(theta).sum(-1).exp() * (discounts * rewards).sum(-1)).sum()

    def surrogate_mean(theta: Tensor, theta_sampling: Tensor, surrogate: str) -> Tensor:
        log_probs = log_probs_of(theta)
        probabilities = log_probs_of(theta_sampling).sum(-1).exp().detach()
        if surrogate == "dice":
            per_path = dice_objective(log_probs[:, None], rewards[:, None], values[:, None], discount)
        else:  # REINFORCE: sum_t log pi_t * discount^t * G_t
            per_path = (log_probs * discounts * discounted_reward_to_go(rewards, discount)).sum(-1)
        return (probabilities * per_path).sum()

    return expected_return, surrogate_mean, theta0


def _directional_derivatives(fn: Callable[[Tensor], Tensor], theta0: Tensor, direction: Tensor,
                             orders: int) -> list[Tensor]:
    """``d^n/de^n fn(theta0 + e * direction)`` at ``e = 0`` for ``n = 1..orders``."""
    step = torch.zeros((), dtype=DTYPE, requires_grad=True)
    value = fn(theta0 + step * direction)
    derivatives = []
    for _ in range(orders):
        (value,) = torch.autograd.grad(value, step, create_graph=True)
        derivatives.append(value.detach())
    return derivatives


@pytest.mark.parametrize("discount", [1.0, 0.8])
def test_derivatives_of_every_order_are_exact_in_expectation(discount):
    """E_{theta0}[d^n DiCE] = d^n J for n = 1, 2, 3 (with the baseline term), while REINFORCE's surrogate
    is exact at first order only."""
    expected_return, surrogate_mean, theta0 = _enumerated_process(discount)
    direction = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    exact = _directional_derivatives(expected_return, theta0, direction, 3)
    dice = _directional_derivatives(lambda th: surrogate_mean(th, theta0, "dice"), theta0, direction, 3)
    reinforce = _directional_derivatives(lambda th: surrogate_mean(th, theta0, "reinforce"), theta0, direction, 3)
    for order in range(3):
        torch.testing.assert_close(dice[order], exact[order], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reinforce[0], exact[0], rtol=1e-12, atol=1e-12)
    assert abs(reinforce[1] - exact[1]) > 1e-2 * (1 + abs(exact[1]))


# -- second order through the meta-step: a linear-Gaussian bandit with a closed form -----------------------

DIM, TASKS = 2, 3
EPISODES, REPEATS = 8000, 16  # samples per task and stage; independent Monte-Carlo meta-directions
GOALS = torch.tensor([[1.0, 0.5], [-0.8, 1.2], [0.2, -1.0]], dtype=DTYPE)
MEAN0, LOG_STD0 = torch.tensor([0.3, -0.2], dtype=DTYPE), torch.tensor([-0.5, -0.1], dtype=DTYPE)


class GaussianBandit(nn.Module):
    """A one-step policy: action ``a ~ N(mean, diag(exp(log_std))^2)`` for every observation."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = nn.Parameter(MEAN0.clone())
        self.log_std = nn.Parameter(LOG_STD0.clone())

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        shape = obs.shape[:-1] + (DIM,)
        return self.mean.expand(shape), self.log_std.expand(shape)


def gaussian_log_prob(actions: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """The diagonal Gaussian log-density of ``actions [..., d]``, summed over ``d``."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def closed_form_loss(model: Callable[..., tuple[Tensor, Tensor]], data: tuple[Tensor, Tensor]) -> Tensor:
    """``-J = ||mean - g||^2 + sum(exp(2 log_std))``: minus the expected reward ``-||a - g||^2``."""
    obs, goal = data
    mean, log_std = model(obs)
    return ((mean[0] - goal) ** 2).sum() + torch.exp(2 * log_std[0]).sum()


def dice_loss(model: Callable[..., tuple[Tensor, Tensor]], data: tuple[Tensor, ...]) -> Tensor:
    obs, actions, rewards, values = data
    mean, log_std = model(obs)  # the stage's parameters: log-probabilities differentiable in them
    log_probs = gaussian_log_prob(actions, mean, log_std)[:, None]  # [E, H = 1]
    return -dice_objective(log_probs, rewards, values)


def reinforce_loss(model: Callable[..., tuple[Tensor, Tensor]], data: tuple[Tensor, ...]) -> Tensor:
    """The classic surrogate: right gradient, but its Hessian misses the products of scores."""
    obs, actions, rewards, _ = data
    mean, log_std = model(obs)
    return -(gaussian_log_prob(actions, mean, log_std) * rewards[:, 0].detach()).mean()


def naive_loss(model: Callable[..., tuple[Tensor, Tensor]], data: tuple[Tensor, ...]) -> Tensor:
    """Minus the mean sampled reward: the samples came from detached parameters, so nothing depends on them."""
    return -data[2].mean()


def rollouts(opt: MetaOptimizer, seed: int, side: int) -> Callable[[int, Tensor], tuple[Tensor, ...]]:
    """``data(stage, params [T, N])``: EPISODES actions per task from the stage's own detached parameters,
    unflattened with ``opt.layout``; each (seed, stage, side) draws from a generator of its own seed.

    Returns ``(obs [T, E, 1], actions [T, E, d], rewards [T, E, 1], values [T, E, 1])``; the baseline is
    the leave-one-out mean reward of the task's other episodes: independent of the episode's own action
    (the plain mean would include it and scale the score term by ``1 - 1/E``)."""

    def sample(stage: int, params: Tensor) -> tuple[Tensor, ...]:
        generator = torch.Generator().manual_seed(1_000_003 * seed + 2 * stage + side)
        rows = opt.layout.unflatten(params)
        mean, log_std = rows["mean"][:, None, :], rows["log_std"][:, None, :]  # [T, 1, d]
        noise = torch.randn(TASKS, EPISODES, DIM, generator=generator, dtype=DTYPE)
        actions = mean + torch.exp(log_std) * noise
        rewards = -((actions - GOALS[:, None, :]) ** 2).sum(-1, keepdim=True)  # [T, E, 1]
        values = (rewards.sum(1, keepdim=True) - rewards) / (EPISODES - 1)
        obs = torch.zeros(TASKS, EPISODES, 1, dtype=DTYPE)
        return obs, actions, rewards, values

    return sample


def meta_optimizer(tableau: str, first_order: bool) -> MetaOptimizer:
    return MetaOptimizer(GaussianBandit(), None, tableau=tableau, inner_lr=0.2, outer="sgd", lr=0.1,
                         first_order=first_order)


def exact_direction(tableau: str, first_order: bool) -> Tensor:
    """The meta-direction of the closed-form expected returns: autograd through the stages is exact."""
    opt = meta_optimizer(tableau, first_order)
    data = (torch.zeros(TASKS, 1, 1, dtype=DTYPE), GOALS)
    return opt.compute(TaskSet(closed_form_loss, closed_form_loss, data, data)).direction.clone()


def monte_carlo_directions(tableau: str, first_order: bool, loss: Callable[..., Tensor]) -> Tensor:
    """``[REPEATS, N]`` meta-directions from independent rollouts of every stage."""
    opt = meta_optimizer(tableau, first_order)
    directions = []
    for seed in range(REPEATS):
        tasks = TaskSet(loss, loss, rollouts(opt, seed, 0), rollouts(opt, seed, 1), num_tasks=TASKS)
        directions.append(opt.compute(tasks).direction.clone())
    return torch.stack(directions)


def z_scores(samples: Tensor, reference: Tensor) -> Tensor:
    """``|mean - reference| / standard error`` per coordinate."""
    stderr = samples.std(0) / math.sqrt(samples.shape[0])
    return (samples.mean(0) - reference).abs() / stderr


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("tableau", ["maml", "heun", "rk4"])
def test_meta_step_with_dice_is_exact_in_expectation(tableau, first_order):
    """The Monte-Carlo meta-direction with DiCE losses agrees with the exact meta-direction of the
    expected returns within 5 standard errors in every coordinate. (The later stage points are built from
    sampled slopes, which biases the estimate by O(h^2 / E) where the losses are not quadratic: here the
    log_std part; far below the standard errors at these sizes.)"""
    exact = exact_direction(tableau, first_order)
    dice = monte_carlo_directions(tableau, first_order, dice_loss)
    stderr = dice.std(0) / math.sqrt(REPEATS)
    assert ((dice.mean(0) - exact).abs() <= 5 * stderr + 1e-9).all(), z_scores(dice, exact)
    reinforce = monte_carlo_directions(tableau, first_order, reinforce_loss)
    if first_order:
        # no derivative of a slope is taken: REINFORCE's surrogate is as good as DiCE's
        assert (z_scores(reinforce, exact) <= 5).all(), z_scores(reinforce, exact)
    else:
        # not vacuous: second order differs from first order, and REINFORCE's Hessian is detectably wrong
        assert ((exact - exact_direction(tableau, True)).abs() / stderr).max() > 10
        assert z_scores(reinforce, exact).max() > 20, z_scores(reinforce, exact)


def test_a_surrogate_without_score_function_is_refused():
    """Rewards of detached samples carry no gradient: the meta-step refuses the loss instead of a zero slope."""
    opt = meta_optimizer("maml", first_order=False)
    tasks = TaskSet(naive_loss, naive_loss, rollouts(opt, 0, 0), rollouts(opt, 0, 1), num_tasks=TASKS)
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        opt.compute(tasks)


# -- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, error, message", [
    ((torch.zeros(3, 4), torch.zeros(3, 5)), ValueError, r"rewards have shape \(3, 5\) but log_probs \(3, 4\)"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4, 3)), ValueError,
     r"values have shape \(4, 3\) but log_probs \(3, 4\)"),
    ((torch.zeros(4), torch.zeros(4)), ValueError, r"\[\.\.\., E, H\].*got shape \(4,\)"),
    ((torch.zeros(3, 4), [0.0] * 4), TypeError, "rewards must be a tensor"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), None, 0.0), ValueError, r"discount must be in \(0, 1\], got 0.0"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), None, 1.5), ValueError, "got 1.5"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), None, float("nan")), ValueError, "got nan"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), None, True), TypeError, "discount must be a real number"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), None, "0.9"), TypeError, "discount must be a real number"),
])
def test_invalid_arguments_are_refused(args, error, message):
    with pytest.raises(error, match=message):
        dice_objective(*args)
