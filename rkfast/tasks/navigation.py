"""2-D point navigation (Finn et al. 2017): meta-reinforcement learning with Runge-Kutta meta-policy-gradients.

Each task is a goal; each stage of the tableau has its own policy (the stage point), and the data of stage
``j`` are rollouts of that stage's policy (:mod:`rkfast.tasks.rollouts`). The registered ``navigation``
domain: a Gaussian MLP policy (2 x 100, ReLU, learned log-std; acting in units of the clip 0.1, with its mean
kept inside it), 20 tasks per meta-batch, 20 episodes per task and stage, inner step 0.1 (Finn et al. 2017),
Adam outside; meta-test on held-out goals with fresh
rollouts after each adaptation step, and a plot of trajectories before and after adaptation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..figures import new_figure, save_figure
from ..rl.navigation import PointNavigation
from ..rl.policy import GaussianMLPPolicy, batched_actor
from .registry import Defaults, Domain, TrainedRun, kept_params, meta_test_tasks, register
from .rollouts import RETURN, RolloutTasks, describe_rollout_test, rollout_options, rollout_test_protocol
from .sampling import task_generator

__all__ = ["plot_trajectories", "NAVIGATION"]


# -- the registered domain ----------------------------------------------------------------------------


def _policy(options: Mapping[str, Any]) -> GaussianMLPPolicy:
    # in units of the clip, with the mean kept inside it (GaussianMLPPolicy says why)
    return GaussianMLPPolicy(
        2, 2, hidden=(options["hidden"], options["hidden"]), max_action=PointNavigation.max_action, bounded_mean=True
    )


def _make_tasks(options: Mapping[str, Any], split: str, device: torch.device) -> RolloutTasks:
    env = PointNavigation(horizon=options["horizon"])
    return RolloutTasks(
        env, _policy(options), episodes=options["episodes"], discount=options["discount"], device=device
    )


def plot_trajectories(
    run: TrainedRun, path: Path | str, tasks: int = 4, steps: Sequence[int] = (0, 1, 3), episodes: int = 3
) -> None:
    """The first meta-test goals: the policy's mean-action path (bold) and a few sampled episodes (faint)
    before and after adaptation (on fresh support rollouts, with the meta-test step size)."""
    opt, options = run.opt, run.config.options
    sampler = _make_tasks(options, "test", opt.device)
    taskset = sampler.sample(min(tasks, meta_test_tasks(run)), task_generator(run.config.test_seed, "test"))
    count = taskset.num_tasks or 1
    step_size = run.config.test_step  # None: evaluate's default (the tableau's own step, or learned rates)
    adapted = opt.evaluate(taskset, steps=[n for n in steps if n > 0], step_size=step_size, keep_params=True)
    adapted_params = kept_params(adapted)
    goals = taskset.support_data.task_params
    fig = new_figure(figsize=(4.2 * count, 4.4))
    axes = [fig.add_subplot(1, count, i + 1) for i in range(count)]
    for k, n in enumerate(steps):
        params = adapted_params[adapted.steps.index(n)].to(sampler.policy_dtype)
        label = "before adaptation" if n == 0 else f"after {n} step{'s' * (n != 1)}"
        paths = []
        for deterministic in (True, False):
            act = batched_actor(
                sampler.policy, sampler.layout, params, torch.Generator().manual_seed(k), deterministic=deterministic
            )
            traj = sampler.env.rollout(act, goals, 1 if deterministic else episodes, seed=k)
            if traj.final_positions is None:  # PointNavigation records them: a path ends where the episode does
                raise ValueError("the navigation rollout recorded no final positions")
            paths.append(torch.cat([traj.observations, traj.final_positions.unsqueeze(2)], dim=2).cpu())
        mean_path, sampled = paths  # [T, E, H + 1, 2]
        for i, ax in enumerate(axes):
            for e in range(sampled.shape[1]):
                ax.plot(sampled[i, e, :, 0], sampled[i, e, :, 1], color=f"C{k}", lw=0.6, alpha=0.25)
            ax.plot(mean_path[i, 0, :, 0], mean_path[i, 0, :, 1], color=f"C{k}", lw=2.2, label=label)
    for i, ax in enumerate(axes):
        g = goals[i].cpu()
        ax.scatter([0], [0], marker="o", color="k", s=25, zorder=5, label="start")
        ax.scatter([g[0]], [g[1]], marker="*", color="r", s=160, zorder=5, label="goal")
        ax.set_aspect("equal")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"goal ({g[0]:.2f}, {g[1]:.2f})", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"navigation meta-test goals, tableau {run.tableau.name}: mean-action path (bold), "
        f"{episodes} sampled episodes (faint)"
    )
    save_figure(fig, path)


NAVIGATION = register(
    Domain(
        name="navigation",
        description="2-D point navigation (Finn et al. 2017): reach a goal ~ U[-0.5, 0.5]^2 from the origin, "
        "velocities clipped to 0.1, reward -distance, horizon 100; Gaussian MLP policy, DiCE + "
        "linear baseline",
        make_tasks=_make_tasks,
        make_model=_policy,
        loss_fn=None,
        metrics=(RETURN,),
        defaults=Defaults(
            iterations=500,
            meta_batch=20,
            inner_lr=0.1,
            lr=1e-3,
            eval_every=50,
            eval_tasks=40,
            test_tasks=40,
            test_steps=(1, 2, 3),
            eval_steps=(1,),
            eval_chunk=40,
            source="Finn et al. 2017: 20 tasks per meta-batch, 20 episodes per task, inner step 0.1; "
            "Adam outside (instead of TRPO) at 1e-3, as ProMP's DiCE-MAML",
        ),
        options=rollout_options(horizon=100),
        describe_test=describe_rollout_test,
        test_protocol=rollout_test_protocol,
        plots={"trajectories.png": plot_trajectories},
    )
)
