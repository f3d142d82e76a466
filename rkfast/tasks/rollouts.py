"""Reinforcement-learning task sets: each stage's data are rollouts of that stage's own policy.

:class:`RolloutTasks` turns any :class:`~rkfast.rl.env.TaskEnvironment` and a policy architecture into a
task sampler for :mod:`rkfast.train`: each meta-batch is a :class:`~rkfast.batch.TaskSet` whose support and
query data are stage callables (:class:`StageRollouts`) and whose losses are minus the DiCE objective with
the per-task linear feature baseline and normalized advantages (:class:`PolicyLoss`). The gradient of a
stage's loss is the REINFORCE policy gradient, and its second derivatives include how the stage's sampling
distribution depends on the parameters, so the meta-gradient of a second-order step is an unbiased
estimate of the exact one (``docs/method.md``, "Reinforcement learning").
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..batch import TaskSet
from ..layout import ParamLayout
from ..rl.baseline import discounted_returns, fit_linear_baseline
from ..rl.dice import dice_objective
from ..rl.env import TaskEnvironment
from ..rl.navigation import Trajectories
from ..rl.policy import batched_actor, gaussian_log_prob
from .registry import Metric, Option

__all__ = [
    "RolloutTasks",
    "StageRollouts",
    "PolicyLoss",
    "rollout_data",
    "RETURN",
    "rollout_options",
    "describe_rollout_test",
    "rollout_test_protocol",
]

RETURN = Metric("return", "return", "average return", "return", higher_is_better=True)
"""The metric of every reinforcement-learning domain: the average undiscounted return of fresh rollouts."""


def rollout_options(horizon: int) -> tuple[Option, ...]:
    """The options every reinforcement-learning domain offers (``horizon``: the domain's default)."""
    return (
        Option("episodes", 20, "episodes per task and stage (support and query each)"),
        Option("horizon", horizon, "time steps per episode"),
        Option("discount", 0.99, "discount of the returns (the baseline fits the discounted reward-to-go)"),
        Option("hidden", 100, "units of each of the policy's two hidden layers"),
    )


def describe_rollout_test(options: Mapping[str, Any]) -> str:
    return f"{options['episodes']} episodes of {options['horizon']} steps per task and adaptation step"


def rollout_test_protocol(options: Mapping[str, Any]) -> dict[str, Any]:
    return {"episodes": options["episodes"], "horizon": options["horizon"], "discount": options["discount"]}


def _stream_seed(seed: int, *keys: int) -> int:
    """An independent seed for each (task batch, side, stage): rollouts of different stages or sides never
    share noise, and the same task batch replays the same rollouts (resume, evaluation)."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class StageRollouts:
    """The data of one side (support or query) of a batch of tasks, made per stage.

    Called as ``data(stage, params [T, N])`` by rkfast: rolls out ``episodes`` episodes of each task's
    stage policy in its task, and returns per-task tensors (observations, actions, rewards, the fitted
    baseline values and the advantage scale) for :class:`PolicyLoss`.
    """

    tasks: RolloutTasks
    task_params: Tensor  # [T, ...]: what the environment's sample_tasks drew (navigation: the goals)
    seed: int
    side: int  # 0: support, 1: query

    def __call__(self, stage: int, params: Tensor) -> dict[str, Tensor]:
        t = self.tasks
        seed = _stream_seed(self.seed, self.side, stage)
        act = batched_actor(t.policy, t.layout, params.to(t.policy_dtype), torch.Generator().manual_seed(seed))
        traj = t.env.rollout(act, self.task_params, t.episodes, seed=seed)
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
    return {
        "observations": traj.observations,
        "actions": traj.actions,
        "rewards": traj.rewards,
        "values": values,
        "scale": scale,
    }


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
class RolloutTasks:
    """Reinforcement-learning tasks of one split: task parameters (e.g. goals) drawn with the task generator,
    rollouts of each stage's policy made per stage.

    ``sample(T, generator)`` gives a :class:`~rkfast.batch.TaskSet`: ``T`` tasks and one rollout seed drawn
    from ``generator`` (so a checkpointed generator replays the same tasks and rollouts), support and query
    data that roll out each stage's own policy in ``env`` (any :class:`~rkfast.rl.env.TaskEnvironment`).
    """

    env: TaskEnvironment
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
        task_params = self.env.sample_tasks(num_tasks, generator, device=self.device, dtype=self.policy_dtype)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        loss = PolicyLoss(self.discount)
        support, query = (StageRollouts(self, task_params, seed, side) for side in (0, 1))
        return TaskSet(loss, loss, support, query, num_tasks=num_tasks)
