"""What a reinforcement-learning task domain needs from an environment (:class:`TaskEnvironment`).

The meta-learner only samples task parameters and rolls out each task's stage policy; anything that does
both, for a batch of tasks at once, plugs into :class:`rkfast.tasks.navigation.RolloutTasks`: the 2-D point
navigation written in torch (:class:`rkfast.rl.navigation.PointNavigation`) and simulators driven step by
step (MuJoCo through gymnasium).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = ["TaskEnvironment", "Trajectories", "unit_task_draws", "finite_field", "check_rollout_args"]


class Trajectories(NamedTuple):
    """Rollouts of ``E`` episodes of ``H`` steps in each of ``T`` tasks.

    Attributes:
        observations: ``[T, E, H, 2]``, the position before each action.
        actions: ``[T, E, H, 2]``, the actions as the policy sampled them, *not* clipped: log-probabilities
            of the policy are computed on these.
        rewards: ``[T, E, H]``, minus the distance to the goal after each step.
        final_positions: ``[T, E, ...]``, the position after the last step (navigation: ``[T, E, 2]``;
            half-cheetah: the torso's x, ``[T, E, 1]``; ``None`` when not recorded).
    """

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    final_positions: Tensor | None = None

    @property
    def num_tasks(self) -> int:
        """``T``, the number of tasks."""
        return int(self.rewards.shape[0])

    @property
    def episodes(self) -> int:
        """``E``, the number of episodes per task."""
        return int(self.rewards.shape[1])

    @property
    def horizon(self) -> int:
        """``H``, the number of steps per episode."""
        return int(self.rewards.shape[2])

    def returns(self) -> Tensor:
        """The undiscounted return of every episode.

        Returns:
            ``[T, E]``, the sum of the rewards over time.
        """
        return self.rewards.sum(dim=-1)


def finite_field(owner: str, name: str, value: object) -> float:
    """An environment's field ``value`` as a finite float, or a ValueError naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{owner}.{name} must be a finite real number, got {value!r}")
    return float(value)


def check_rollout_args(tasks: Tensor, width: int, episodes: object, name: str = "tasks") -> None:
    """What every :meth:`TaskEnvironment.rollout` checks first: ``tasks`` (called ``name`` in the message)
    is a floating point ``[T, width]`` tensor with ``T >= 1``, and ``episodes`` a positive integer.

    Raises:
        ValueError: naming the argument and what it is.
    """
    if tasks.dim() != 2 or tasks.shape[1] != width or tasks.shape[0] == 0 or not tasks.is_floating_point():
        raise ValueError(
            f"{name} must be a floating point [T, {width}] tensor with T >= 1, got shape "
            f"{tuple(tasks.shape)} and dtype {tasks.dtype}"
        )
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be a positive integer, got {episodes!r}")


def unit_task_draws(num_tasks: int, width: int, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    """``[num_tasks, width]`` float64 draws from U[0, 1) on the generator's device, from which an environment
    makes its task parameters (drawn in float64 so that tasks in another dtype are the same tasks rounded).

    Raises:
        ValueError: a ``num_tasks`` that is not a positive integer, or a ``dtype`` (of the tasks to be made)
            that is not floating point.
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand((num_tasks, width), generator=generator, dtype=torch.float64, device=draw_device)


class TaskEnvironment(Protocol):
    """A family of tasks (goals, directions, velocities, ...) in one environment, rolled out in batches.

    Its sizes are read-only: an implementation may expose them as fields of a frozen dataclass, class
    constants or properties.
    """

    @property
    def horizon(self) -> int:
        """``H``, the number of steps of every episode (episodes do not end early: rewards and observations
        are ``[T, E, H]``-shaped)."""
        ...

    @property
    def obs_dim(self) -> int:
        """The size of an observation."""
        ...

    @property
    def act_dim(self) -> int:
        """The size of an action."""
        ...

    @property
    def max_action(self) -> float:
        """The environment clips every action dimension to ``[-max_action, max_action]`` (the unit and bound
        of the domains' policies, :class:`~rkfast.rl.policy.GaussianMLPPolicy`)."""
        ...

    def sample_tasks(
        self,
        num_tasks: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``[T, ...]`` task parameters drawn with ``generator`` (the same state gives the same tasks)."""
        ...

    def rollout(
        self, act: Callable[[Tensor], Tensor], tasks: Tensor, episodes: int, seed: int | None = None
    ) -> Trajectories:
        """``episodes`` episodes of each task, ``act(observations [T, E, obs_dim]) -> actions [T, E, act_dim]``
        called once per step; ``seed`` seeds any randomness of the environment itself (initial states)."""
        ...
