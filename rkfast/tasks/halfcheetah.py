"""Half-cheetah locomotion (Finn et al. 2017): meta-reinforcement learning with Runge-Kutta meta-policy-gradients
on MuJoCo, through the same rollout tasks as the 2-D navigation domain (:mod:`rkfast.tasks.rollouts`).

The registered domains, on gymnasium's MuJoCo HalfCheetah (:class:`~rkfast.rl.halfcheetah.HalfCheetahTasks`;
the optional extra ``pip install 'rkfast[rl]'``):

- ``halfcheetah-dir``: run forward or backward (tasks ``+1``/``-1``);
- ``halfcheetah-vel``: run at a target velocity ``~ U[0, 2]``.

Both: a Gaussian MLP policy (2 x 100, ReLU, learned log-std, its mean kept inside the action bound 1), 40 tasks
per meta-batch, 20 episodes of 200 steps per task and stage, inner step 0.1 (Finn et al. 2017), Adam outside
at 1e-3; meta-test on held-out
tasks with fresh rollouts after each adaptation step. Without the extra the domains are still registered;
making their tasks raises a :class:`~rkfast.data.images.DataError` that names the extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..rl.halfcheetah import HalfCheetahTasks
from ..rl.policy import GaussianMLPPolicy
from .registry import Defaults, Domain, register
from .rollouts import RETURN, RolloutTasks, describe_rollout_test, rollout_options, rollout_test_protocol

__all__ = ["HALFCHEETAH_DIRECTION", "HALFCHEETAH_VELOCITY"]

# HalfCheetah's observation and action sizes. The model is built without a simulator (the run's model comes
# before its tasks, and must not need the extra), so they are written here; a test checks them against the
# environment's spaces.
_OBS_DIM = 17
_ACT_DIM = 6


def _policy(options: Mapping[str, Any]) -> GaussianMLPPolicy:
    # actions are clipped to HalfCheetah's [-1, 1]: the mean stays inside (GaussianMLPPolicy says why)
    return GaussianMLPPolicy(
        _OBS_DIM,
        _ACT_DIM,
        hidden=(options["hidden"], options["hidden"]),
        max_action=HalfCheetahTasks.max_action,
        bounded_mean=True,
    )


def _tasks_of(kind: str):
    def make_tasks(options: Mapping[str, Any], split: str, device: torch.device) -> RolloutTasks:
        env = HalfCheetahTasks(kind=kind, horizon=options["horizon"])
        return RolloutTasks(
            env, _policy(options), episodes=options["episodes"], discount=options["discount"], device=device
        )

    return make_tasks


_DEFAULTS = Defaults(
    iterations=20,
    meta_batch=40,
    inner_lr=0.1,
    lr=1e-3,
    eval_every=10,
    eval_tasks=20,
    test_tasks=40,
    test_steps=(1, 2, 3),
    eval_steps=(1,),
    eval_chunk=40,
    source="Finn et al. 2017: 40 tasks per meta-batch, 20 episodes of 200 steps per task, inner step 0.1; "
    "Adam outside (instead of TRPO) at 1e-3, as navigation; 20 meta-steps keep a default run to CPU "
    "minutes (the published runs trained for hundreds of TRPO iterations)",
)


def _domain(name: str, kind: str, description: str) -> Domain:
    return register(
        Domain(
            name=name,
            description=description,
            make_tasks=_tasks_of(kind),
            make_model=_policy,
            loss_fn=None,
            metrics=(RETURN,),
            defaults=_DEFAULTS,
            options=rollout_options(horizon=200),
            describe_test=describe_rollout_test,
            test_protocol=rollout_test_protocol,
            plots={},
        )
    )


HALFCHEETAH_DIRECTION = _domain(
    "halfcheetah-dir",
    "direction",
    "MuJoCo half-cheetah (Finn et al. 2017; needs rkfast[rl]): run forward or backward, reward "
    "direction * velocity - 0.05 |action|^2, horizon 200; Gaussian MLP policy, DiCE + linear baseline",
)

HALFCHEETAH_VELOCITY = _domain(
    "halfcheetah-vel",
    "velocity",
    "MuJoCo half-cheetah (Finn et al. 2017; needs rkfast[rl]): run at a target velocity ~ U[0, 2], "
    "reward -|velocity - target| - 0.05 |action|^2, horizon 200; Gaussian MLP policy, DiCE + linear baseline",
)
