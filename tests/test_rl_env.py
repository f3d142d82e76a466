"""The reinforcement learning pieces below the objective: the 2-D point navigation environment, the Gaussian
MLP policy and its batched actor, discounted returns and the linear feature baseline."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from rkfast.layout import ParamLayout
from rkfast.rl.baseline import baseline_features, discounted_returns, fit_linear_baseline
from rkfast.rl.navigation import PointNavigation, Trajectories
from rkfast.rl.policy import GaussianMLPPolicy, batched_actor, gaussian_log_prob, sample_actions

f64 = torch.float64


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- environment ---------------------------------------------------------------------------------------------


def test_goals_shape_range_and_determinism():
    env = PointNavigation(goal_low=-0.25, goal_high=0.75)
    goals = env.sample_tasks(500, seeded(3))
    assert goals.shape == (500, 2) and goals.dtype == torch.float32
    assert goals.min() >= -0.25 and goals.max() <= 0.75
    # uniform over the square: both halves of each coordinate are hit
    assert (goals < 0.25).any(0).all() and (goals > 0.25).any(0).all()
    assert torch.equal(env.sample_tasks(500, seeded(3)), goals)
    assert not torch.equal(env.sample_tasks(500, seeded(4)), goals)
    as_f64 = env.sample_tasks(500, seeded(3), dtype=f64)
    assert as_f64.dtype == f64 and torch.equal(as_f64.float(), goals)


def test_step_clips_actions_and_rewards_minus_distance_after_the_move():
    env = PointNavigation(max_action=0.1)
    positions = torch.tensor([[0.0, 0.0], [0.3, -0.2]], dtype=f64)
    actions = torch.tensor([[0.5, -0.05], [-1.0, 0.2]], dtype=f64)
    goals = torch.tensor([[0.4, 0.4], [0.0, 0.0]], dtype=f64)
    new_positions, rewards = env.step(positions, actions, goals)
    expected = torch.tensor([[0.1, -0.05], [0.2, -0.1]], dtype=f64)
    torch.testing.assert_close(new_positions, expected)
    by_hand = [-math.hypot(0.1 - 0.4, -0.05 - 0.4), -math.hypot(0.2, -0.1)]
    torch.testing.assert_close(rewards, torch.tensor(by_hand, dtype=f64))


def test_rollout_matches_a_loop_over_tasks_and_episodes():
    env = PointNavigation(horizon=7, max_action=0.1)
    num_tasks, episodes = 3, 4
    goals = env.sample_tasks(num_tasks, seeded(1), dtype=f64)
    offsets = 0.2 * torch.randn(episodes, 2, dtype=f64)  # makes episodes differ; often beyond max_action

    def act(observations):  # deterministic, batched: [T, E, 2]
        return 0.8 * (goals[:, None, :] - observations) + offsets + torch.sin(3 * observations)

    rollout = env.rollout(act, goals, episodes)
    assert isinstance(rollout, Trajectories)
    assert rollout.observations.shape == (num_tasks, episodes, 7, 2) == rollout.actions.shape
    assert rollout.rewards.shape == (num_tasks, episodes, 7) and rollout.final_positions.shape == (3, 4, 2)
    assert (rollout.num_tasks, rollout.episodes, rollout.horizon) == (num_tasks, episodes, 7)
    assert rollout.rewards.dtype == f64 and not rollout.rewards.requires_grad
    assert torch.all(rollout.observations[:, :, 0] == 0)
    assert rollout.actions.abs().max() > 0.1  # recorded unclipped
    clipped = rollout.actions.clamp(-0.1, 0.1)
    torch.testing.assert_close(rollout.observations[:, :, 1:], rollout.observations[:, :, :-1] + clipped[:, :, :-1])
    torch.testing.assert_close(rollout.final_positions, rollout.observations[:, :, -1] + clipped[:, :, -1])
    torch.testing.assert_close(rollout.returns(), rollout.rewards.sum(-1))
    for task in range(num_tasks):
        gx, gy = goals[task].tolist()
        for episode in range(episodes):
            x = y = 0.0
            for time in range(env.horizon):
                assert rollout.observations[task, episode, time].tolist() == pytest.approx([x, y], abs=1e-12)
                ax = 0.8 * (gx - x) + offsets[episode, 0].item() + math.sin(3 * x)
                ay = 0.8 * (gy - y) + offsets[episode, 1].item() + math.sin(3 * y)
                assert rollout.actions[task, episode, time].tolist() == pytest.approx([ax, ay], abs=1e-12)
                x, y = x + min(max(ax, -0.1), 0.1), y + min(max(ay, -0.1), 0.1)
                assert rollout.rewards[task, episode, time].item() == pytest.approx(-math.hypot(x - gx, y - gy),
                                                                                    abs=1e-12)


def test_moving_to_the_goal_beats_standing_still():
    env = PointNavigation(horizon=20)
    goals = env.sample_tasks(8, seeded(5))
    goals = goals + 0.05 * torch.sign(goals)  # no goal at the origin, where standing still is optimal too
    to_goal = env.rollout(lambda obs: goals[:, None, :] - obs, goals, 2)
    still = env.rollout(torch.zeros_like, goals, 2)
    assert torch.all(to_goal.returns() > still.returns())
    # the goals are within reach of 20 steps of 0.1: the direct policy arrives
    torch.testing.assert_close(to_goal.final_positions, goals[:, None, :].expand(8, 2, 2))


def test_rollout_rejects_bad_inputs():
    env = PointNavigation(horizon=3)
    goals = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="goals"):
        env.rollout(torch.zeros_like, torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="episodes"):
        env.rollout(torch.zeros_like, goals, 0)
    with pytest.raises(ValueError, match="act must return"):
        env.rollout(lambda obs: obs[..., :1], goals, 2)
    with pytest.raises(ValueError, match="num_tasks"):
        env.sample_tasks(0)


@pytest.mark.parametrize("field, value", [
    ("horizon", 0), ("horizon", 2.5), ("horizon", True), ("max_action", 0.0), ("max_action", math.inf),
    ("goal_low", math.nan), ("goal_high", "1"), ("goal_low", 0.5),
])
def test_point_navigation_validates_its_fields(field, value):
    with pytest.raises(ValueError, match=field):
        PointNavigation(**{field: value})


# -- policy --------------------------------------------------------------------------------------------------


def test_policy_shapes_and_expanded_log_std():
    policy = GaussianMLPPolicy(obs_dim=3, act_dim=2, hidden=(8, 5), init_std=0.5)
    mean, log_std = policy(torch.randn(4, 6, 3))
    assert mean.shape == (4, 6, 2) == log_std.shape
    torch.testing.assert_close(log_std, torch.full((4, 6, 2), math.log(0.5)))
    assert dict(policy.named_parameters())["log_std"].shape == (2,)
    linear = GaussianMLPPolicy(hidden=())
    assert linear(torch.randn(5, 2))[0].shape == (5, 2)


def test_policy_acts_in_units_of_max_action_and_bounds_its_mean():
    torch.manual_seed(0)
    plain = GaussianMLPPolicy(hidden=(8,), init_std=0.5)
    for bounded in (False, True):
        torch.manual_seed(0)
        scaled = GaussianMLPPolicy(hidden=(8,), init_std=0.5, max_action=0.1, bounded_mean=bounded)
        with torch.no_grad():  # a mean far outside the clip, which only the bounded policy keeps inside
            for module in (plain, scaled):
                module.mean[-1].bias.fill_(30.0)
        observations = torch.randn(64, 2)
        mean, log_std = scaled(observations)
        raw, _ = plain(observations)
        torch.testing.assert_close(log_std, torch.full((64, 2), math.log(0.5 * 0.1)))  # std in the unit
        if bounded:
            torch.testing.assert_close(mean, 0.1 * torch.tanh(raw))
            assert mean.abs().max() <= 0.1
        else:
            torch.testing.assert_close(mean, 0.1 * raw)
            assert mean.min() > 2.0


def test_a_drifted_bounded_policy_still_samples_unclipped_actions():
    # what keeps the policy gradient informative: however far training pushes the mean's pre-activation
    # (the collapse in docs/method.md), a bounded policy keeps sampling actions inside the clip, whose
    # rewards depend on the noise; an unbounded one ends up with every action clipped to one corner
    env = PointNavigation(horizon=20)
    goals = env.sample_tasks(6, seeded(3), dtype=f64)
    shares = {}
    for bounded in (False, True):
        policy = GaussianMLPPolicy(hidden=(8,), max_action=env.max_action, bounded_mean=bounded).double()
        with torch.no_grad():
            policy.mean[-1].bias.fill_(30.0)
        layout = ParamLayout.from_module(policy)
        rows = layout.flatten(dict(policy.named_parameters())).detach().expand(6, -1)
        traj = env.rollout(batched_actor(policy, layout, rows, seeded(4)), goals, episodes=10)
        shares[bounded] = (traj.actions.abs() < env.max_action).double().mean().item()
        spread = traj.returns().std(dim=1)  # do the episodes of a task differ at all?
        if bounded:
            assert (spread > 1e-3).all()
        else:
            assert (spread < 1e-9).all()
    assert shares[True] > 0.3 and shares[False] == 0.0


@pytest.mark.parametrize("kwargs, name", [
    ({"obs_dim": 0}, "obs_dim"), ({"act_dim": 1.5}, "act_dim"), ({"hidden": (4, 0)}, "hidden"),
    ({"hidden": 4}, "hidden"), ({"init_std": 0.0}, "init_std"), ({"init_std": math.nan}, "init_std"),
    ({"max_action": 0.0}, "max_action"), ({"max_action": math.inf}, "max_action"),
    ({"bounded_mean": 1}, "bounded_mean"),
])
def test_policy_validates_its_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GaussianMLPPolicy(**kwargs)


def test_gaussian_log_prob_matches_torch_and_has_second_derivatives():
    mean = torch.randn(5, 3, dtype=f64, requires_grad=True)
    log_std = (0.5 * torch.randn(5, 3, dtype=f64)).requires_grad_()
    actions = torch.randn(5, 3, dtype=f64)
    reference = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(mean, log_std, actions), reference)
    assert torch.autograd.gradgradcheck(lambda m, s: gaussian_log_prob(m, s, actions), (mean, log_std))


def test_sample_actions_is_reparameterized_noise():
    mean, log_std = torch.randn(4, 2, dtype=f64), torch.randn(4, 2, dtype=f64)
    actions = sample_actions(mean, log_std, seeded(9))
    noise = torch.randn((4, 2), generator=seeded(9), dtype=f64)
    torch.testing.assert_close(actions, mean + log_std.exp() * noise)


def perturbed_rows(policy: GaussianMLPPolicy, num_tasks: int) -> tuple[ParamLayout, torch.Tensor]:
    """Flat parameter rows of ``num_tasks`` different policies, with different standard deviations."""
    layout = ParamLayout.from_module(policy)
    theta = layout.flatten(dict(policy.named_parameters())).detach()
    rows = theta + 0.3 * torch.randn(num_tasks, layout.numel, dtype=theta.dtype)
    log_std = layout.unflatten(rows)["log_std"]
    log_std.copy_(torch.linspace(-1.0, 0.7, num_tasks, dtype=theta.dtype)[:, None].expand_as(log_std))
    return layout, rows


def test_batched_actor_runs_each_tasks_parameters():
    policy = GaussianMLPPolicy(hidden=(16, 16)).double()
    layout, rows = perturbed_rows(policy, 3)
    rows.requires_grad_()
    observations = torch.randn(3, 5, 2, dtype=f64)
    actions = batched_actor(policy, layout, rows, seeded(11))(observations)
    assert actions.shape == (3, 5, 2) and not actions.requires_grad
    noise = torch.randn((3, 5, 2), generator=seeded(11), dtype=f64)
    for task in range(3):
        mean, log_std = functional_call(policy, layout.unflatten(rows[task].detach()), (observations[task],))
        torch.testing.assert_close(actions[task], mean + log_std.exp() * noise[task])
    with pytest.raises(ValueError, match="task dimension"):
        batched_actor(policy, layout, rows)(observations[:2])
    with pytest.raises(ValueError, match="params"):
        batched_actor(policy, layout, rows[:, 1:])


def test_batched_actor_samples_the_policy_distribution():
    policy = GaussianMLPPolicy(hidden=(16,))
    layout, rows = perturbed_rows(policy, 3)
    samples = 20000
    observations = torch.randn(3, 1, 2).expand(3, samples, 2)  # one state per task, sampled many times
    actions = batched_actor(policy, layout, rows, seeded(12))(observations).double()
    for task in range(3):
        mean, log_std = functional_call(policy, layout.unflatten(rows[task]), (observations[task, :1],))
        std = log_std[0].exp().double()
        standard_error = std / math.sqrt(samples)
        assert torch.all((actions[task].mean(0) - mean[0].double()).abs() < 5 * standard_error)
        assert torch.all((actions[task].std(0) - std).abs() < 5 * std / math.sqrt(2 * samples))


def test_policy_rollout_is_deterministic_given_the_generators():
    env = PointNavigation(horizon=5)
    policy = GaussianMLPPolicy(hidden=(8,))
    layout, rows = perturbed_rows(policy, 2)

    def run(seed):
        goals = env.sample_tasks(2, seeded(seed))
        return env.rollout(batched_actor(policy, layout, rows, seeded(seed + 1)), goals, 3)

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first.actions, other.actions)


# -- returns and baseline ------------------------------------------------------------------------------------


@pytest.mark.parametrize("discount", [1.0, 0.9])
def test_discounted_returns_match_a_double_loop(discount):
    rewards = torch.randn(2, 3, 7, dtype=f64)
    returns = discounted_returns(rewards, discount)
    expected = torch.zeros_like(rewards)
    for time in range(7):
        for later in range(time, 7):
            expected[..., time] += discount ** (later - time) * rewards[..., later]
    torch.testing.assert_close(returns, expected)
    assert discounted_returns(rewards.float(), discount).dtype == torch.float32


def test_discounted_returns_stay_finite_for_long_horizons():
    returns = discounted_returns(torch.ones(3000), 0.5)
    assert torch.isfinite(returns).all()
    remaining = torch.arange(3000, 0, -1, dtype=f64)  # steps from t to the end, t included
    torch.testing.assert_close(returns, (2 - 0.5 ** (remaining - 1)).float())


@pytest.mark.parametrize("discount", [0.0, 1.5, -0.1, math.nan])
def test_discounted_returns_validate_the_discount(discount):
    with pytest.raises(ValueError, match="discount"):
        discounted_returns(torch.zeros(3), discount)


def test_baseline_features():
    observations = torch.tensor([[[0.5, -20.0], [3.0, 0.0], [-1.0, 11.0]]], dtype=f64)  # [1, H=3, D=2]
    features = baseline_features(observations)
    assert features.shape == (1, 3, 8)
    time = torch.arange(3, dtype=f64) / 100
    clipped = torch.tensor([[0.5, -10.0], [3.0, 0.0], [-1.0, 10.0]], dtype=f64)
    expected = torch.cat([clipped, clipped ** 2, time[:, None], time[:, None] ** 2, time[:, None] ** 3,
                          torch.ones(3, 1, dtype=f64)], dim=1)
    torch.testing.assert_close(features[0], expected)


def test_linear_baseline_recovers_linear_returns():
    observations = torch.rand(3, 4, 9, 2, dtype=f64) - 0.5
    coefficients = torch.randn(3, 8, dtype=f64)
    returns = torch.einsum("tehf,tf->teh", baseline_features(observations), coefficients)
    values = fit_linear_baseline(observations, returns, reg=1e-12)
    torch.testing.assert_close(values, returns, rtol=0, atol=1e-6)


def test_linear_baseline_matches_ridge_least_squares_per_task():
    observations, returns, reg = torch.randn(3, 4, 6, 2, dtype=f64), torch.randn(3, 4, 6, dtype=f64), 0.1
    values = fit_linear_baseline(observations, returns, reg=reg)
    assert values.shape == (3, 4, 6) and values.dtype == f64
    for task in range(3):
        design = baseline_features(observations[task]).reshape(-1, 8)
        # ridge regression as ordinary least squares on the rows of sqrt(reg) I appended to the design
        augmented = torch.cat([design, math.sqrt(reg) * torch.eye(8, dtype=f64)])
        targets = torch.cat([returns[task].reshape(-1), torch.zeros(8, dtype=f64)])
        solution = torch.linalg.lstsq(augmented, targets[:, None]).solution
        torch.testing.assert_close(values[task].reshape(-1), (design @ solution).squeeze(-1))


def test_linear_baseline_fits_each_task_on_its_own_data():
    observations, returns = torch.randn(3, 4, 6, 2), torch.randn(3, 4, 6)
    values = fit_linear_baseline(observations, returns)
    assert values.dtype == torch.float32 and not values.requires_grad
    changed_obs, changed_returns = observations.clone(), returns.clone()
    changed_obs[1], changed_returns[1] = torch.randn(4, 6, 2), torch.randn(4, 6)
    changed = fit_linear_baseline(changed_obs, changed_returns)
    torch.testing.assert_close(changed[[0, 2]], values[[0, 2]])
    assert not torch.allclose(changed[1], values[1])
    for task in range(3):
        alone = fit_linear_baseline(observations[task:task + 1], returns[task:task + 1])
        torch.testing.assert_close(alone[0], values[task])


def test_linear_baseline_retries_with_more_regularization(monkeypatch):
    # equal observations of 1 make obs, obs^2 and the constant the same feature: X^T X is singular, and a
    # ridge below its rounding error leaves it singular until the retries have multiplied it enough
    observations, returns = torch.ones(2, 5, 40, 2, dtype=f64), torch.randn(2, 5, 40, dtype=f64)
    infos = []
    solve_ex = torch.linalg.solve_ex

    def spy(*args, **kwargs):
        result = solve_ex(*args, **kwargs)
        infos.append(result.info.tolist())
        return result

    monkeypatch.setattr(torch.linalg, "solve_ex", spy)
    values = fit_linear_baseline(observations, returns, reg=1e-15)
    assert len(infos) > 1 and infos[0] != [0, 0] and infos[-1] == [0, 0]
    # the fit is then the projection on the features that remain: time and the constant
    time = torch.arange(40, dtype=f64) / 100
    design = torch.stack([time, time ** 2, time ** 3, torch.ones(40, dtype=f64)], dim=1).repeat(5, 1)
    for task in range(2):
        solution = torch.linalg.lstsq(design, returns[task].reshape(-1, 1)).solution
        torch.testing.assert_close(values[task].reshape(-1), (design @ solution).squeeze(-1), rtol=0, atol=1e-6)
    infos.clear()
    assert torch.isfinite(fit_linear_baseline(observations.float(), returns.float())).all() and len(infos) == 1


def test_linear_baseline_without_a_finite_fit_is_zero():
    observations, returns = torch.randn(2, 3, 4, 2), torch.randn(2, 3, 4)
    returns[1, 0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match=r"tasks \[1\]"):
        values = fit_linear_baseline(observations, returns)
    assert torch.equal(values[1], torch.zeros(3, 4)) and torch.isfinite(values[0]).all()


def test_linear_baseline_validates_its_arguments():
    observations, returns = torch.randn(2, 3, 4, 2), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="reg"):
        fit_linear_baseline(observations, returns, reg=0.0)
    with pytest.raises(ValueError, match="returns"):
        fit_linear_baseline(observations, returns[:, :, :3])
    with pytest.raises(ValueError, match="observations"):
        fit_linear_baseline(observations[0], returns[0])
