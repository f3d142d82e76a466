"""Task domains: one module per domain, each registered in :mod:`rkfast.tasks.registry`.

Adding a domain = one module here that builds a :class:`~rkfast.tasks.registry.Domain` and calls
:func:`register`, plus its import below.
"""

from .registry import (
    Defaults,
    Domain,
    Metric,
    Option,
    RunSettings,
    StatefulSampler,
    TaskSampler,
    TrainedRun,
    domains,
    get_domain,
    register,
    unregister,
)
from .rollouts import RolloutTasks
from .sampling import STREAMS, eval_pieces, task_chunks, task_generator

# Each domain module registers its domains when imported, and the registry keeps that order (the order in which
# `rkfast train --help` lists them): sinusoid, the few-shot image domains, then reinforcement learning.
# isort: off
from .sinusoid import SINUSOID, SinusoidTasks
from .fewshot import GLYPHS, MINIIMAGENET, OMNIGLOT, EpisodeSampler
from .navigation import NAVIGATION
from .halfcheetah import HALFCHEETAH_DIRECTION, HALFCHEETAH_VELOCITY
# isort: on

__all__ = [
    "SinusoidTasks",
    "EpisodeSampler",
    "RolloutTasks",
    "Domain",
    "Option",
    "Metric",
    "Defaults",
    "TaskSampler",
    "StatefulSampler",
    "TrainedRun",
    "RunSettings",
    "register",
    "unregister",
    "get_domain",
    "domains",
    "STREAMS",
    "task_generator",
    "task_chunks",
    "eval_pieces",
    "SINUSOID",
    "OMNIGLOT",
    "MINIIMAGENET",
    "GLYPHS",
    "NAVIGATION",
    "HALFCHEETAH_DIRECTION",
    "HALFCHEETAH_VELOCITY",
]
