"""The run's MetaOptimizer and its learned coefficients: what a configuration says about learned (or fixed
per-tensor) inner rates and a learned tableau, how it is checked, how the optimizer is built from it, and
how ``results.json`` summarizes the coefficients.

Everything the training package knows of the optimizer's coefficient options lives in this module: the rest
of the package holds them as :class:`Coefficients` and hands them here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..learned import LearnedRates
from ..optim import MetaOptimizer
from ..tableau import Tableau

__all__ = ["Coefficients", "meta_optimizer", "rate_summary", "rates_info", "tableau_summary", "learned_tableau_info"]


@dataclass(frozen=True)
class Coefficients:
    """The learned inner coefficients of a run, as :class:`~rkfast.optim.MetaOptimizer` takes them
    (:class:`~rkfast.train.TrainConfig` documents each field)."""

    learn_rates: str | None = None
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

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~rkfast.optim.MetaOptimizer` that set these coefficients."""
        return asdict(self)

    def checked(self, tableau: Tableau, make_model: Callable[[], nn.Module]) -> Coefficients:
        """These coefficients checked by the optimizer's own rules (``ValueError`` naming the setting), with
        the numbers as plain floats (``frozen_rates`` as ``{str: float}``).

        Settings other than the defaults are checked by building the optimizer they describe on the CPU for
        ``make_model()`` (under a forked random state: no random numbers are drawn): the frozen-rate patterns
        are matched against the model's names, a learned tableau must have entries to learn, and an
        ``"order"`` ``b`` needs order conditions the starting ``A`` admits."""
        if not isinstance(self.per_stage_rates, bool):
            raise ValueError(f"per_stage_rates must be True or False, got {self.per_stage_rates!r}")
        if self == Coefficients():
            return self  # nothing learned or frozen: nothing to check
        with torch.random.fork_rng(devices=[]):
            model = make_model().to("cpu")
            try:
                meta_optimizer(model, None, tableau=tableau, inner_lr=1.0, lr=0.0, process_group=None,
                               coefficients=self)
            except TypeError as err:  # a pattern or a rate that is not a string or a number: still a bad setting
                raise ValueError(str(err)) from None
        frozen = None if self.frozen_rates is None else {str(k): float(v) for k, v in self.frozen_rates.items()}
        return replace(self, frozen_rates=frozen, rate_lr=None if self.rate_lr is None else float(self.rate_lr),
                       tableau_lr=None if self.tableau_lr is None else float(self.tableau_lr))


def meta_optimizer(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor] | None, *, tableau: Tableau,
                   inner_lr: float, lr: float, first_order: bool = False, backend: str = "auto",
                   process_group: Any = "auto", coefficients: Coefficients = Coefficients()) -> MetaOptimizer:
    """A :class:`~rkfast.optim.MetaOptimizer` (Adam outside) over ``model`` with these ``coefficients``."""
    return MetaOptimizer(model, loss_fn, tableau=tableau, inner_lr=inner_lr, outer="adam", lr=lr,
                         first_order=first_order, backend=backend, process_group=process_group,  # type: ignore[arg-type]
                         **coefficients.optimizer_kwargs())


def _rate(value: Any) -> float:
    """A rate for JSON: 7 significant digits (a float32 rate's precision; ``0.01``, not ``0.009999999776``)."""
    return float(f"{float(value):.7g}")


def rate_summary(rates: LearnedRates) -> dict[str, list[Any]]:
    """``{parameter name: one entry per rate set}``: the rate (a number) of a scalar, per-tensor or frozen
    rate, ``{"mean", "min", "max"}`` over the tensor's elements for element rates (7 significant digits)."""
    out: dict[str, list[Any]] = {}
    for name, values in rates.values().items():
        if values.dim() == 1:
            out[name] = [_rate(v) for v in values.cpu()]
        else:
            rows = values.reshape(values.shape[0], -1).cpu()
            out[name] = [{"mean": _rate(r.mean()), "min": _rate(r.min()), "max": _rate(r.max())} for r in rows]
    return out


def rates_info(opt: MetaOptimizer) -> dict[str, Any] | None:
    """The inner rates of ``opt`` as ``results.json`` reports them (``None`` without learned or frozen
    rates): their settings and :func:`rate_summary`."""
    rates = opt.rates
    if rates is None:
        return None
    return {"granularity": rates.granularity, "per_stage": rates.per_stage, "sets": rates.sets,
            "inner_lr": opt.inner_lr, "rate_lr": _group_lr(opt, rates.tensors) if rates.learned else None,
            "frozen": dict(rates.frozen), "values": rate_summary(rates)}


def _group_lr(opt: MetaOptimizer, tensors: Sequence[torch.Tensor]) -> float | None:
    """The learning rate of the param group of ``opt`` that holds ``tensors`` (learned rates and a learned
    tableau have a group each, the tableau's last)."""
    ids = {id(t) for t in tensors}
    for group in opt.param_groups:
        if any(id(p) in ids for p in group["params"]):
            return group["lr"]
    return None


def tableau_summary(tableau: Tableau) -> dict[str, list[Any]]:
    """``{"A": [[...]], "b": [...]}`` of a tableau (a learned one's ``current()``), 7 significant digits."""
    return {"A": [[_rate(x) for x in row] for row in tableau.A], "b": [_rate(x) for x in tableau.b]}


def learned_tableau_info(opt: MetaOptimizer) -> dict[str, Any] | None:
    """The learned tableau of ``opt`` as ``results.json`` reports it (``None`` without one): ``pattern``,
    ``weights`` (``"fixed"`` or ``"order"``), ``tableau_lr`` (its param group's rate), ``base`` (the starting
    tableau's name), ``entries`` (the learned ``(j, l)`` positions of ``A``, 0-based), ``A`` and ``b`` now
    (:func:`tableau_summary`), its ``order`` and the meta-test ``test_step`` it gives at ``inner_lr``."""
    learned = opt.learned_tableau
    if learned is None:
        return None
    current = learned.current()
    return {"pattern": learned.pattern, "weights": learned.weights_mode,
            "tableau_lr": _group_lr(opt, learned.tensors), "base": learned.base.name,
            "entries": [list(e) for e in learned.entries], **tableau_summary(current),
            "order": current.order, "test_step": _rate(current.test_step(opt.inner_lr))}
