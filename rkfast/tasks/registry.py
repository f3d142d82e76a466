"""The task-domain registry: what the training loop and the command line need to know about a domain.

A domain (sinusoid regression, few-shot classification, ...) is one module in :mod:`rkfast.tasks` that
builds a :class:`Domain` and registers it. :mod:`rkfast.train` trains any registered domain and
``rkfast train|compare DOMAIN`` offers each one with its own options and published defaults. A domain's plots
read the trained run through :class:`TrainedRun` (what a :class:`~rkfast.train.RunResult` offers them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..batch import TaskBatch, TaskSet
from ..optim import MetaOptimizer
from ..results import AdaptationOutput
from ..tableau import Tableau

__all__ = [
    "Domain",
    "Option",
    "Metric",
    "Defaults",
    "TaskSampler",
    "StatefulSampler",
    "RunSettings",
    "TrainedRun",
    "PlotFn",
    "meta_test_tasks",
    "kept_params",
    "register",
    "unregister",
    "get_domain",
    "domains",
]


class TaskSampler(Protocol):
    """Draws meta-batches of one split of a domain."""

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch | TaskSet:
        """``num_tasks`` tasks drawn with ``generator`` (the same generator state gives the same tasks)."""
        ...


@runtime_checkable
class StatefulSampler(Protocol):
    """A task sampler with a random state of its own besides the generator it is given: a run's checkpoint saves
    it (``state_dict``) and resuming restores it (``load_state_dict``)."""

    def state_dict(self) -> Any:
        """The sampler's state, as a checkpoint can hold it."""
        ...

    def load_state_dict(self, state: Any) -> None:
        """Restore a state that :meth:`state_dict` returned."""
        ...


@dataclass(frozen=True)
class Option:
    """A domain's own setting, offered on the command line as ``--name-with-dashes``.

    Attributes:
        name: the Python name (``"test_query_shots"``); the flag is ``--test-query-shots``.
        default: the default value; its type (int, float, str) is the option's type.
        help: one line for ``--help``.
        positive: numbers must be > 0.
        choices: the allowed values (``("conv4", "resnet12")``); empty: any value of the type.
    """

    name: str
    default: Any
    help: str
    positive: bool = True
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.choices and self.default not in self.choices:
            raise ValueError(f"option {self.name}: default {self.default!r} is not among its choices {self.choices}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """``value`` converted to the option's type; raises ``ValueError`` naming the option."""
        kind = type(self.default)
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"option {self.name} must be {kind.__name__}, got {value!r}") from None
        if isinstance(value, (int, float)) and self.positive and not (math.isfinite(value) and value > 0):
            raise ValueError(f"option {self.name} must be > 0, got {value!r}")
        if self.choices and value not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            raise ValueError(f"option {self.name} must be one of {allowed}, got {value!r}")
        return value


@dataclass(frozen=True)
class Metric:
    """A number the tables, results and plots report per adaptation step.

    Attributes:
        name: its key in the results (``"mse"``, ``"accuracy"``).
        source: where it comes from in an :class:`~rkfast.results.AdaptationOutput`: ``"loss"`` or the name
            of a metric the task loss reports (``"accuracy"``).
        label: how tables and plots name it (``"query MSE"``).
        short: a short column title (``"MSE"``).
        higher_is_better: accuracy yes, a loss no.
    """

    name: str
    source: str
    label: str
    short: str
    higher_is_better: bool = False


@dataclass(frozen=True)
class Defaults:
    """A domain's published hyper-parameters: the defaults of ``rkfast train DOMAIN``."""

    iterations: int
    meta_batch: int
    inner_lr: float
    lr: float
    tableau: str = "maml"  # several inner steps are maml(k)
    eval_every: int = 1000
    eval_tasks: int = 100
    test_tasks: int = 600
    test_steps: tuple[int, ...] = (1, 5, 10)
    eval_steps: tuple[int, ...] = (1, 10)
    eval_chunk: int = 100  # tasks per evaluation batch
    source: str = ""  # where the numbers come from


class RunSettings(Protocol):
    """The settings of a trained run that a domain's plots read (a :class:`~rkfast.train.TrainConfig`)."""

    @property
    def options(self) -> Mapping[str, Any]:
        """The domain's options, resolved."""
        ...

    @property
    def test_step(self) -> float | None:
        """The meta-test adaptation step (``None``: the optimizer's default)."""
        ...

    @property
    def test_tasks(self) -> int | None:
        """The number of meta-test tasks."""
        ...

    @property
    def test_seed(self) -> int:
        """The seed of the held-out and meta-test tasks."""
        ...


class TrainedRun(Protocol):
    """A trained run as a domain's plots see it (a :class:`~rkfast.train.RunResult` is one).

    The plots live with their domain, below the training loop: they read the run through this view instead of
    importing the loop's result type."""

    @property
    def config(self) -> RunSettings:
        """The run's resolved settings."""
        ...

    @property
    def domain(self) -> Domain:
        """The run's domain."""
        ...

    @property
    def tableau(self) -> Tableau:
        """The tableau the run trained with."""
        ...

    @property
    def opt(self) -> MetaOptimizer:
        """The trained optimizer, with its model."""
        ...

    @property
    def test(self) -> AdaptationOutput | None:
        """The meta-test result (``None`` before the run completed)."""
        ...

    @property
    def defaults(self) -> Defaults:
        """The domain's published defaults for the run's options."""
        ...

    def task_generator(self, split: str) -> torch.Generator:
        """A fresh generator of the run's ``split`` stream: sampling from it again gives the run's tasks."""
        ...


PlotFn = Callable[[TrainedRun, Path], None]  # plot(run, path): a domain's plot of a trained run


def meta_test_tasks(run: TrainedRun) -> int:
    """The number of meta-test tasks of ``run``: its ``test_tasks``, which a resolved configuration always sets
    (unset, the domain's default for the run's options, as resolving would set it)."""
    count = run.config.test_tasks
    return run.defaults.test_tasks if count is None else count


def kept_params(adapted: AdaptationOutput) -> Tensor:
    """The adapted flat parameters ``[len(steps), T, N]`` of an evaluation with ``keep_params=True``
    (``ValueError`` for one that did not keep them)."""
    if adapted.params is None:
        raise ValueError("this adaptation kept no parameters: evaluate with keep_params=True")
    return adapted.params


@dataclass(frozen=True)
class Domain:
    """One task domain: its tasks, model, loss, metrics, defaults, options and plots.

    Attributes:
        name: the command-line name (``rkfast train NAME``).
        description: one line for ``--help``.
        make_tasks: ``(options, split, device) -> TaskSampler`` with ``split`` one of ``"train"``, ``"val"``,
            ``"test"``.
        make_model: ``options -> nn.Module`` (called under the run's seed).
        loss_fn: ``loss_fn(output, target)`` of one task; ``None`` when the samplers give
            :class:`~rkfast.batch.TaskSet` s with their own losses.
        metrics: what is reported, the first one in progress lines and comparisons.
        defaults: the published hyper-parameters.
        options: the domain's own settings (``--shots``...).
        describe_test: ``options -> str``, the meta-test protocol in words (``"10-shot support, ..."``).
        test_protocol: ``options -> dict``, the same for the results JSON.
        plots: ``{file name: plot(run, path)}``, made after training besides the training curve.
        defaults_by_options: ``options -> {field: value}``, the published defaults that depend on the
            options (Omniglot 20-way trains with 5 inner steps of 0.1, 5-way with one of 0.4).
        check_options: ``options -> None``, raises ``ValueError`` for resolved options that cannot work
            together (a backbone that needs larger images); ``None``: every combination can.
    """

    name: str
    description: str
    make_tasks: Callable[[Mapping[str, Any], str, torch.device], TaskSampler]
    make_model: Callable[[Mapping[str, Any]], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None
    metrics: tuple[Metric, ...]
    defaults: Defaults
    options: tuple[Option, ...] = ()
    describe_test: Callable[[Mapping[str, Any]], str] = lambda options: ""
    test_protocol: Callable[[Mapping[str, Any]], dict[str, Any]] = lambda options: {}
    plots: Mapping[str, PlotFn] = field(default_factory=dict)
    defaults_by_options: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    check_options: Callable[[Mapping[str, Any]], None] | None = None

    def defaults_for(self, options: Mapping[str, Any]) -> Defaults:
        """The published defaults for these (resolved) options."""
        if self.defaults_by_options is None:
            return self.defaults
        return replace(self.defaults, **self.defaults_by_options(options))

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ValueError(f"domain {self.name!r} declares no metrics")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"domain {self.name!r} declares an option twice: {names}")

    @property
    def metric(self) -> Metric:
        """The primary metric (progress lines, comparisons)."""
        return self.metrics[0]

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every option's value: ``given`` checked and converted, the others at their defaults (and the whole
        checked by ``check_options``)."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(
                f"domain {self.name!r} has no option {', '.join(unknown)}; its options: {', '.join(known) or 'none'}"
            )
        options = {name: o.check(given[name]) if name in given else o.default for name, o in known.items()}
        if self.check_options is not None:
            self.check_options(options)
        return options


_DOMAINS: dict[str, Domain] = {}


def register(domain: Domain, *, replace: bool = False) -> Domain:
    """Make ``domain`` known to the training loop and the command line; returns it."""
    if not isinstance(domain, Domain):
        raise TypeError(f"register takes a Domain, got {type(domain).__name__}")
    if domain.name in _DOMAINS and not replace:
        raise ValueError(f"a domain named {domain.name!r} is already registered (replace=True to replace it)")
    _DOMAINS[domain.name] = domain
    return domain


def unregister(name: str) -> None:
    """Forget the domain ``name`` (no error if it is not registered)."""
    _DOMAINS.pop(name, None)


def get_domain(name: str | Domain) -> Domain:
    """The registered domain ``name`` (a :class:`Domain` is returned as is)."""
    if isinstance(name, Domain):
        return name
    try:
        return _DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown task domain {name!r}; registered: {', '.join(_DOMAINS) or 'none'}") from None


def domains() -> dict[str, Domain]:
    """Every registered domain, in registration order."""
    return dict(_DOMAINS)
