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
    TaskSampler,
    TrainedRun,
    domains,
    get_domain,
    register,
    unregister,
)
from .sampling import STREAMS, eval_pieces, task_chunks, task_generator
from .sinusoid import SinusoidTasks
from .fewshot import EpisodeSampler  # noqa: E402  (registers omniglot, miniimagenet, glyphs)
from .rollouts import RolloutTasks
from .navigation import NAVIGATION  # noqa: E402  (registers navigation)
from .halfcheetah import HALFCHEETAH_DIRECTION, HALFCHEETAH_VELOCITY  # noqa: E402  (registers halfcheetah-dir, -vel)

__all__ = [
    "SinusoidTasks",
    "EpisodeSampler",
    "RolloutTasks",
    "Domain",
    "Option",
    "Metric",
    "Defaults",
    "TaskSampler",
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
]
