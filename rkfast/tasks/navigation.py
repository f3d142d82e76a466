"""2-D point navigation (Finn et al. 2017): meta-reinforcement learning with Runge-Kutta meta-policy-gradients.

Each task is a goal; each stage of the tableau has its own policy (the stage point), and the data of stage
``j`` are rollouts of that stage's policy, drawn only once the stage point is known (a :class:`TaskSet`
whose data are stage callables). A stage's loss is minus the DiCE objective (:mod:`rkfast.rl.dice`) with
the per-task linear feature baseline, so its gradient is the REINFORCE policy gradient and its second
derivatives include how the stage's sampling distribution depends on the parameters: the meta-gradient
of a second-order step is an unbiased estimate of the exact one.

The registered ``navigation`` domain: a Gaussian MLP policy (2 x 100, ReLU, learned log-std), 20 tasks
per meta-batch, 20 episodes per task and stage, inner step 0.1 (Finn et al. 2017), Adam outside; meta-test
on held-out goals with fresh rollouts after each adaptation step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..batch import TaskSet
from ..layout import ParamLayout
from ..rl.baseline import discounted_returns, fit_linear_baseline
from ..rl.dice import dice_objective
from ..rl.navigation import PointNavigation, Trajectories
from ..rl.policy import GaussianMLPPolicy, batched_actor, gaussian_log_prob
from .registry import Defaults, Domain, Metric, Option, register

if TYPE_CHECKING:
    from ..train import RunResult

__all__ = ["NavigationTasks", "StageRollouts", "PolicyLoss", "rollout_data", "plot_trajectories", "NAVIGATION"]


def _stream_seed(seed: int, *keys: int) -> int:
    """An independent seed for each (task batch, side, stage): rollouts of different stages or sides never
    share noise, and the same task batch replays the same rollouts (resume, evaluation)."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class StageRollouts:
    """The data of one side (support or query) of a batch of navigation tasks, made per stage.

    Called as ``data(stage, params [T, N])`` by rkfast: rolls out ``episodes`` episodes of each task's
    stage policy toward its goal, and returns per-task tensors (observations, actions, rewards and the
    fitted baseline values) for :class:`PolicyLoss`.
    """

    tasks: NavigationTasks
    goals: Tensor  # [T, 2]
    seed: int
    side: int  # 0: support, 1: query

    def __call__(self, stage: int, params: Tensor) -> dict[str, Tensor]:
        t = self.tasks
        gen = torch.Generator().manual_seed(_stream_seed(self.seed, self.side, stage))
        act = batched_actor(t.policy, t.layout, params.to(t.policy_dtype), gen)
        traj = t.env.rollout(act, self.goals, t.episodes)
        return rollout_data(traj, t.discount)


def rollout_data(traj: Trajectories, discount: float) -> dict[str, Tensor]:
    """What :class:`PolicyLoss` needs from rollouts: the trajectories, the baseline and the advantage scale.

    The baseline is the linear feature baseline fitted per task on the very episodes it is used with,
    shifted by the task's mean advantage; ``scale`` is one over the spread of the advantages. Both are
    detached constants of the stage's rollouts: with them the first derivative of the loss is the policy
    gradient with advantages normalized per task (mean 0, standard deviation 1), as in the published
    implementation the inner step 0.1 was tuned with. A baseline changes no expectation and a positive
    constant factor only the length of the gradient, so the estimator stays unbiased for the scaled loss.
    """
    returns = discounted_returns(traj.rewards, discount)
    baseline = fit_linear_baseline(traj.observations, returns)
    advantages = (returns - baseline).flatten(1)  # [T, E * H]
    values = baseline + advantages.mean(dim=1).view(-1, 1, 1)
    scale = 1.0 / (advantages.std(dim=1) + 1e-8)
    return {"observations": traj.observations, "actions": traj.actions, "rewards": traj.rewards, "values": values,
            "scale": scale}


@dataclass(frozen=True)
class PolicyLoss:
    """One task's stage loss: minus the DiCE objective with normalized advantages, per time step; reports the
    task's average (undiscounted) return.

    ``model(observations)`` runs the stage's policy; the log-probabilities of the sampled actions carry the
    dependence of the sampling distribution on the parameters (first and second order). Rewards and
    baseline are multiplied by the task's advantage scale (:func:`rollout_data`) and the objective is
    divided by the horizon: a mean over time steps of log-probability times normalized advantage, the
    published surrogate's scale.
    """

    discount: float

    def __call__(self, model: Any, data: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        mean, log_std = model(data["observations"])
        log_probs = gaussian_log_prob(mean, log_std, data["actions"])
        scale = data["scale"]
        objective = dice_objective(log_probs, data["rewards"] * scale, data["values"] * scale, self.discount)
        return -objective / data["rewards"].shape[-1], {"return": data["rewards"].sum(-1).mean()}


@dataclass
class NavigationTasks:
    """Navigation tasks of one split: goals drawn with the task generator, rollouts made per stage.

    ``sample(T, generator)`` gives a :class:`~rkfast.batch.TaskSet`: ``T`` goals and one rollout seed drawn
    from ``generator`` (so a checkpointed generator replays the same tasks and rollouts), support and query
    data that roll out each stage's own policy.
    """

    env: PointNavigation
    policy: nn.Module  # a policy of the run's architecture: its layout unflattens the stage rows
    episodes: int = 20
    discount: float = 0.99
    device: torch.device | str = "cpu"
    layout: ParamLayout = field(init=False)
    policy_dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        if self.episodes < 2:  # the baseline and the return's spread need more than one episode
            raise ValueError(f"episodes must be >= 2, got {self.episodes}")
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {self.discount}")
        self.policy = self.policy.to(self.device)
        self.layout = ParamLayout.from_module(self.policy)
        self.policy_dtype = next(self.policy.parameters()).dtype

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskSet:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        goals = self.env.sample_goals(num_tasks, generator, device=self.device, dtype=self.policy_dtype)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        loss = PolicyLoss(self.discount)
        return TaskSet(loss, loss, StageRollouts(self, goals, seed, 0), StageRollouts(self, goals, seed, 1),
                       num_tasks=num_tasks)


# -- the registered domain ----------------------------------------------------------------------------


def _policy(options: Mapping[str, Any]) -> GaussianMLPPolicy:
    return GaussianMLPPolicy(2, 2, hidden=(options["hidden"], options["hidden"]))


def _make_tasks(options: Mapping[str, Any], split: str, device: torch.device) -> NavigationTasks:
    env = PointNavigation(horizon=options["horizon"])
    return NavigationTasks(env, _policy(options), episodes=options["episodes"], discount=options["discount"],
                           device=device)


def plot_trajectories(run: RunResult, path: Path | str, tasks: int = 4, steps: Sequence[int] = (0, 1, 3),
                      episodes: int = 3) -> None:
    """The first meta-test goals: the policy's mean-action path (bold) and a few sampled episodes (faint)
    before and after adaptation (on fresh support rollouts, with the meta-test step size)."""
    from ..plots import new_figure, save_figure
    from ..train import task_generator

    opt, options = run.opt, run.config.options
    sampler = _make_tasks(options, "test", opt.device)
    taskset = sampler.sample(min(tasks, run.config.test_tasks), task_generator(run.config.test_seed, "test"))
    count = taskset.num_tasks or 1
    step_size = run.test.step_size if run.test is not None else None
    adapted = opt.evaluate(taskset, steps=[n for n in steps if n > 0], step_size=step_size, keep_params=True)
    goals = taskset.support_data.goals
    fig = new_figure(figsize=(4.2 * count, 4.4))
    axes = [fig.add_subplot(1, count, i + 1) for i in range(count)]
    for k, n in enumerate(steps):
        params = adapted.params[adapted.steps.index(n)].to(sampler.policy_dtype)  # type: ignore[union-attr]
        label = "before adaptation" if n == 0 else f"after {n} step{'s' * (n != 1)}"
        paths = []
        for deterministic in (True, False):
            act = batched_actor(sampler.policy, sampler.layout, params, torch.Generator().manual_seed(k),
                                deterministic=deterministic)
            traj = sampler.env.rollout(act, goals, 1 if deterministic else episodes)
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
    fig.suptitle(f"navigation meta-test goals, tableau {run.tableau.name}: mean-action path (bold), "
                 f"{episodes} sampled episodes (faint)")
    save_figure(fig, path)


NAVIGATION = register(Domain(
    name="navigation",
    description="2-D point navigation (Finn et al. 2017): reach a goal ~ U[-0.5, 0.5]^2 from the origin, "
                "velocities clipped to 0.1, reward -distance, horizon 100; Gaussian MLP policy, DiCE + "
                "linear baseline",
    make_tasks=_make_tasks,
    make_model=_policy,
    loss_fn=None,
    metrics=(Metric("return", "return", "average return", "return", higher_is_better=True),),
    defaults=Defaults(iterations=300, meta_batch=20, inner_lr=0.1, lr=1e-2, eval_every=50, eval_tasks=40,
                      test_tasks=40, test_steps=(1, 2, 3), eval_steps=(1,), eval_chunk=40,
                      source="Finn et al. 2017: 20 tasks per meta-batch, 20 episodes per task, inner step 0.1; "
                             "Adam outside (instead of TRPO) at 1e-2"),
    options=(
        Option("episodes", 20, "episodes per task and stage (support and query each)"),
        Option("horizon", 100, "time steps per episode"),
        Option("discount", 0.99, "discount of the returns (the baseline fits the discounted reward-to-go)"),
        Option("hidden", 100, "units of each of the policy's two hidden layers"),
    ),
    describe_test=lambda o: f"{o['episodes']} episodes of {o['horizon']} steps per goal and adaptation step",
    test_protocol=lambda o: {"episodes": o["episodes"], "horizon": o["horizon"], "discount": o["discount"]},
    plots={"trajectories.png": plot_trajectories},
))
