"""Task domains: one module per domain, each registered in :mod:`rkfast.tasks.registry`.

Adding a domain = one module here that builds a :class:`~rkfast.tasks.registry.Domain` and calls
:func:`register`, plus its import below.
"""

from .registry import Defaults, Domain, Metric, Option, TaskSampler, domains, get_domain, register, unregister
from .sinusoid import SinusoidTasks
from .fewshot import EpisodeSampler  # noqa: E402  (registers omniglot, miniimagenet, glyphs)
from .navigation import NavigationTasks  # noqa: E402  (registers navigation)

__all__ = ["SinusoidTasks", "EpisodeSampler", "NavigationTasks", "Domain", "Option", "Metric", "Defaults", "TaskSampler", "register", "unregister",
           "get_domain", "domains"]
