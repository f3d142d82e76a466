"""The run's MetaOptimizer and its learned coefficients: what a configuration says about learned (or fixed
per-tensor) inner rates and a learned tableau, the capability objects it makes of them
(:class:`~rkfast.learned.Rates`, :class:`~rkfast.learned.LearnedTableau`), and how ``results.json``
summarizes them.

A configuration keeps the coefficient settings as plain values, one per command-line flag (``learn_rates``,
``per_stage_rates``, ``rate_lr``, ``frozen_rates``, ``learn_tableau``, ``tableau_weights``, ``tableau_lr``),
so that ``results.json`` and checkpoints stay plain JSON; :meth:`CoefficientSettings.specs` turns them into the
objects :class:`~rkfast.optim.MetaOptimizer` takes, and every check is theirs, reported under the setting's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..learned import Granularity, LearnedTableau, Rates, rate_summary, tableau_summary
from ..memory import Memory
from ..optim import MetaOptimizer
from ..tableau import Tableau

__all__ = [
    "CoefficientSettings",
    "meta_optimizer",
    "rates_info",
    "learned_tableau_info",
    "rate_summary",
    "tableau_summary",
]

# the capability objects' argument names in their errors -> the settings (and flags) a configuration names
_SETTING_NAMES = (
    ("Rates granularity", "learn_rates"),
    ("Rates per_stage", "per_stage_rates"),
    ("Rates lr", "rate_lr"),
    ("Rates frozen", "frozen_rates"),
    ("LearnedTableau pattern", "learn_tableau"),
    ("LearnedTableau weights", "tableau_weights"),
    ("LearnedTableau lr", "tableau_lr"),
)


def _in_setting_names(err: Exception) -> ValueError:
    """A capability object's error, reworded with the configuration's setting names (as a ``ValueError``: a
    pattern or a rate that is not a string or a number is still a bad setting)."""
    text = str(err)
    for argument, setting in _SETTING_NAMES:
        text = text.replace(argument, setting)
    return ValueError(text)


@dataclass(frozen=True)
class CoefficientSettings:
    """The learned inner coefficients of a run as plain settings (:class:`~rkfast.train.TrainConfig` documents
    each field; they are its fields of the same names)."""

    learn_rates: Granularity | None = None
    per_stage_rates: bool = False
    rate_lr: float | None = None
    frozen_rates: Mapping[str, float] | None = None
    learn_tableau: str | None = None
    tableau_weights: str = "fixed"
    tableau_lr: float | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names (the same names on :class:`~rkfast.train.TrainConfig`)."""
        return tuple(f.name for f in fields(cls))

    def _check_combinations(self) -> None:
        """Settings that only mean something beside another (the capability objects cannot see a setting that
        belongs to the other object, such as a tableau weight rule without a learned tableau)."""
        if not isinstance(self.per_stage_rates, bool):
            raise ValueError(f"per_stage_rates must be True or False, got {self.per_stage_rates!r}")
        if self.learn_rates is None:
            if self.per_stage_rates:
                raise ValueError("per_stage_rates=True needs learn_rates ('scalar', 'tensor' or 'element')")
            if self.rate_lr is not None:
                raise ValueError("rate_lr is the learning rate of learned rates: it needs learn_rates")
        if self.learn_tableau is None:
            if self.tableau_weights != "fixed":
                raise ValueError(f"tableau_weights={self.tableau_weights!r} needs learn_tableau ('pattern' or 'full')")
            if self.tableau_lr is not None:
                raise ValueError("tableau_lr is the learning rate of a learned tableau: it needs learn_tableau")

    def specs(self, tableau: Tableau) -> tuple[Tableau | LearnedTableau, Rates | None]:
        """The ``tableau`` and ``rates`` arguments of :class:`~rkfast.optim.MetaOptimizer` these settings give:
        ``tableau`` itself or a :class:`~rkfast.learned.LearnedTableau` of it, and a
        :class:`~rkfast.learned.Rates` or ``None`` (``ValueError`` naming the setting)."""
        self._check_combinations()
        try:
            rates = None
            if self.learn_rates is not None or self.frozen_rates is not None:
                rates = Rates(
                    self.learn_rates,
                    per_stage=self.per_stage_rates,
                    frozen=self.frozen_rates,
                    lr=self.rate_lr,
                )
            if self.learn_tableau is None:
                return tableau, rates
            learned = LearnedTableau(
                tableau,
                self.learn_tableau,
                self.tableau_weights,
                lr=self.tableau_lr,
            )
            return learned, rates
        except (TypeError, ValueError) as err:
            raise _in_setting_names(err) from None

    def checked(self, tableau: Tableau, make_model: Callable[[], nn.Module]) -> CoefficientSettings:
        """These settings checked by the capability objects' own rules (``ValueError`` naming the setting),
        with the numbers as plain floats (``frozen_rates`` as ``{str: float}``).

        Settings other than the defaults are checked by building the optimizer they describe on the CPU for
        ``make_model()`` (under a forked random state: no random numbers are drawn): the frozen-rate patterns
        are matched against the model's names."""
        self._check_combinations()
        if self == CoefficientSettings():
            return self  # nothing learned or frozen: nothing to check
        with torch.random.fork_rng(devices=[]):
            model = make_model().to("cpu")
            try:
                meta_optimizer(model, None, tableau=tableau, inner_lr=1.0, lr=0.0, parallel=None, coefficients=self)
            except (TypeError, ValueError) as err:
                raise _in_setting_names(err) from None
        frozen = None if self.frozen_rates is None else {str(k): float(v) for k, v in self.frozen_rates.items()}
        return replace(
            self,
            frozen_rates=frozen,
            rate_lr=None if self.rate_lr is None else float(self.rate_lr),
            tableau_lr=None if self.tableau_lr is None else float(self.tableau_lr),
        )

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON data."""
        return asdict(self)


def meta_optimizer(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    *,
    tableau: Tableau,
    inner_lr: float,
    lr: float,
    first_order: bool = False,
    backend: str = "auto",
    parallel: Any = "auto",
    coefficients: CoefficientSettings = CoefficientSettings(),
    memory: Memory | None = None,
) -> MetaOptimizer:
    """A :class:`~rkfast.optim.MetaOptimizer` (Adam outside) over ``model`` with these ``coefficients``."""
    tableau_arg, rates = coefficients.specs(tableau)
    return MetaOptimizer(
        model,
        loss_fn,
        tableau=tableau_arg,
        inner_lr=inner_lr,
        outer="adam",
        lr=lr,
        first_order=first_order,
        backend=backend,
        rates=rates,
        parallel=parallel,
        memory=memory,
    )


def rates_info(opt: MetaOptimizer) -> dict[str, Any] | None:
    """The inner rates of ``opt`` as ``results.json`` reports them (``None`` without learned or frozen
    rates): their settings, ``rate_lr`` and :func:`~rkfast.learned.rate_summary`."""
    return opt.coefficient_summaries().get("rates")


def learned_tableau_info(opt: MetaOptimizer) -> dict[str, Any] | None:
    """The learned tableau of ``opt`` as ``results.json`` reports it (``None`` without one): ``pattern``,
    ``weights`` (``"fixed"`` or ``"order"``), ``tableau_lr`` (its param group's rate), ``base`` (the starting
    tableau's name), ``entries`` (the learned ``(j, l)`` positions of ``A``, 0-based), ``A`` and ``b`` now
    (:func:`~rkfast.learned.tableau_summary`), its ``order`` and the meta-test ``test_step`` it gives."""
    return opt.coefficient_summaries().get("learned_tableau")
