"""The navigation domain: per-stage rollouts as TaskSet data, the DiCE policy loss, vmap == loop, training
through the CLI (results, plots, resume), and one inner step that improves the return."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rkfast
from rkfast.cli import main
from rkfast.rl.baseline import discounted_returns
from rkfast.tasks import get_domain
from rkfast.tasks.rollouts import PolicyLoss, RolloutTasks, rollout_data
from rkfast.rl.navigation import PointNavigation
from rkfast.rl.policy import GaussianMLPPolicy
from rkfast.train import TrainConfig, resume_config, train

from test_resume import interrupt_at, without_timings

SMALL_OPTIONS = {"episodes": 3, "horizon": 6, "hidden": 8}
SMALL_FLAGS = ["--episodes", "3", "--horizon", "6", "--hidden", "8", "--meta-batch", "3", "--eval-tasks", "4",
               "--test-tasks", "4", "--quiet"]


def small_tasks(dtype: torch.dtype = torch.float64) -> RolloutTasks:
    policy = GaussianMLPPolicy(2, 2, hidden=(8, 8)).to(dtype)
    return RolloutTasks(PointNavigation(horizon=6), policy, episodes=3, discount=0.9)


def optimizer(tasks: RolloutTasks, tableau: str, first_order: bool, vectorize: bool) -> rkfast.MetaOptimizer:
    torch.manual_seed(0)
    model = GaussianMLPPolicy(2, 2, hidden=(8, 8)).to(tasks.policy_dtype)
    return rkfast.MetaOptimizer(model, None, tableau=tableau, inner_lr=0.1, outer="sgd", lr=0.1,
                                first_order=first_order, vectorize=vectorize)


def test_the_same_generator_replays_goals_and_every_stages_rollouts():
    tasks = small_tasks()
    a = tasks.sample(4, torch.Generator().manual_seed(3))
    b = tasks.sample(4, torch.Generator().manual_seed(3))
    params = torch.randn(4, tasks.layout.numel, dtype=torch.float64) * 0.1
    assert torch.equal(a.support_data.task_params, b.support_data.task_params)
    for stage in (0, 1, 2):
        first, again = a.support_data(stage, params), b.support_data(stage, params)
        assert all(torch.equal(first[k], again[k]) for k in first)
    # stages and sides draw independent noise
    assert not torch.equal(a.support_data(0, params)["actions"], a.support_data(1, params)["actions"])
    assert not torch.equal(a.support_data(0, params)["actions"], a.query_data(0, params)["actions"])


def test_rollouts_come_from_each_tasks_own_stage_parameters():
    """A task whose stage policy has a large log-std explores much more than one with a small log-std."""
    tasks = small_tasks()
    taskset = tasks.sample(2, torch.Generator().manual_seed(0))
    rows = torch.zeros(2, tasks.layout.numel, dtype=torch.float64)
    tasks.layout.unflatten(rows[0])["log_std"].fill_(-5.0)  # views into the rows
    tasks.layout.unflatten(rows[1])["log_std"].fill_(0.0)
    actions = taskset.support_data(0, rows)["actions"]
    assert actions[0].abs().max() < 0.1 and actions[1].abs().max() > 0.5


def test_policy_loss_value_and_reported_return():
    tasks = small_tasks()
    taskset = tasks.sample(3, torch.Generator().manual_seed(1))
    params = torch.randn(3, tasks.layout.numel, dtype=torch.float64) * 0.1
    data = taskset.support_data(0, params)
    for t in range(3):
        row = {k: v[t] for k, v in data.items()}
        rows = tasks.layout.unflatten(params[t])
        policy_call = lambda obs, rows=rows: torch.func.functional_call(tasks.policy, rows, (obs,))
        loss, metrics = PolicyLoss(0.9)(policy_call, row)
        returns = discounted_returns(row["rewards"], 0.9)[:, 0]  # [E]: the discounted return of each episode
        expected = -(returns.mean() * row["scale"]) / row["rewards"].shape[-1]
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(metrics["return"], row["rewards"].sum(-1).mean())


def test_advantages_are_normalized_per_task():
    gen = torch.Generator().manual_seed(0)
    traj = PointNavigation(horizon=7).rollout(lambda obs: torch.randn(obs.shape, dtype=obs.dtype, generator=gen),
                                              torch.rand(3, 2, dtype=torch.float64) - 0.5, 4)
    data = rollout_data(traj, 0.95)
    advantages = (discounted_returns(traj.rewards, 0.95) - data["values"]) * data["scale"].view(-1, 1, 1)
    flat = advantages.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tableau", ["maml", "rk4"])
@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_and_task_by_task_paths_agree(tableau, first_order):
    tasks = small_tasks()
    taskset = tasks.sample(3, torch.Generator().manual_seed(2))
    vec = optimizer(tasks, tableau, first_order, True).compute(taskset)
    loop = optimizer(tasks, tableau, first_order, False).compute(taskset)
    torch.testing.assert_close(vec.direction, loop.direction, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(vec.loss, loop.loss, rtol=1e-12, atol=1e-14)


def test_a_short_meta_training_adapts():
    """After 20 meta-steps (the published episodes and horizon, 10 tasks per meta-batch, Adam at 1e-2: fast
    at first, the default 3e-3 is for stability over long runs), one inner step on
    40 held-out goals gains return by many standard errors of the per-goal gain (fresh rollouts)."""
    cfg = TrainConfig(domain="navigation", iterations=20, meta_batch=10, lr=1e-2, eval_every=0, eval_tasks=0,
                      test_tasks=40)
    run = train(cfg, progress=False)
    returns = run.test.metrics["return"]
    gain = returns[1] - returns[0]  # per goal: the goals' own spread cancels
    stderr = gain.std() / gain.numel() ** 0.5
    assert gain.mean() > 6 * stderr, (gain.mean().item(), stderr.item())


def test_train_evaluate_and_resume_through_the_cli(tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert main(["train", "navigation", "--iterations", "4", "--eval-every", "2", "--out", str(out), *SMALL_FLAGS]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete"
    returns = results["test"]["return"]
    assert set(returns) == {"0", "1", "2", "3"}
    assert all(r[0] < 0 for r in returns.values())  # minus distances
    assert (out / "trajectories.png").stat().st_size > 0 and (out / "training.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", str(out), "--steps", "1"]) == 0
    assert "return" in capsys.readouterr().out


def test_resumed_navigation_run_equals_an_uninterrupted_one(tmp_path: Path):
    """Rollout noise comes from the task generator, so a resumed run replays the same rollouts."""
    cfg = TrainConfig(domain="navigation", iterations=6, eval_every=3, eval_tasks=2, test_tasks=2, meta_batch=2,
                      options=SMALL_OPTIONS)
    whole = train(cfg, out=tmp_path / "whole", progress=False)
    with pytest.raises(rkfast.train.RunInterrupted):
        train(cfg, out=tmp_path / "cut", checkpoint_every=2, progress=False, on_step=interrupt_at(4))
    resumed = train(resume_config(tmp_path / "cut"), out=tmp_path / "cut", resume=True, progress=False)
    for (name, a), (_, b) in zip(whole.opt.model.state_dict().items(), resumed.opt.model.state_dict().items()):
        assert torch.equal(a, b), name
    a = without_timings(json.loads((tmp_path / "whole" / "results.json").read_text()))
    b = without_timings(json.loads((tmp_path / "cut" / "results.json").read_text()))
    assert a == b
