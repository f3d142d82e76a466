"""The half-cheetah domains (optional MuJoCo extra): tasks, rollouts and their rewards checked against a replay in
gymnasium, a meta-step and a short training run; without the extra, one clear error that names it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import rkfast
import rkfast.tasks.halfcheetah  # noqa: F401  (registers halfcheetah-dir and halfcheetah-vel)
from rkfast.cli import main
from rkfast.data.images import DataError
from rkfast.rl.halfcheetah import CONTROL_COST, HalfCheetahTasks, episode_seeds
from rkfast.rl.policy import GaussianMLPPolicy
from rkfast.tasks import get_domain
from rkfast.tasks.rollouts import RolloutTasks
from rkfast.train import TrainConfig, train

f64 = torch.float64
SMALL_OPTIONS = {"episodes": 2, "horizon": 5, "hidden": 8}
EXTRA_NAMED = "pip install 'rkfast[rl]'"


# -- without the extra (runs whether or not it is installed) -----------------------------------------------------


@pytest.mark.parametrize("missing", ["gymnasium", "mujoco"])
def test_a_missing_extra_is_one_data_error_that_names_it(monkeypatch, tmp_path: Path, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now fails, installed or not
    with pytest.raises(DataError, match=r"optional MuJoCo extra: pip install 'rkfast\[rl\]'"):
        HalfCheetahTasks()
    options = get_domain("halfcheetah-vel").resolve_options({})
    with pytest.raises(DataError, match=r"rkfast\[rl\]"):
        get_domain("halfcheetah-vel").make_tasks(options, "train", torch.device("cpu"))
    # the model needs no simulator
    assert get_domain("halfcheetah-dir").make_model(options).obs_dim == 17
    capsys.readouterr()
    assert main(["train", "halfcheetah-dir", "--iterations", "1", "--quiet", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert EXTRA_NAMED in err and len(err.strip().splitlines()) == 1


def test_fields_are_checked_before_the_extra_is_needed():
    for kwargs, name in (({"kind": "sideways"}, "kind"), ({"horizon": 0}, "horizon"),
                         ({"horizon": 2.0}, "horizon"), ({"velocity_low": math.nan}, "velocity_low"),
                         ({"velocity_low": 2.0, "velocity_high": 1.0}, "velocity_low")):
        with pytest.raises(ValueError, match=f"HalfCheetahTasks.{name}"):
            HalfCheetahTasks(**kwargs)


# -- with the extra --------------------------------------------------------------------------------------------


@pytest.fixture
def mujoco_extra():
    """Skips a test when gymnasium or mujoco is not installed."""
    pytest.importorskip("gymnasium", reason="the MuJoCo extra is not installed: pip install 'rkfast[rl]'")
    pytest.importorskip("mujoco", reason="the MuJoCo extra is not installed: pip install 'rkfast[rl]'")
    return HalfCheetahTasks


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noisy_actor(seed: int, scale: float = 1.0):
    """A stochastic actor whose noise is replayed by its seed; scale > 1 makes many actions leave [-1, 1]."""
    generator = seeded(seed)

    def act(observations):
        return scale * torch.randn((*observations.shape[:-1], 6), generator=generator, dtype=observations.dtype)

    return act


def test_dims_match_the_environment_and_the_domains_model(mujoco_extra):
    env = mujoco_extra()
    assert env.env_id in ("HalfCheetah-v5", "HalfCheetah-v4")
    assert (env.obs_dim, env.act_dim) == (17, 6)
    space = env._simulator().action_space
    assert (space.low == -env.max_action).all() and (space.high == env.max_action).all()
    for name in ("halfcheetah-dir", "halfcheetah-vel"):
        domain = get_domain(name)
        policy = domain.make_model(domain.resolve_options({}))
        assert (policy.obs_dim, policy.act_dim) == (env.obs_dim, env.act_dim)
        assert policy.bounded_mean and policy.max_action == env.max_action


def test_an_environment_that_cannot_be_made_is_a_data_error(mujoco_extra, monkeypatch):
    import gymnasium

    import rkfast.rl.halfcheetah as halfcheetah

    def broken_make(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'imageio'")

    monkeypatch.setattr(halfcheetah, "_SIMULATORS", {})  # no cached simulator: one must be made
    monkeypatch.setattr(gymnasium, "make", broken_make)
    with pytest.raises(DataError, match=r"rkfast\[rl\].*imageio"):
        mujoco_extra()


def test_tasks_shape_range_and_determinism(mujoco_extra):
    directions = mujoco_extra(kind="direction").sample_tasks(400, seeded(3))
    assert directions.shape == (400, 1) and directions.dtype == torch.float32
    assert set(directions.unique().tolist()) == {-1.0, 1.0}
    assert 0.35 < (directions > 0).float().mean() < 0.65
    velocities = mujoco_extra(kind="velocity", velocity_low=0.5, velocity_high=1.5).sample_tasks(400, seeded(3),
                                                                                                 dtype=f64)
    assert velocities.shape == (400, 1) and velocities.dtype == f64
    assert velocities.min() >= 0.5 and velocities.max() <= 1.5
    assert (velocities < 1.0).any() and (velocities > 1.0).any()
    assert torch.equal(mujoco_extra(kind="velocity", velocity_low=0.5, velocity_high=1.5)
                       .sample_tasks(400, seeded(3), dtype=f64), velocities)
    assert not torch.equal(mujoco_extra(kind="direction").sample_tasks(400, seeded(4)), directions)


def test_rollout_shapes_and_determinism(mujoco_extra):
    env = mujoco_extra(horizon=5)
    tasks = torch.tensor([[1.0], [-1.0]])
    traj = env.rollout(noisy_actor(0), tasks, 2, seed=7)
    assert traj.observations.shape == (2, 2, 5, 17) and traj.actions.shape == (2, 2, 5, 6)
    assert traj.rewards.shape == (2, 2, 5) and traj.final_positions.shape == (2, 2, 1)
    assert all(t.dtype == torch.float32 for t in traj)
    assert all(torch.isfinite(t).all() for t in traj)
    again = env.rollout(noisy_actor(0), tasks, 2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(traj, again))
    other = env.rollout(noisy_actor(0), tasks, 2, seed=8)
    assert not torch.equal(other.observations[:, :, 0], traj.observations[:, :, 0])  # other initial states
    # a larger rollout first (more cached simulators) changes nothing
    env.rollout(noisy_actor(1), tasks.repeat(3, 1), 3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(traj, env.rollout(noisy_actor(0), tasks, 2, seed=7)))


def test_rollout_replays_in_gymnasium_with_unclipped_actions_recorded(mujoco_extra):
    """Each episode equals gymnasium's own: reset with its episode seed, stepped with the clipped actions."""
    import gymnasium

    env = mujoco_extra(horizon=6)
    traj = env.rollout(noisy_actor(2, scale=3.0), torch.tensor([[1.0], [-1.0]], dtype=f64), 2, seed=11)
    assert traj.actions.abs().max() > 1.0  # recorded as the policy drew them
    seeds = episode_seeds(11, 4)
    velocities = torch.empty(2, 2, 6, dtype=f64)
    replay = gymnasium.make(env.env_id, disable_env_checker=True).unwrapped
    for t in range(2):
        for e in range(2):
            observation, _ = replay.reset(seed=seeds[t * 2 + e])
            for time in range(6):
                torch.testing.assert_close(traj.observations[t, e, time], torch.from_numpy(observation))
                observation, _, _, _, info = replay.step(traj.actions[t, e, time].clamp(-1, 1).numpy())
                velocities[t, e, time] = info["x_velocity"]
            assert traj.final_positions[t, e, 0].item() == pytest.approx(info["x_position"])
    control = CONTROL_COST * traj.actions.clamp(-1, 1).square().sum(-1)
    assert CONTROL_COST == 0.05
    expected = torch.tensor([1.0, -1.0], dtype=f64).view(2, 1, 1) * velocities - control
    torch.testing.assert_close(traj.rewards, expected)


def test_direction_and_velocity_rewards_of_the_same_motion(mujoco_extra):
    """Same seed and actions: the same motion, so r(+1) = -r(-1) - 2 ctrl and r(target) = -|v - target| - ctrl."""
    def rollout(kind, task):
        actor = noisy_actor(5, scale=1.5)
        return mujoco_extra(kind=kind, horizon=8).rollout(actor, torch.tensor([[task]], dtype=f64), 2, seed=3)

    forward, backward = rollout("direction", 1.0), rollout("direction", -1.0)
    assert torch.equal(forward.observations, backward.observations)
    assert torch.equal(forward.actions, backward.actions)
    control = CONTROL_COST * forward.actions.clamp(-1, 1).square().sum(-1)
    torch.testing.assert_close(forward.rewards, -backward.rewards - 2 * control)
    velocity = forward.rewards + control  # v
    assert velocity.abs().max() > 0  # it moves
    for target in (0.0, 0.7):
        at_target = rollout("velocity", target)
        assert torch.equal(at_target.observations, forward.observations)
        torch.testing.assert_close(at_target.rewards, -(velocity - target).abs() - control)


def test_a_second_order_maml_step_on_rollout_tasks(mujoco_extra):
    policy = GaussianMLPPolicy(17, 6, hidden=(8, 8))
    tasks = RolloutTasks(mujoco_extra(kind="velocity", horizon=5), policy, episodes=2, discount=0.99)
    taskset = tasks.sample(2, seeded(0))
    torch.manual_seed(0)
    model = GaussianMLPPolicy(17, 6, hidden=(8, 8))
    opt = rkfast.MetaOptimizer(model, None, tableau="maml", inner_lr=0.1, outer="adam", lr=1e-2, first_order=False)
    before = [p.detach().clone() for p in model.parameters()]
    out = opt.step(taskset)
    assert torch.isfinite(out.loss) and torch.isfinite(out.direction).all() and out.direction.abs().sum() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_short_training_run_reports_finite_returns(mujoco_extra):
    cfg = TrainConfig(domain="halfcheetah-dir", iterations=2, meta_batch=2, eval_every=0, eval_tasks=0, test_tasks=2,
                      options=SMALL_OPTIONS)
    run = train(cfg, progress=False)
    assert run.status == "complete"
    assert tuple(run.test.steps) == (0, 1, 2, 3)
    returns = run.test.metrics["return"]
    assert returns.shape == (4, 2) and torch.isfinite(returns).all()
    assert all(math.isfinite(loss) for loss in run.losses)
