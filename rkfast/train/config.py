"""A run's configuration (:class:`TrainConfig`): every setting, the domain's published defaults for the unset
ones, and the checks that name a bad setting before anything is trained; and the optimizer a configuration
builds (:func:`build_optimizer`)."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from ..functional import check_step
from ..learned import Granularity
from ..memory import Memory
from ..optim import MetaOptimizer
from ..outer import check_lr
from ..tableau import Tableau, get_tableau
from ..tasks import Domain, get_domain
from .optimizer import CoefficientSettings, meta_optimizer

__all__ = ["TrainConfig", "ResolvedSettings", "check_device", "build_optimizer", "default_select_steps"]


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that can hold tensors here; ``ValueError`` naming it otherwise."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"device {str(device)!r} is not available here: {reason}") from None
    return dev


def _check_count(name: str, value: Any, least: int) -> int:
    """``value`` as an int, if it is an integer >= ``least`` (``ValueError`` naming ``name`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ResolvedSettings:
    """The settings that :meth:`TrainConfig.resolved` fills in from the domain's defaults, as a resolved
    configuration holds them: never ``None``, and the tableau as a :class:`~rkfast.tableau.Tableau` (code that
    runs on a resolved configuration reads them through :meth:`TrainConfig.settings`)."""

    tableau: Tableau
    iterations: int
    meta_batch: int
    inner_lr: float
    lr: float
    eval_every: int
    eval_tasks: int
    test_tasks: int


_DEFAULTED = tuple(f.name for f in fields(ResolvedSettings))  # the fields that None leaves to the domain


def default_select_steps(tableau: Tableau, learned_rates: bool, eval_steps: tuple[int, ...]) -> int:
    """The held-out step count that picks ``best.pt`` when ``select_steps`` is unset: the step count the run
    trains (:attr:`~rkfast.tableau.Tableau.adaptation_steps`: 1 for ``maml`` and the RK tableaus, ``k`` for
    ``maml(k)``) for learned rates or several inner steps, when it is one of the domain's held-out step
    counts ``eval_steps``; otherwise the last of them, the domain's own choice. Learned rates are trained for
    the steps the run takes, and repeating them further may diverge (``docs/training.md``)."""
    trained = tableau.adaptation_steps
    if (learned_rates or trained > 1) and trained in eval_steps:
        return trained
    return int(eval_steps[-1])


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` fields take the domain's published defaults
    (:class:`~rkfast.tasks.registry.Defaults`); ``options`` are the domain's own settings.

    Attributes:
        domain: a registered task domain (``"sinusoid"``...).
        tableau: a tableau or its name (default: the domain's, ``"maml"`` for most).
        iterations, meta_batch, inner_lr, lr: meta-steps, tasks per meta-step, the RK step h (finite,
            > 0), Adam's rate (finite, >= 0 as for :class:`~rkfast.optim.MetaOptimizer`; 0 keeps the
            initialization).
        first_order: ignore second derivatives.
        seed: the initialization and the training tasks (an integer >= 0).
        eval_every, eval_tasks: meta-steps between held-out evaluations (0: at start and end only) and
            their task count (0: none).
        test_tasks, test_seed: the meta-test tasks and their seed (also the held-out tasks' seed).
        test_step: the meta-test adaptation step, finite and > 0 (default: the tableau's own step,
            :meth:`~rkfast.tableau.Tableau.test_step`).
        device, backend: where the run computes and which kernels it uses.
        options: the domain's options (``{"shots": 5}``); unset ones take their defaults.
        learn_rates, per_stage_rates, rate_lr, frozen_rates: learned (or fixed per-tensor) inner rates, as
            :class:`~rkfast.optim.MetaOptimizer` takes them (``docs/method.md``, "Learned inner rates"):
            ``"scalar"``, ``"tensor"`` (MAML++'s per-layer rates; per step with ``per_stage_rates`` and
            ``maml(k)``) or ``"element"`` (Meta-SGD); ``rate_lr`` their Adam rate (default: ``lr``);
            ``frozen_rates`` ``{name or glob: rate}`` (``{"features.*": 0.0}``: ANIL).
        learn_tableau, tableau_weights, tableau_lr: a learned tableau, as :class:`~rkfast.optim.MetaOptimizer`
            takes it (``docs/method.md``, "Learned tableaus"): ``learn_tableau`` ``"pattern"`` (the non-zero
            entries of ``tableau``'s ``A``, from their values) or ``"full"`` (every entry below the diagonal);
            ``tableau_weights`` ``"fixed"`` (``b`` stays the tableau's) or ``"order"`` (``b`` follows ``A`` by
            the order conditions; needs ``learn_tableau``); ``tableau_lr`` the entries' Adam rate (default:
            ``lr``; needs ``learn_tableau``). The tableau must have entries to learn (``euler`` has none on its
            pattern). Held-out evaluations and the meta-test adapt with the learned tableau's step
            (``test_step`` unset); ``results.json`` reports it under ``"learned_tableau"``
            (:func:`learned_tableau_info`) and its values at every held-out evaluation under
            ``training.tableau``.
        task_chunk, recompute, amp: the memory levers of every meta-step, as :class:`~rkfast.memory.Memory`
            takes them (``docs/memory.md``): tasks per chunk, stage recomputation (second order), autocast
            dtype ``"bf16"`` or ``"fp16"``.
    """

    domain: str = "sinusoid"
    tableau: str | Tableau | None = None
    iterations: int | None = None
    meta_batch: int | None = None
    inner_lr: float | None = None
    lr: float | None = None
    first_order: bool = False
    seed: int = 0
    eval_every: int | None = None
    eval_tasks: int | None = None
    test_tasks: int | None = None
    test_seed: int = 0
    test_step: float | None = None
    device: str = "cpu"
    backend: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    learn_rates: Granularity | None = None
    per_stage_rates: bool = False
    rate_lr: float | None = None
    frozen_rates: dict[str, float] | None = None
    learn_tableau: str | None = None
    tableau_weights: str = "fixed"
    tableau_lr: float | None = None
    select_steps: int | None = None
    task_chunk: int | None = None
    recompute: bool = False
    amp: str | None = None

    def resolved(self) -> TrainConfig:
        """A copy with the domain's defaults filled in and everything checked (errors name the setting)."""
        domain = get_domain(self.domain)
        options = domain.resolve_options(self.options)
        defaults = domain.defaults_for(options)
        filled = {name: getattr(defaults, name) for name in _DEFAULTED if getattr(self, name) is None}
        cfg = replace(self, **filled, options=options)
        tableau = cfg.settings().tableau  # a bad name fails here, naming it
        for name, least in (
            ("seed", 0),
            ("test_seed", 0),
            ("iterations", 1),
            ("meta_batch", 1),
            ("test_tasks", 1),
            ("eval_every", 0),
            ("eval_tasks", 0),
        ):
            _check_count(name, getattr(cfg, name), least)
        for name in ("inner_lr", "test_step"):  # as MetaOptimizer's inner_lr and evaluate's step_size
            value = getattr(cfg, name)
            if value is not None:
                try:
                    check_step(name, value)
                except TypeError as err:  # a string or a bool: still a bad setting (ValueError, as documented)
                    raise ValueError(str(err)) from None
        check_lr(cfg.lr)  # as MetaOptimizer's (and torch's) lr: finite and >= 0
        check_device(cfg.device)
        cfg.memory.check_compatible(first_order=cfg.first_order)  # a bad memory setting fails here, named
        # the coefficient patterns are matched against the names of the domain's model
        coefficients = cfg.coefficients.checked(tableau, lambda: domain.make_model(cfg.options))
        return replace(cfg, **asdict(coefficients), select_steps=_select_steps(cfg, tableau, defaults.eval_steps))

    def settings(self) -> ResolvedSettings:
        """The settings :meth:`resolved` fills in (:class:`ResolvedSettings`), for code that runs on a resolved
        configuration. ``ValueError`` naming the unset ones on a configuration that was not resolved."""
        values = {name: getattr(self, name) for name in _DEFAULTED}
        unset = [name for name, value in values.items() if value is None]
        if unset:
            raise ValueError(
                f"{', '.join(unset)} unset: a configuration's defaults are filled in by TrainConfig.resolved()"
            )
        return ResolvedSettings(**{**values, "tableau": get_tableau(values["tableau"])})

    @property
    def memory(self) -> Memory:
        """The memory levers (``task_chunk``, ``recompute``, ``amp``) as :class:`~rkfast.memory.Memory` takes
        them; ``ValueError`` naming a bad one."""
        try:
            return Memory(task_chunk=self.task_chunk, recompute=self.recompute, amp=self.amp)  # type: ignore[arg-type]
        except TypeError as err:  # a string or a bool: still a bad setting (ValueError, as documented)
            raise ValueError(str(err)) from None

    @property
    def coefficients(self) -> CoefficientSettings:
        """The learned-coefficient settings (``learn_rates`` ... ``tableau_lr``) as one value."""
        return CoefficientSettings(**{name: getattr(self, name) for name in CoefficientSettings.names()})

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (the tableau by name)."""
        name = self.tableau.name if isinstance(self.tableau, Tableau) else self.tableau
        return asdict(replace(self, tableau=name))


def _select_steps(cfg: TrainConfig, tableau: Tableau, eval_steps: tuple[int, ...]) -> int:
    """``cfg.select_steps`` checked against the domain's held-out step counts, or its default."""
    steps = None if cfg.select_steps is None else _check_count("select_steps", cfg.select_steps, 1)
    return select_steps_among(steps, tableau, cfg.learn_rates is not None, eval_steps)


def select_steps_among(
    select_steps: int | None,
    tableau: Tableau,
    learned_rates: bool,
    eval_steps: tuple[int, ...],
    name: str = "select_steps ",
    chooses: str = "best.pt ",
) -> int:
    """The held-out step count that selects (``best.pt``, or a compare grid's h): ``select_steps``, which must
    be one of the domain's ``eval_steps`` (``ValueError`` naming it as ``name`` does), or by default
    :func:`default_select_steps`."""
    if select_steps is None:
        return default_select_steps(tableau, learned_rates, eval_steps)
    if select_steps not in eval_steps:
        raise ValueError(
            f"{name}{select_steps}: the held-out evaluations of this domain adapt "
            f"{', '.join(map(str, eval_steps))} step(s); select {chooses}on one of them"
        )
    return int(select_steps)


def build_optimizer(cfg: TrainConfig, domain: Domain, parallel: Any = "auto") -> MetaOptimizer:
    """The run's model (initialized under ``cfg.seed``, the global RNG left alone) and its optimizer, for a
    resolved ``cfg`` (:meth:`TrainConfig.resolved`).

    ``parallel`` is :class:`~rkfast.optim.MetaOptimizer`'s: ``"auto"`` reduces the meta-direction over
    torch.distributed's default group when it is initialized with more than one rank, ``None`` keeps the
    optimizer to this process, or a :class:`~rkfast.distributed.TaskParallel` or ``ProcessGroup``.
    """
    settings = cfg.settings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = domain.make_model(cfg.options).to(torch.device(cfg.device))
    return meta_optimizer(
        model,
        domain.loss_fn,
        tableau=settings.tableau,
        inner_lr=settings.inner_lr,
        lr=settings.lr,
        first_order=cfg.first_order,
        backend=cfg.backend,
        parallel=parallel,
        coefficients=cfg.coefficients,
        memory=cfg.memory,
    )
