"""What a reinforcement-learning task domain needs from an environment (:class:`TaskEnvironment`).

The meta-learner only samples task parameters and rolls out each task's stage policy; anything that does
both, for a batch of tasks at once, plugs into :class:`rkfast.tasks.navigation.RolloutTasks`: the 2-D point
navigation written in torch (:class:`rkfast.rl.navigation.PointNavigation`) and simulators driven step by
step (MuJoCo through gymnasium).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from .navigation import Trajectories

__all__ = ["TaskEnvironment"]


class TaskEnvironment(Protocol):
    """A family of tasks (goals, directions, velocities, ...) in one environment, rolled out in batches.

    Attributes:
        horizon: ``H``, the number of steps of every episode (episodes do not end early: rewards and
            observations are ``[T, E, H]``-shaped).
        obs_dim, act_dim: the sizes of an observation and of an action.
    """

    horizon: int
    obs_dim: int
    act_dim: int

    def sample_tasks(self, num_tasks: int, generator: torch.Generator | None = None, *,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """``[T, ...]`` task parameters drawn with ``generator`` (the same state gives the same tasks)."""
        ...

    def rollout(self, act: Callable[[Tensor], Tensor], tasks: Tensor, episodes: int,
                seed: int | None = None) -> Trajectories:
        """``episodes`` episodes of each task, ``act(observations [T, E, obs_dim]) -> actions [T, E, act_dim]``
        called once per step; ``seed`` seeds any randomness of the environment itself (initial states)."""
        ...
