"""Half-cheetah locomotion tasks of Finn et al. 2017 (section 5.3) on gymnasium's MuJoCo HalfCheetah.

Two task families share one simulator; only the reward depends on the task:

- ``"direction"``: run forward (task ``+1``) or backward (task ``-1``), reward ``direction * v - ctrl_cost``;
- ``"velocity"``: run at a target velocity ``~ U[velocity_low, velocity_high]``, reward
  ``-|v - target| - ctrl_cost``;

with ``v`` the forward (x) velocity of the torso over the step (gymnasium's ``info["x_velocity"]``: the change
of the torso's x position divided by the step's duration) and ``ctrl_cost = 0.05 * ||clipped action||^2``.
The 0.05 is Finn et al.'s ``0.5 * 0.1`` (their simulator's half-cheetah tasks); gymnasium's own reward
weighs the control by 0.1, and is ignored here, as is its forward reward.

Every episode lasts exactly ``horizon`` steps (HalfCheetah never terminates, and no time limit applies), so
rollouts are dense ``[T, E, H, ...]`` tensors like those of :class:`~rkfast.rl.navigation.PointNavigation`.
The simulator is not Finn et al.'s (another MuJoCo release and model file, 0.05 s per step): returns are
comparable with the published ones in kind, not in value.

gymnasium and mujoco are an optional extra (``pip install 'rkfast[rl]'``); they are imported only when a
:class:`HalfCheetahTasks` is made, and their absence is a :class:`~rkfast.data.images.DataError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..data.images import DataError
from .env import check_rollout_args, finite_field, unit_task_draws
from .navigation import Trajectories

__all__ = ["HalfCheetahTasks", "CONTROL_COST", "ENV_IDS", "episode_seeds"]

# Finn et al. 2017's half-cheetah tasks charge 0.5 * 0.1 * ||action||^2 per step.
CONTROL_COST = 0.05
# The gymnasium environments tried in order: v5 where the installed gymnasium has it, else v4.
ENV_IDS = ("HalfCheetah-v5", "HalfCheetah-v4")
_KINDS = ("direction", "velocity")
_EXTRA_HINT = "needs the optional MuJoCo extra: pip install 'rkfast[rl]' (gymnasium and mujoco)"

# Simulators are slow to build (each parses the model file), so they live here, per environment id, and
# are reused by every HalfCheetahTasks (a frozen dataclass cannot hold them) and every rollout: a rollout of
# T tasks and E episodes uses the first T * E of the list, which grows when a rollout needs more. Each
# rollout resets the ones it uses, so what earlier rollouts did to them does not matter.
_SIMULATORS: dict[str, list[Any]] = {}


def _import_gymnasium() -> Any:
    """The gymnasium module, after checking that mujoco imports too; a DataError naming the extra if not."""
    try:
        import gymnasium
        import mujoco  # noqa: F401  (gymnasium's MuJoCo environments need it; a clear error before any work)
    except ImportError as err:
        raise DataError(f"HalfCheetahTasks {_EXTRA_HINT}; {type(err).__name__}: {err}") from err
    return gymnasium


def _env_id(gymnasium: Any) -> str:
    """The first of :data:`ENV_IDS` that the installed gymnasium registers."""
    for env_id in ENV_IDS:
        if env_id in gymnasium.envs.registry:
            return env_id
    raise DataError(
        f"HalfCheetahTasks {_EXTRA_HINT}; this gymnasium ({getattr(gymnasium, '__version__', '?')}) "
        f"registers none of {', '.join(ENV_IDS)}"
    )


def _simulators(gymnasium: Any, env_id: str, count: int) -> list[Any]:
    """``count`` cached simulators of ``env_id`` (made when missing).

    They are gymnasium's bare environments (``.unwrapped``): without the time limit an episode may last any
    horizon, and without the order and checker wrappers a step does only the simulation.
    """
    simulators = _SIMULATORS.setdefault(env_id, [])
    while len(simulators) < count:
        try:
            env = gymnasium.make(env_id, disable_env_checker=True)
        except Exception as err:  # a missing dependency of the MuJoCo environments, a broken mujoco install
            raise DataError(
                f"HalfCheetahTasks {_EXTRA_HINT}; making {env_id} failed: {type(err).__name__}: {err}"
            ) from err
        simulators.append(env.unwrapped)
    return simulators[:count]


def episode_seeds(seed: int | None, count: int) -> list[int | None]:
    """The reset seeds of a rollout's ``count = T * E`` simulators, episode ``e`` of task ``t`` at ``t * E + e``.

    Drawn from a :class:`numpy.random.SeedSequence` of ``seed``: the same seed gives the same initial states,
    and a seed's first ``k`` episode seeds do not depend on ``count``. ``seed=None`` resets each simulator
    from its own random state (initial states that no seed replays).

    Args:
        seed: the rollout's seed (an integer >= 0), or ``None``.
        count: the number of simulators.

    Returns:
        ``count`` seeds (integers below ``2**32``), or ``count`` times ``None``.

    Raises:
        ValueError: a ``seed`` that is neither ``None`` nor an integer >= 0.
    """
    if seed is None:
        return [None] * count
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(count, dtype=np.uint32)]


@dataclass(frozen=True)
class HalfCheetahTasks:
    """Half-cheetah direction or target-velocity tasks (a :class:`~rkfast.rl.env.TaskEnvironment`).

    Making one imports gymnasium and mujoco and makes (or reuses) one simulator, so a missing extra fails
    here, before any work.

    Attributes:
        kind: ``"direction"`` (tasks ``+1``/``-1``: run forward or backward) or ``"velocity"`` (tasks: target
            forward velocities).
        horizon: ``H``, the number of steps of every episode (Finn et al.: 200).
        velocity_low, velocity_high: target velocities are drawn uniformly from ``[velocity_low,
            velocity_high]`` (Finn et al.: ``[0, 2]``).
        max_action: every action dimension is clipped to ``[-max_action, max_action]`` (1).
        env_id: the gymnasium environment used (``"HalfCheetah-v5"``, or ``"HalfCheetah-v4"`` with a gymnasium
            that lacks v5); set when the instance is made.

    Raises:
        ValueError: a ``kind`` other than the two, a ``horizon`` that is not a positive integer, or velocity
            bounds that are not finite with ``velocity_low < velocity_high``.
        DataError: gymnasium or mujoco cannot be imported, or the environment cannot be made.
    """

    max_action: ClassVar[float] = 1.0  # HalfCheetah's action space is [-1, 1]^6 (a test checks it)
    kind: str = "direction"
    horizon: int = 200
    velocity_low: float = 0.0
    velocity_high: float = 2.0
    env_id: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"HalfCheetahTasks.kind must be one of {', '.join(map(repr, _KINDS))}, got {self.kind!r}")
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"HalfCheetahTasks.horizon must be a positive integer, got {self.horizon!r}")
        low = finite_field("HalfCheetahTasks", "velocity_low", self.velocity_low)
        high = finite_field("HalfCheetahTasks", "velocity_high", self.velocity_high)
        if not low < high:
            raise ValueError(
                f"HalfCheetahTasks.velocity_low must be below velocity_high, got "
                f"velocity_low={self.velocity_low!r} and velocity_high={self.velocity_high!r}"
            )
        gymnasium = _import_gymnasium()
        object.__setattr__(self, "env_id", _env_id(gymnasium))  # frozen: set once, here
        _simulators(gymnasium, self.env_id, 1)

    def _simulator(self) -> Any:
        return _simulators(_import_gymnasium(), self.env_id, 1)[0]

    @property
    def obs_dim(self) -> int:
        """The size of an observation (17: the torso's height and angle, the joint angles, the velocities)."""
        return int(self._simulator().observation_space.shape[0])

    @property
    def act_dim(self) -> int:
        """The size of an action (6: the torques of the six joints, each in ``[-1, 1]``)."""
        return int(self._simulator().action_space.shape[0])

    def sample_tasks(
        self,
        num_tasks: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw the tasks' parameters: directions ``+1``/``-1`` with probability 1/2 each, or target velocities
        uniform in ``[velocity_low, velocity_high]``.

        Drawn in float64 on the generator's device (the CPU without a generator), then converted and moved:
        the same generator state gives the same tasks on every device.

        Args:
            num_tasks: ``T``, the number of tasks.
            generator: the random number generator; ``None`` uses torch's global one.
            device: where the tasks go.
            dtype: a floating point dtype for the tasks.

        Returns:
            ``[T, 1]`` directions or target velocities.

        Raises:
            ValueError: a ``num_tasks`` that is not a positive integer, or a ``dtype`` that is not floating point.
        """
        unit = unit_task_draws(num_tasks, 1, generator, dtype)
        if self.kind == "direction":
            tasks = torch.where(unit < 0.5, -1.0, 1.0)
        else:
            tasks = self.velocity_low + (self.velocity_high - self.velocity_low) * unit
        return tasks.to(device=device, dtype=dtype)

    def rollout(
        self, act: Callable[[Tensor], Tensor], tasks: Tensor, episodes: int, seed: int | None = None
    ) -> Trajectories:
        """Run ``episodes`` episodes of each task in lockstep, ``T * E`` simulators stepped one after another.

        Runs under ``torch.no_grad()``. The simulators get the actions clipped to the action space; the
        recorded actions are the policy's, unclipped (its log-probabilities are computed on them), and the
        control cost is charged on the clipped ones.

        Args:
            act: ``act(observations [T, E, 17]) -> actions [T, E, 6]``, called once per time step with
                observations of the tasks' dtype and device (e.g. :func:`rkfast.rl.policy.batched_actor`).
            tasks: ``[T, 1]`` directions or target velocities (:meth:`sample_tasks`); the rollout's dtype and
                device are those of ``tasks``.
            episodes: ``E``, the number of episodes per task.
            seed: the initial states' seed (:func:`episode_seeds`): the same seed and actions give the same
                rollout; ``None`` draws unseeded initial states.

        Returns:
            The :class:`~rkfast.rl.navigation.Trajectories`: observations ``[T, E, H, 17]`` (before each
            action), actions ``[T, E, H, 6]``, rewards ``[T, E, H]``, and as ``final_positions`` the torso's
            x position after the last step, ``[T, E, 1]``.

        Raises:
            ValueError: ``tasks`` that are not a floating point ``[T, 1]`` tensor, an ``episodes`` that is not a
                positive integer, a bad ``seed``, or actions of another shape than ``[T, E, 6]``.
            DataError: gymnasium or mujoco cannot be imported, or an environment cannot be made.
        """
        check_rollout_args(tasks, 1, episodes)
        num_tasks, horizon = tasks.shape[0], self.horizon
        count = num_tasks * episodes
        seeds = episode_seeds(seed, count)
        simulators = _simulators(_import_gymnasium(), self.env_id, count)
        space = simulators[0].action_space
        obs_dim, act_dim = int(simulators[0].observation_space.shape[0]), int(space.shape[0])
        low, high = space.low.astype(np.float64), space.high.astype(np.float64)
        # the task of each simulator, in the simulators' order (task-major)
        targets = np.repeat(tasks[:, 0].detach().to("cpu", torch.float64).numpy(), episodes)
        with torch.no_grad():  # the records take the tasks' dtype and device
            observations = tasks.new_empty((num_tasks, episodes, horizon, obs_dim))
            actions = tasks.new_empty((num_tasks, episodes, horizon, act_dim))
            rewards = np.empty((count, horizon))
            current = np.stack([sim.reset(seed=s)[0] for sim, s in zip(simulators, seeds, strict=True)])
            positions = np.empty(count)
            velocities = np.empty(count)
            for time in range(horizon):
                observations[:, :, time] = torch.from_numpy(current).view(num_tasks, episodes, obs_dim).to(tasks)
                # the actor gets its own copy: one that keeps or edits its input cannot alter the record
                step_actions = act(observations[:, :, time].clone())
                if step_actions.shape != (num_tasks, episodes, act_dim):
                    raise ValueError(
                        f"act must return actions of shape {(num_tasks, episodes, act_dim)} "
                        f"[T, E, {act_dim}], got {tuple(step_actions.shape)}"
                    )
                actions[:, :, time] = step_actions
                clipped = np.clip(
                    step_actions.detach().to("cpu", torch.float64).numpy().reshape(count, act_dim), low, high
                )
                for i, sim in enumerate(simulators):
                    current[i], _, _, _, info = sim.step(clipped[i])
                    velocities[i], positions[i] = info["x_velocity"], info["x_position"]
                control = CONTROL_COST * np.square(clipped).sum(axis=1)
                if self.kind == "direction":
                    rewards[:, time] = targets * velocities - control
                else:
                    rewards[:, time] = -np.abs(velocities - targets) - control
            reward_tensor = torch.from_numpy(rewards).view(num_tasks, episodes, horizon).to(tasks)
            final_positions = torch.from_numpy(positions).view(num_tasks, episodes, 1).to(tasks)
        return Trajectories(observations, actions, reward_tensor, final_positions)
