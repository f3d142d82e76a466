"""2-D point navigation (Finn et al. 2017, section 5.3), vectorized over tasks, episodes and time steps.

A point starts at the origin of the plane and must reach a goal drawn uniformly from a square; each task is
one goal. An action is a displacement, clipped elementwise to ``[-max_action, max_action]``; the reward of a
step is minus the Euclidean distance from the new position to the goal.

Finn et al. describe the reward as the negative *squared* distance and end an episode once the point is
within 0.01 of the goal. Here the reward is minus the distance and every episode lasts exactly ``horizon``
steps: with no early termination every episode of a batch has the same length, so rollouts are dense
``[T, E, H, ...]`` tensors without masks (a point that has arrived keeps collecting rewards close to 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .env import Trajectories, check_rollout_args, finite_field, unit_task_draws

__all__ = ["PointNavigation", "Trajectories"]


@dataclass(frozen=True)
class PointNavigation:
    """The 2-D point navigation environment; stateless, so one instance serves every task and episode.

    Every episode starts at the origin and lasts exactly ``horizon`` steps (no early termination).

    Attributes:
        horizon: ``H``, the number of steps of every episode.
        max_action: actions are clipped elementwise to ``[-max_action, max_action]``.
        goal_low, goal_high: goals are drawn uniformly from ``[goal_low, goal_high]^2``.

    Raises:
        ValueError: a ``horizon`` that is not a positive integer, a ``max_action`` that is not a positive
            finite number, or goal bounds that are not finite with ``goal_low < goal_high``.
    """

    horizon: int = 100
    max_action: float = 0.1
    goal_low: float = -0.5
    goal_high: float = 0.5
    obs_dim = 2  # the position
    act_dim = 2  # the velocity

    def __post_init__(self) -> None:
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"PointNavigation.horizon must be a positive integer, got {self.horizon!r}")
        if finite_field("PointNavigation", "max_action", self.max_action) <= 0:
            raise ValueError(f"PointNavigation.max_action must be positive, got {self.max_action!r}")
        low = finite_field("PointNavigation", "goal_low", self.goal_low)
        high = finite_field("PointNavigation", "goal_high", self.goal_high)
        if not low < high:
            raise ValueError(
                f"PointNavigation.goal_low must be below goal_high, got goal_low={self.goal_low!r} "
                f"and goal_high={self.goal_high!r}"
            )

    def step(self, positions: Tensor, actions: Tensor, goals: Tensor) -> tuple[Tensor, Tensor]:
        """One step of any batch of points; the three inputs broadcast against each other.

        Args:
            positions: ``[..., 2]``, the positions before the step.
            actions: ``[..., 2]``, the actions, clipped here to ``[-max_action, max_action]``.
            goals: ``[..., 2]``, the goals.

        Returns:
            ``(new_positions [..., 2], rewards [...])``: ``positions + clipped actions``, and minus the
            Euclidean distance from the new positions to the goals.
        """
        new_positions = positions + actions.clamp(-self.max_action, self.max_action)
        rewards = -torch.linalg.vector_norm(new_positions - goals, dim=-1)
        return new_positions, rewards

    def sample_tasks(
        self,
        num_tasks: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw one goal per task, uniformly from ``[goal_low, goal_high]^2`` (the tasks' parameters of the
        :class:`~rkfast.rl.env.TaskEnvironment` interface).

        The goals are drawn in float64 on the generator's device (the CPU without a generator), then
        converted and moved: the same generator state gives the same goals on every device, and goals of
        another ``dtype`` are the same goals rounded.

        Args:
            num_tasks: ``T``, the number of goals.
            generator: the random number generator; ``None`` uses torch's global one.
            device: where the goals go.
            dtype: a floating point dtype for the goals.

        Returns:
            ``[T, 2]`` goals.

        Raises:
            ValueError: a ``num_tasks`` that is not a positive integer, or a ``dtype`` that is not floating point.
        """
        unit = unit_task_draws(num_tasks, 2, generator, dtype)
        goals = self.goal_low + (self.goal_high - self.goal_low) * unit
        return goals.to(device=device, dtype=dtype)

    def rollout(
        self, act: Callable[[Tensor], Tensor], goals: Tensor, episodes: int, seed: int | None = None
    ) -> Trajectories:
        """Run ``episodes`` episodes in each task, all at once, starting at the origin.

        The only Python loop is over the ``horizon`` time steps; tasks and episodes are one batch. Runs
        under ``torch.no_grad()``: rollouts are data, and the policy's log-probabilities are computed
        afterwards from the recorded observations and actions.

        Args:
            act: ``act(observations [T, E, 2]) -> actions [T, E, 2]``, called once per time step (e.g.
                :func:`rkfast.rl.policy.batched_actor`).
            goals: ``[T, 2]``, one goal per task; the rollout's dtype and device are those of ``goals``.
            episodes: ``E``, the number of episodes per task.
            seed: unused: the dynamics have no randomness (the :class:`~rkfast.rl.env.TaskEnvironment`
                interface, whose simulators may draw initial states).

        Returns:
            The :class:`Trajectories`, ``[T, E, H, ...]``.

        Raises:
            ValueError: ``goals`` that are not a floating point ``[T, 2]`` tensor, an ``episodes`` that is not a
                positive integer, or actions of another shape than ``[T, E, 2]``.
        """
        check_rollout_args(goals, 2, episodes, "goals")
        num_tasks, horizon = goals.shape[0], self.horizon
        with torch.no_grad():  # the records take the goals' dtype and device
            observations = goals.new_empty((num_tasks, episodes, horizon, 2))
            actions = goals.new_empty((num_tasks, episodes, horizon, 2))
            rewards = goals.new_empty((num_tasks, episodes, horizon))
            episode_goals = goals[:, None, :]
            positions = goals.new_zeros((num_tasks, episodes, 2))
            for time in range(horizon):
                observations[:, :, time] = positions
                # the actor gets its own copy: one that keeps or edits its input cannot alter the record
                step_actions = act(positions.clone())
                if step_actions.shape != positions.shape:
                    raise ValueError(
                        f"act must return actions of shape {tuple(positions.shape)} [T, E, 2], "
                        f"got {tuple(step_actions.shape)}"
                    )
                actions[:, :, time] = step_actions
                positions, rewards[:, :, time] = self.step(positions, actions[:, :, time], episode_goals)
        return Trajectories(observations, actions, rewards, positions)
