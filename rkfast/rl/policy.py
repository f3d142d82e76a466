"""The Gaussian MLP policy of Finn et al. 2017's reinforcement learning experiments, its log-density, and
action sampling for ``T`` tasks at once, each with its own flat parameter row."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from numbers import Real

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..layout import ParamLayout

__all__ = ["GaussianMLPPolicy", "gaussian_log_prob", "sample_actions", "batched_actor"]

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianMLPPolicy(nn.Module):
    """A diagonal Gaussian policy: an MLP with ReLU hidden layers gives the mean, and a learned
    state-independent ``log_std [act_dim]`` the log standard deviation of every action dimension.

    ``max_action`` is the bound at which the environment clips every action dimension, and the policy's
    unit: the initial standard deviation is ``init_std * max_action`` (as when a policy acts in the
    normalized action space ``[-1, 1]`` of rllab's ``normalize`` wrapper, which Finn et al. 2017's code put
    around the point environment), and with ``bounded_mean`` the mean is ``max_action * tanh(mlp(obs))``.

    Why the bound: the environment clips, so a mean beyond ``max_action`` changes nothing the reward sees,
    and nothing pulls it back. With an unbounded mean and Adam outside, meta-training drifts there (the mean
    action of a navigation policy reached 40x the clip), every sampled action ends up clipped to the same
    corner, the rollouts no longer depend on the noise, and the policy gradient is left with nothing but
    noise: runs collapsed to moving away from every goal after a few hundred meta-steps
    (``docs/method.md``, "Reinforcement learning"). A mean inside the clip keeps a share of the actions
    unclipped, so the gradient always has signal; the policy gets precise by shrinking its standard
    deviation instead.

    Args:
        obs_dim: the size of an observation.
        act_dim: the size of an action.
        hidden: the widths of the hidden layers (empty: a linear mean).
        init_std: the initial standard deviation of every action dimension, in units of ``max_action``.
        max_action: the environment's clip bound of every action dimension (the policy's unit).
        bounded_mean: keep the mean inside ``[-max_action, max_action]`` with a scaled tanh (``False``: the
            plain linear output layer, scaled by ``max_action``).

    Raises:
        ValueError: an ``obs_dim``, ``act_dim`` or hidden width that is not a positive integer, or an
            ``init_std`` or ``max_action`` that is not a positive finite number.
    """

    def __init__(
        self,
        obs_dim: int = 2,
        act_dim: int = 2,
        hidden: Sequence[int] = (100, 100),
        init_std: float = 1.0,
        max_action: float = 1.0,
        bounded_mean: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("obs_dim", obs_dim), ("act_dim", act_dim)):
            if not _is_positive_int(value):
                raise ValueError(f"GaussianMLPPolicy {name} must be a positive integer, got {value!r}")
        if (
            isinstance(hidden, (str, bytes))
            or not isinstance(hidden, Sequence)
            or not all(_is_positive_int(width) for width in hidden)
        ):
            raise ValueError(f"GaussianMLPPolicy hidden must be a sequence of positive integers, got {hidden!r}")
        for name, number in (("init_std", init_std), ("max_action", max_action)):
            if (
                isinstance(number, bool)
                or not isinstance(number, Real)
                or not math.isfinite(float(number))
                or number <= 0
            ):
                raise ValueError(f"GaussianMLPPolicy {name} must be a positive finite number, got {number!r}")
        if not isinstance(bounded_mean, bool):
            raise ValueError(f"GaussianMLPPolicy bounded_mean must be True or False, got {bounded_mean!r}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.max_action, self.bounded_mean = float(max_action), bounded_mean
        sizes = [obs_dim, *hidden]
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.mean = nn.Sequential(*layers, nn.Linear(sizes[-1], act_dim))
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std * max_action)))

    def forward(self, observations: Tensor) -> tuple[Tensor, Tensor]:
        """The action distribution at every observation.

        Args:
            observations: ``[..., obs_dim]``.

        Returns:
            ``(mean [..., act_dim], log_std [..., act_dim])``; ``log_std`` is the parameter expanded to the
            mean's shape, so a per-task functional call gives both from that task's parameters.
        """
        raw = self.mean(observations)
        mean = (torch.tanh(raw) if self.bounded_mean else raw) * self.max_action
        return mean, self.log_std.expand_as(mean)


def _is_positive_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """The log-density of ``actions`` under diagonal Gaussians; differentiable to any order in ``mean`` and
    ``log_std`` (every operation is smooth).

    Args:
        mean: ``[..., act_dim]``, the means.
        log_std: ``[..., act_dim]`` (or broadcastable), the log standard deviations.
        actions: ``[..., act_dim]``, the actions as sampled (not clipped by an environment).

    Returns:
        ``[...]``, the log-density summed over the action dimension.
    """
    standardized = (actions - mean) * torch.exp(-log_std)
    per_dim = -0.5 * standardized.square() - log_std - 0.5 * _LOG_2PI
    return per_dim.sum(dim=-1)


def sample_actions(mean: Tensor, log_std: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``mean + exp(log_std) * noise`` with standard normal ``noise`` of the mean's shape.

    With a generator the noise is drawn on the generator's device, in the mean's dtype, then moved to the
    mean's device: a CPU generator gives the same actions whether the policy runs on the CPU or a GPU.
    Without one, torch's global generator of the mean's device draws it.

    Args:
        mean: ``[..., act_dim]``, the means.
        log_std: ``[..., act_dim]`` (or broadcastable), the log standard deviations.
        generator: the random number generator, or ``None``.

    Returns:
        The actions, of the mean's shape (differentiable in ``mean`` and ``log_std`` when they require grad).
    """
    draw_device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=draw_device)
    return mean + torch.exp(log_std) * noise.to(mean.device)


def batched_actor(
    policy: nn.Module,
    layout: ParamLayout,
    params: Tensor,
    generator: torch.Generator | None = None,
    deterministic: bool = False,
) -> Callable[[Tensor], Tensor]:
    """An actor for :meth:`~rkfast.rl.navigation.PointNavigation.rollout` that runs task ``t``'s policy with
    the flat parameters ``params[t]``.

    The means and log standard deviations of all tasks come from one ``vmap`` of a functional call over the
    parameter rows; the noise is drawn outside ``vmap`` by :func:`sample_actions`, as one ``[T, E, act_dim]``
    tensor per call. The parameters are detached and actions are sampled under ``torch.no_grad()``.

    Args:
        policy: the module whose forward gives ``(mean, log_std)``, e.g. :class:`GaussianMLPPolicy`.
        layout: where each of the policy's parameters lives in a row (``ParamLayout.from_module(policy)``).
        params: ``[T, N]``, one flat parameter row per task.
        generator: the random number generator of the noise, or ``None`` for torch's global one.
        deterministic: act with the mean action, without noise (to show what a policy has learned).

    Returns:
        ``act(observations [T, E, obs_dim]) -> actions [T, E, act_dim]``.

    Raises:
        ValueError: ``params`` that are not ``[T, layout.numel]``; ``act`` raises it for observations whose
            task dimension is not ``T``.
    """
    if params.dim() != 2 or params.shape[1] != layout.numel:
        raise ValueError(f"params must be [T, {layout.numel}] (one flat row per task), got shape {tuple(params.shape)}")
    rows = params.detach()

    def task_distribution(row: Tensor, observations: Tensor) -> tuple[Tensor, Tensor]:
        return functional_call(policy, layout.unflatten(row), (observations,))

    distributions = vmap(task_distribution)

    def act(observations: Tensor) -> Tensor:
        if observations.dim() < 1 or observations.shape[0] != rows.shape[0]:
            raise ValueError(
                f"observations must have the task dimension first, of size {rows.shape[0]}, got "
                f"shape {tuple(observations.shape)}"
            )
        with torch.no_grad():
            mean, log_std = distributions(rows, observations)
            return mean if deterministic else sample_actions(mean, log_std, generator)

    return act
