"""Learned inner rates (Meta-SGD, MAML++ per-layer per-step rates, ANIL) and learned tableaus
(``docs/method.md``, "Learned inner rates" and "Learned tableaus").

With learned rates the stage points of a meta-step are

    theta_i^(j) = theta - sum_{m<j} A[j][m] * (r_m ⊙ k_i^(m))

where ``r_m`` is a vector ``[N]`` over the flat meta-parameters: the one set of rates ``r``, or with
per-stage rates the set of slope ``m`` (the rate of the step that slope ``m`` takes; for ``maml(k)`` set
``n`` is the rate of inner step ``n + 1``, MAML++'s per-step rates). The vector is built from the learned
tensors at one of three granularities:

* ``"scalar"``: one rate shared by every parameter tensor;
* ``"tensor"``: one rate per parameter tensor (MAML++'s per-layer rates);
* ``"element"``: one rate per parameter element (Meta-SGD).

Rates start at ``inner_lr`` (at initialization a step equals the fixed-``h`` step exactly) and are
unconstrained, as in Meta-SGD: the outer update may drive a rate to zero or below (a negative rate steps up
the support gradient there). ``frozen`` fixes the rate of matching parameter tensors to a constant that is
not learned (``{"features.*": 0.0}``: ANIL, those tensors are meta-learned by the outer update but not
adapted). The learned tensors are ordinary leaf tensors (``requires_grad``) that an outer optimizer updates.

:class:`LearnedTableau` makes the entries of ``A`` on a sparsity pattern meta-parameters too, with ``b``
either fixed or derived from ``A`` by the order conditions (:func:`order_weights`).

Each capability has two forms. The spec (:class:`Rates`, :class:`LearnedTableau`) is what a user passes to
:class:`~rkfast.optim.MetaOptimizer`: an immutable description, validated when built, with a JSON form. Its
``bind`` gives the live object (:class:`LearnedRates`, :class:`TableauCoefficients`) holding the learned leaf
tensors for one parameter layout, dtype and device; both live kinds are :class:`Coefficients`, the one
interface through which the optimizer saves, loads, moves, updates and reports them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from .layout import ParamLayout
from .outer import check_lr
from .results import MetaStepOutput, NonFiniteLossError
from .tableau import InconsistentTableauWarning, Tableau, get_tableau

__all__ = [
    "GRANULARITIES",
    "Granularity",
    "Coefficients",
    "Rates",
    "LearnedRates",
    "RatesStepOutput",
    "resolve_frozen",
    "LearnedTableau",
    "TableauCoefficients",
    "TABLEAU_PATTERNS",
    "TABLEAU_WEIGHTS",
    "order_weights",
    "OrderConditionsError",
    "rate_summary",
    "tableau_summary",
    "describe_state_key",
]

Granularity = Literal["scalar", "tensor", "element"]
GRANULARITIES: tuple[str, ...] = ("scalar", "tensor", "element")


class RatesStepOutput(MetaStepOutput):
    """A :class:`~rkfast.results.MetaStepOutput` that also carries the meta-directions of the learned
    coefficients (detached): ``rate_directions``, one per tensor of :attr:`LearnedRates.tensors`, and
    ``tableau_directions``, one per tensor of :attr:`TableauCoefficients.tensors`."""

    def __init__(
        self, out: MetaStepOutput, rate_directions: list[Tensor], tableau_directions: list[Tensor] | None = None
    ) -> None:
        super().__init__(out.direction, out.loss, out.stage_losses, out.stage_metrics)
        self.rate_directions = rate_directions
        self.tableau_directions = list(tableau_directions or [])

    @property
    def coefficient_directions(self) -> list[Tensor]:
        """``rate_directions + tableau_directions``: in the order of the optimizer's learned tensors."""
        return [*self.rate_directions, *self.tableau_directions]


def _frozen_rates(frozen: Any) -> dict[str, float]:
    """``{name or glob: rate}`` as plain ``{str: float}``: ``TypeError`` for a non-mapping or a key that is not
    a string, ``ValueError`` for a rate that is not a finite number."""
    if not isinstance(frozen, Mapping):
        raise TypeError(f"Rates frozen must be a mapping {{name or glob: rate}}, got {frozen!r}")
    out: dict[str, float] = {}
    for pattern, value in frozen.items():
        if not isinstance(pattern, str):
            raise TypeError(f"Rates frozen keys must be parameter names or glob patterns, got {pattern!r}")
        rate = math.nan
        if not isinstance(value, (bool, str, bytes)):
            with contextlib.suppress(TypeError, ValueError):  # not a number: NaN, refused below
                rate = float(value)
        if not math.isfinite(rate):
            raise ValueError(f"Rates frozen[{pattern!r}] must be a finite number, got {value!r}")
        out[pattern] = rate
    return out


def resolve_frozen(layout: ParamLayout, frozen: Mapping[str, float] | None) -> dict[str, float]:
    """``{parameter name: fixed rate}`` from ``{name or glob pattern: rate}`` (``fnmatch``, case-sensitive).

    Raises ``ValueError`` for a pattern that matches no meta-parameter, a rate that is not a finite number,
    or a tensor matched by two patterns with different rates; ``TypeError`` for a non-mapping."""
    if frozen is None:
        return {}
    out: dict[str, float] = {}
    for pattern, rate in _frozen_rates(frozen).items():
        matched = [n for n in layout.names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(
                f"Rates frozen pattern {pattern!r} matches no meta-parameter; the names are {list(layout.names)}"
            )
        for name in matched:
            if name in out and out[name] != rate:
                raise ValueError(f"Rates frozen gives parameter {name!r} two rates, {out[name]} and {rate}")
            out[name] = rate
    return out


def _coefficient_lr(owner: str, lr: Any) -> float | None:
    """The outer learning rate of learned coefficients: ``None`` (the optimizer's ``lr``) or a finite,
    non-negative number (``ValueError`` naming ``owner``'s ``lr`` otherwise)."""
    if lr is None:
        return None
    if isinstance(lr, bool):
        raise ValueError(f"{owner} lr must be a finite, non-negative number, got {lr!r}")
    check_lr(lr, f"{owner} lr")
    return float(lr)


def _from_json(cls: Any, d: Any) -> Any:
    """``cls(**d)`` for a spec's JSON form, ``ValueError`` naming what is wrong with ``d``."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls.__name__}.from_json takes a dict, got {type(d).__name__}")
    unknown = set(d) - {f.name for f in cls.__dataclass_fields__.values()}
    if unknown:
        raise ValueError(f"{cls.__name__}.from_json: unknown keys {sorted(unknown)}")
    return cls(**d)


_STATE_KEYS = {"rates": "learned/frozen rates (Rates)", "learned_tableau": "a learned tableau (LearnedTableau)"}


def describe_state_key(key: str) -> str:
    """What a coefficient entry ``key`` of ``MetaOptimizer.state_dict()["rkfast"]`` holds (for errors)."""
    return _STATE_KEYS.get(key, repr(key))


@runtime_checkable
class Coefficients(Protocol):
    """Learned coefficients of the meta-step, bound to one optimizer's parameter layout, dtype and device.

    :class:`LearnedRates` and :class:`TableauCoefficients` are the two kinds. The optimizer keeps them in
    one list and only ever goes through this interface: their leaf :attr:`tensors` get a param group of
    their own (learning rate :attr:`lr`, ``None`` for the optimizer's ``lr``), ride with the meta-direction
    in the all-reduce, are saved under :attr:`key` of the state dict and restored by a failed step.
    """

    key: str  # their entry in MetaOptimizer.state_dict()["rkfast"]
    lr_name: str  # the name of their param group's learning rate in summaries ("rate_lr", "tableau_lr")
    tensors: list[Tensor]
    lr: float | None

    def state(self) -> dict[str, Any]:
        """Configuration and values, as the state dict saves them."""

    def check_state(self, state: Any) -> list[Tensor]:
        """The values of a saved :meth:`state`, checked against this configuration (``ValueError``)."""

    def load(self, values: Sequence[Tensor]) -> None:
        """Copy checked values into :attr:`tensors`."""

    def to_(self, dtype: torch.dtype, device: torch.device) -> None:
        """Move :attr:`tensors` (the same objects) to ``dtype`` and ``device``."""

    def check_update(self) -> None:
        """Raise if the values an outer update left cannot be used by the next step."""

    def check_compatible(self, *, first_order: bool, captured: bool) -> None:
        """Raise ``ValueError`` if a step with these settings cannot use them."""

    def summary(self, inner_lr: float) -> dict[str, Any]:
        """Settings and current values as ``results.json`` reports them (learning rate excepted)."""


class _SavedCoefficients:
    """What learned rates and learned tableaus share: their state in ``MetaOptimizer.state_dict`` is their
    configuration (:meth:`config`) and the values of their leaf :attr:`tensors`, checked before loading."""

    tensors: list[Tensor]
    lr: float | None
    _what = "learned coefficients"  # in the error messages

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _option(self) -> str:
        """The spec that created these coefficients (for the error messages)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What ``MetaOptimizer.state_dict`` saves: the configuration and the learned values (copies)."""
        return {**self.config(), "values": [t.detach().clone() for t in self.tensors]}

    def check_state(self, state: Any) -> list[Tensor]:
        """The values of a :meth:`state`, checked against this configuration (``ValueError`` otherwise)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"the state dict has no {self._what}, but this MetaOptimizer has {self._option()}")
        theirs = {k: state.get(k) for k in self.config()}
        if theirs != self.config():
            raise ValueError(
                f"the state dict's {self._what} are configured as {theirs}, this MetaOptimizer's as {self.config()}"
            )
        values = list(state.get("values", ()))
        if len(values) != len(self.tensors) or any(
            not isinstance(v, Tensor) or v.shape != t.shape for v, t in zip(values, self.tensors, strict=True)
        ):
            raise ValueError(
                f"the state dict's {self._what} values do not match this MetaOptimizer's tensors "
                f"({[tuple(t.shape) for t in self.tensors]})"
            )
        return values

    def _place(self) -> None:
        """Move what the subclass keeps beside the tensors to ``self._device`` (after :meth:`to_`)."""

    def to_(self, dtype: torch.dtype, device: torch.device) -> None:
        """Move the learned tensors (in place: the same tensor objects, which their param group holds) and
        their ``.grad`` to ``dtype`` and ``device``."""
        with torch.no_grad():
            for t in self.tensors:
                t.data = t.data.to(dtype=dtype, device=device)
                if t.grad is not None:
                    t.grad = t.grad.to(dtype=dtype, device=device)
        self._dtype, self._device = dtype, torch.device(device)
        self._place()

    def load(self, values: Sequence[Tensor]) -> None:
        """Copy checked values (:meth:`check_state`) into the learned tensors (in place)."""
        with torch.no_grad():
            for t, v in zip(self.tensors, values, strict=True):
                t.copy_(v)

    def check_update(self) -> None:
        """Nothing to check by default: any finite values are usable."""

    def check_compatible(self, *, first_order: bool, captured: bool) -> None:
        """Compatible with every step by default."""


def _check_granularity(granularity: Any) -> None:
    if granularity is not None and granularity not in GRANULARITIES:
        raise ValueError(
            f"Rates granularity must be one of {', '.join(map(repr, GRANULARITIES))} or None, got {granularity!r}"
        )


@dataclass(frozen=True)
class Rates:
    """Learned (or fixed per-tensor) inner rates: ``MetaOptimizer(..., rates=Rates(...))`` (``docs/api.md``,
    "Learned inner rates"; the math in ``docs/method.md``).

    Args:
        granularity: ``"scalar"`` (one rate), ``"tensor"`` (one per parameter tensor: MAML++'s per-layer
            rates), ``"element"`` (one per element: Meta-SGD), or ``None``: nothing learned, only ``frozen``.
        per_stage: one set of rates per slope of the tableau (MAML++'s per-step rates for ``maml(k)``);
            needs a granularity.
        frozen: ``{parameter name or glob: rate}``: fixed, not learned, rates (``{"features.*": 0.0}``: ANIL).
        lr: the rates' outer learning rate (default: the optimizer's ``lr``); needs a granularity.

    Raises:
        ValueError: any argument out of range (the message names it), or neither a granularity nor frozen
            rates (``rates=None`` is the fixed step). Patterns are matched when bound.
    """

    granularity: Granularity | None = None
    per_stage: bool = field(default=False, kw_only=True)
    frozen: Mapping[str, float] | None = field(default=None, kw_only=True)
    lr: float | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _check_granularity(self.granularity)
        if not isinstance(self.per_stage, bool):
            raise ValueError(f"Rates per_stage must be True or False, got {self.per_stage!r}")
        if self.per_stage and self.granularity is None:
            raise ValueError("Rates(per_stage=True) needs a granularity ('scalar', 'tensor' or 'element')")
        try:
            frozen = None if self.frozen is None else _frozen_rates(self.frozen)
        except TypeError as err:
            raise ValueError(str(err)) from None
        if self.granularity is None and not frozen:
            raise ValueError(
                "Rates() learns and freezes nothing: give a granularity ('scalar', 'tensor' or "
                "'element') or frozen rates, or pass rates=None for the fixed step inner_lr"
            )
        if self.lr is not None and self.granularity is None:
            raise ValueError("Rates lr is the learning rate of learned rates: it needs a granularity")
        object.__setattr__(self, "frozen", frozen)
        object.__setattr__(self, "lr", _coefficient_lr("Rates", self.lr))

    def bind(
        self,
        layout: ParamLayout,
        inner_lr: float,
        stages: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> LearnedRates:
        """The live rates over ``layout`` (learned ones start at ``inner_lr``) for a tableau of ``stages``
        stages. Raises ``ValueError`` for a frozen pattern that matches no parameter, or frozen rates that
        leave nothing to learn."""
        return LearnedRates(
            layout,
            inner_lr,
            self.granularity,
            per_stage=self.per_stage,
            stages=stages,
            frozen=self.frozen,
            dtype=dtype,
            device=device,
            lr=self.lr,
        )

    def to_json(self) -> dict[str, Any]:
        """A plain-JSON form (:meth:`from_json` reads it back)."""
        return {
            "granularity": self.granularity,
            "per_stage": self.per_stage,
            "frozen": None if self.frozen is None else dict(self.frozen),
            "lr": self.lr,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Rates:
        """Inverse of :meth:`to_json` (validated as the constructor validates)."""
        return _from_json(cls, d)


class LearnedRates(_SavedCoefficients):
    """The inner rates of a meta-step, live (:meth:`Rates.bind`): learned tensors at a granularity, per stage
    or not, and fixed rates. A :class:`Coefficients`.

    Args:
        layout: the flat layout of the meta-parameters (``N`` elements in named tensors).
        inner_lr: the initial value of every learned rate, and the rate of tensors that are neither learned
            nor frozen (``granularity=None``).
        granularity: ``"scalar"``, ``"tensor"``, ``"element"`` or ``None`` (nothing learned: fixed per-tensor
            rates, ``inner_lr`` except where ``frozen``).
        per_stage: one set of rates per slope of the tableau (``sets = max(1, stages - 1)``); else one set.
        stages: the tableau's number of stages ``s``.
        frozen: ``{name or glob: rate}`` (:func:`resolve_frozen`): fixed, not learned, rates.
        dtype, device: of the learned tensors (the meta-parameters').
        lr: their outer learning rate (``None``: the optimizer's).

    Attributes:
        tensors: the learned leaf tensors (empty for ``granularity=None``): ``[sets]`` for ``"scalar"``,
            ``[sets, P]`` for ``"tensor"`` (``P`` the learned, i.e. not frozen, parameter tensors, in layout
            order), ``[sets, N_l]`` for ``"element"`` (``N_l`` their elements, in flat order).
        frozen: ``{parameter name: fixed rate}``; learned_names: the parameter tensors whose rates are learned.
        sets: the number of rate sets.
    """

    def __init__(
        self,
        layout: ParamLayout,
        inner_lr: float,
        granularity: Granularity | None = None,
        *,
        per_stage: bool = False,
        stages: int = 2,
        frozen: Mapping[str, float] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        lr: float | None = None,
    ) -> None:
        _check_granularity(granularity)
        self.lr = _coefficient_lr("Rates", lr)
        self.layout = layout
        self.inner_lr = float(inner_lr)
        self.granularity = granularity
        self.per_stage = bool(per_stage)
        self.sets = max(1, int(stages) - 1) if self.per_stage else 1
        self.frozen = resolve_frozen(layout, frozen)
        self.learned_names = tuple(n for n in layout.names if n not in self.frozen)
        if granularity is not None and not self.learned_names:
            raise ValueError(
                "Rates frozen= freezes every meta-parameter tensor: there is no rate left to learn "
                "(use granularity=None for fixed rates only)"
            )
        numels = dict(zip(layout.names, layout.numels, strict=True))
        width = {
            "scalar": 1,
            "tensor": len(self.learned_names),
            "element": sum(numels[n] for n in self.learned_names),
            None: 1,
        }[granularity]
        self.tensors: list[Tensor] = []
        if granularity is not None:
            shape = (self.sets,) if granularity == "scalar" else (self.sets, width)
            self.tensors.append(torch.full(shape, self.inner_lr, dtype=dtype, device=device).requires_grad_())
        # vector(set) = cat([learned row (width), frozen rates])[index]
        self._width = width
        self._frozen_values = [self.frozen[n] for n in layout.names if n in self.frozen]
        index: list[Tensor] = []
        learned_k, offset, frozen_k = 0, 0, 0
        for name, numel in zip(layout.names, layout.numels, strict=True):
            if name in self.frozen:
                index.append(torch.full((numel,), width + frozen_k, dtype=torch.long))
                frozen_k += 1
            elif granularity == "element":
                index.append(torch.arange(offset, offset + numel))
                offset += numel
            else:
                index.append(torch.full((numel,), learned_k if granularity == "tensor" else 0, dtype=torch.long))
                learned_k += 1
        self._index_cpu = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        self._identity = granularity == "element" and not self.frozen
        self._dtype, self._device = dtype, torch.device(device)
        self._place()

    def _place(self) -> None:
        """The index and the frozen rates on the learned tensors' device (a CUDA graph cannot copy them from
        the host while it captures a step)."""
        self._index = self._index_cpu.to(self._device)
        self._frozen = torch.tensor(self._frozen_values, dtype=self._dtype).to(self._device)

    @property
    def learned(self) -> bool:
        """Whether any rate is learned (``granularity`` is not ``None``)."""
        return bool(self.tensors)

    def _row(self, s: int, like: Tensor | None) -> Tensor:
        if self.granularity is None:
            ref = like if like is not None else torch.empty(0, dtype=self._dtype, device=self._device)
            return ref.new_full((1,), self.inner_lr)
        t = self.tensors[0]
        return t[s : s + 1] if self.granularity == "scalar" else t[s]

    def vector(self, stage: int = 0) -> Tensor:
        """The rates of set ``min(stage, sets - 1)`` as a flat vector ``[N]`` over the meta-parameters,
        differentiable with respect to :attr:`tensors` (detach it to read it)."""
        s = min(max(int(stage), 0), self.sets - 1)
        row = self._row(s, None)
        if self._identity:
            return row
        if self._frozen_values:
            row = torch.cat([row, self._frozen.to(row.dtype)])
        return row.index_select(0, self._index)

    def fixed_vector(self) -> Tensor:
        """``[N]``: ``inner_lr`` at every tensor that is not frozen and the fixed rate at the frozen ones (what
        the rates are at initialization)."""
        table = torch.tensor([self.inner_lr] * 1 + self._frozen_values, dtype=self._dtype, device=self._device)
        index = torch.where(self._index >= self._width, self._index - self._width + 1, 0)
        return table.index_select(0, index)

    def adaptation_rates(
        self, own_step: float, step_size: float | None
    ) -> tuple[float, Callable[[int], Tensor] | None]:
        """Meta-test with these rates (``MetaOptimizer.evaluate``): ``(alpha, rates)``, adaptation step ``n``
        (0-based) taking ``alpha * rates(n)``. Without ``step_size``: the rates of set ``min(n, sets - 1)``
        scaled by the tableau's test-step factor ``own_step / inner_lr``; with one: that scalar, except that
        frozen tensors keep their rate scaled by ``step_size / inner_lr`` (``rates=None`` when none is)."""
        with torch.no_grad():
            if step_size is None:
                vectors = [self.vector(s).detach() for s in range(self.sets)]
                return own_step / self.inner_lr, lambda n: vectors[min(n, len(vectors) - 1)]
            if not self.frozen:
                return step_size, None
            scaled = self.fixed_vector() / self.inner_lr  # 1 where not frozen: step_size exactly
            return step_size, lambda n: scaled

    def values(self) -> dict[str, Tensor]:
        """``{parameter name: rates}`` (detached copies), each of shape ``[sets]``, or ``[sets, *shape]`` for
        ``"element"`` granularity; frozen and unlearned tensors included (their constant rate)."""
        with torch.no_grad():
            rows = torch.stack([self.vector(s).detach() for s in range(self.sets)])  # [sets, N]
        out = {}
        offset = 0
        for name, shape, numel in zip(self.layout.names, self.layout.shapes, self.layout.numels, strict=True):
            block = rows[:, offset : offset + numel]
            if self.granularity == "element" and name not in self.frozen:
                out[name] = block.reshape(self.sets, *shape).clone()
            else:
                out[name] = block[:, 0].clone() if numel else rows.new_full((self.sets,), float("nan"))
            offset += numel
        return out

    def reduce(self, vector_grads: Mapping[int, Tensor]) -> list[Tensor]:
        """The gradients of :attr:`tensors` from gradients ``{set: [N]}`` with respect to :meth:`vector`: the
        reduction to the granularity (sums over a tensor's elements, zero at frozen tensors)."""
        if not self.tensors:
            return []
        with torch.enable_grad():
            total = sum((self.vector(s) * g).sum() for s, g in vector_grads.items())
            if not isinstance(total, Tensor) or not total.requires_grad:
                return [torch.zeros_like(t) for t in self.tensors]
            grads = torch.autograd.grad(total, self.tensors, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(self.tensors, grads, strict=True)]

    def config(self) -> dict[str, Any]:
        return {
            "granularity": self.granularity,
            "per_stage": self.per_stage,
            "sets": self.sets,
            "frozen": dict(self.frozen),
        }

    _what = "learned rates"
    key = "rates"
    lr_name = "rate_lr"

    def _option(self) -> str:
        return f"Rates({self.granularity!r}, per_stage={self.per_stage}, frozen={self.frozen})"

    def summary(self, inner_lr: float) -> dict[str, Any]:
        """Settings and :func:`rate_summary` (``inner_lr``: the optimizer's, which unlearned rates take)."""
        return {
            "granularity": self.granularity,
            "per_stage": self.per_stage,
            "sets": self.sets,
            "inner_lr": inner_lr,
            "frozen": dict(self.frozen),
            "values": rate_summary(self),
        }

    def __repr__(self) -> str:
        return (
            f"LearnedRates(granularity={self.granularity!r}, per_stage={self.per_stage}, sets={self.sets}, "
            f"frozen={self.frozen})"
        )


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


def tableau_summary(tableau: Tableau) -> dict[str, list[Any]]:
    """``{"A": [[...]], "b": [...]}`` of a tableau (a learned one's ``current()``), 7 significant digits."""
    return {"A": [[_rate(x) for x in row] for row in tableau.A], "b": [_rate(x) for x in tableau.b]}


# -- learned tableaus -----------------------------------------------------------------------------------

TABLEAU_PATTERNS: tuple[str, ...] = ("pattern", "full")
TABLEAU_WEIGHTS: tuple[str, ...] = ("fixed", "order")

# The order conditions that are linear in b, by order (Butcher): sum b = 1; b.c = 1/2; b.c^2 = 1/3,
# b.Ac = 1/6; b.c^3 = 1/4, b.(c*Ac) = 1/8, b.Ac^2 = 1/12, b.AAc = 1/24.
_CONDITIONS_UP_TO_ORDER = (1, 2, 4, 8)
_ORDER_RESIDUAL_TOL = 1e-6
_NEGATIVE_WEIGHT_TOL = 1e-9  # midpoint's b1 = 0 is solved to rounding


class OrderConditionsError(NonFiniteLossError, ValueError):
    """A learned tableau's weights ``b = order_weights(A)`` (``LearnedTableau(weights="order")``) cannot be used at
    the current ``A``: the order conditions have no solution (e.g. a node ``c_j`` learned to 0 in a 2-stage
    tableau), or the solution has a negative weight, where the meta-loss ``sum_j b_j L_j`` is no longer
    bounded below. A :class:`~rkfast.optim.NonFiniteLossError` (the step cannot be formed, nothing changes;
    a training run ends as diverged, keeping its last good state) and a ``ValueError``."""


def order_conditions_used(stages: int) -> tuple[int, int]:
    """``(order p, number of conditions)``: the highest order whose conditions linear in ``b`` number at
    most ``stages`` (1 stage: order 1; 2-3 stages: order 2; 4-7: order 3; 8 or more: order 4)."""
    order = max(p for p, count in enumerate(_CONDITIONS_UP_TO_ORDER, start=1) if count <= stages)
    return order, _CONDITIONS_UP_TO_ORDER[order - 1]


def order_weights(A: Tensor, check: bool = True) -> Tensor:
    """The weights ``b`` of a stage matrix ``A [s, s]`` (strictly lower triangular): the minimum-norm
    solution of the order conditions linear in ``b`` up to the order of :func:`order_conditions_used`,
    computed in float64 and differentiable in ``A``. For ``s = 2`` it is ``b = (1 - 1/(2c), 1/(2c))``
    with ``c = A[1][0]`` (the second-order family ``rk2(c)``); for ``s = 4`` the four conditions of order
    3 fix ``b`` (``rk4``'s ``A`` gives ``rk4``'s ``b``).

    ``check=False`` skips the solvability check, which reads a value on the host: what a CUDA-graph capture
    needs (a singular system then gives non-finite weights, hence a non-finite loss, which a captured step
    skips on the device). Nothing here copies from the host either.

    Raises:
        OrderConditionsError: (``check``) the conditions are singular at this ``A`` (no ``b`` satisfies them
            to 1e-6).
    """
    A64 = A.to(torch.float64)
    s = A64.shape[0]
    _, count = order_conditions_used(s)
    c = A64.sum(1)
    Ac = A64 @ c
    rows = [torch.ones_like(c), c, c * c, Ac, c**3, c * Ac, A64 @ (c * c), A64 @ Ac][:count]
    # filled on the device (no copy from the host, which a CUDA-graph capture forbids)
    targets = torch.stack(
        [A64.new_full((), v) for v in (1.0, 1 / 2, 1 / 3, 1 / 6, 1 / 4, 1 / 8, 1 / 12, 1 / 24)[:count]]
    )
    M = torch.stack(rows)  # [count, s]
    # as many conditions as stages (2 and 4 stages): one solve; else the minimum-norm solution M^T (M M^T)^-1 r
    # (M has full row rank when the conditions are solvable). solve_ex: no check on the host, no SVD
    b = torch.linalg.solve_ex(M, targets)[0] if count == s else M.T @ torch.linalg.solve_ex(M @ M.T, targets)[0]
    if not check:
        return b
    residual = float((M.detach() @ b.detach() - targets).abs().max())
    if not math.isfinite(residual) or residual > _ORDER_RESIDUAL_TOL:
        raise OrderConditionsError(
            f"no weights b satisfy the order conditions at the learned stage matrix (nodes c = "
            f"{[round(x, 6) for x in c.detach().tolist()]}; residual {residual:.3g}): the learned A has made them "
            "singular. Lower the tableau's learning rate (LearnedTableau lr), or keep b fixed (weights='fixed')"
        )
    return b


class TableauCoefficients(_SavedCoefficients):
    """A tableau whose entries of ``A`` on a sparsity pattern are learned tensors, live
    (:meth:`LearnedTableau.bind`; ``docs/method.md``, "Learned tableaus"). A :class:`Coefficients`.

    Args:
        tableau: the tableau the entries start from (their initial values) and whose stage count is kept.
        pattern: ``"pattern"``: the non-zero entries of ``tableau.A`` are learned (the zeros stay zero, so
            the method keeps its cost: ``rk4`` stays a 4-stage scheme with 3 slopes read once each);
            ``"full"``: every strictly-lower entry (zeros start at 0 but may move: every slope is kept until
            the last stage, and every stage point reads every earlier slope).
        weights: ``"fixed"``: ``b`` stays ``tableau.b``; ``"order"``: ``b = order_weights(A)``, the weights
            that satisfy the order conditions linear in ``b`` (:func:`order_weights`). A free ``b`` learned
            by the same meta-loss is not offered: the meta-loss is linear in ``b``, so its minimum over any
            normalized set of weights is a vertex (all weight on the stage of lowest query loss), and the
            learned scheme would collapse onto one stage. Tying ``b`` to ``A`` keeps it a consistent RK
            method (``sum b = 1``, ``b.c = 1/2``...) whatever ``A`` learns.
        dtype, device: of the learned tensor.
        lr: its outer learning rate (``None``: the optimizer's).

    Attributes:
        tensors: ``[entries]``: the one learned leaf tensor ``[E]``, in :attr:`entries` order.
        entries: the ``(j, m)`` positions of ``A`` it holds (0-based).
        structure: a fixed :class:`~rkfast.tableau.Tableau` with the pattern's non-zeros, from which the
            meta-step reads which slopes and query losses it computes (every stage's query loss with
            ``weights="order"``, whose ``b`` may move off zero).
        base: the starting tableau.
    """

    def __init__(
        self,
        tableau: Tableau,
        pattern: str = "pattern",
        weights: str = "fixed",
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        lr: float | None = None,
    ) -> None:
        if pattern not in TABLEAU_PATTERNS:
            raise ValueError(
                f"LearnedTableau pattern must be one of {', '.join(map(repr, TABLEAU_PATTERNS))}, got {pattern!r}"
            )
        if weights not in TABLEAU_WEIGHTS:
            raise ValueError(
                f"LearnedTableau weights must be one of {', '.join(map(repr, TABLEAU_WEIGHTS))}, got {weights!r}"
            )
        self.lr = _coefficient_lr("LearnedTableau", lr)
        s = tableau.stages
        below = [(j, m) for j in range(s) for m in range(j)]
        entries = below if pattern == "full" else [(j, m) for j, m in below if tableau.A[j][m] != 0.0]
        if not entries:
            raise ValueError(
                f"tableau {tableau.name!r} has no entry of A to learn (pattern={pattern!r}: "
                + ("a 1-stage scheme has none)" if s == 1 else "A is zero; use pattern='full')")
            )
        self.base, self.pattern, self.weights_mode = tableau, pattern, weights
        self.entries: tuple[tuple[int, int], ...] = tuple(entries)
        self.stages = s
        self.tensors: list[Tensor] = [
            torch.tensor([tableau.A[j][m] for j, m in entries], dtype=dtype, device=device).requires_grad_()
        ]
        self._flat_index_cpu = torch.tensor([j * s + m for j, m in entries], dtype=torch.long)
        self._dtype, self._device = dtype, torch.device(device)
        self._place()
        marked = [[1.0 if (j, m) in self.entries else 0.0 for m in range(s)] for j in range(s)]
        b_struct = tableau.b if weights == "fixed" else [1.0 / s] * s
        with warnings.catch_warnings():  # a fixed b that does not sum to 1 warned when the base was built
            warnings.simplefilter("ignore", InconsistentTableauWarning)
            self.structure = Tableau(tuple(map(tuple, marked)), tuple(b_struct), name=self.name)
        if weights == "order":
            self.weights(self.matrix().detach())  # the starting A must admit the weights (solvable, b >= 0)

    @property
    def name(self) -> str:
        return f"learned-{self.base.name}"

    @property
    def tensor(self) -> Tensor:
        return self.tensors[0]

    def _place(self) -> None:
        self._flat_index = self._flat_index_cpu.to(self._device)
        self._fixed_b = torch.tensor(self.base.b, dtype=torch.float64).to(self._device)  # kept on the device

    def matrix(self) -> Tensor:
        """``A [s, s]``: the learned entries at their positions, zeros elsewhere (differentiable)."""
        t = self.tensor
        flat = t.new_zeros(self.stages * self.stages).index_put((self._flat_index,), t)
        return flat.view(self.stages, self.stages)

    def weights(self, A: Tensor | None = None, check: bool = True) -> Tensor:
        """``b [s]`` for the stage matrix ``A`` (default: :meth:`matrix`), in ``A``'s dtype: the fixed
        weights, or :func:`order_weights` (differentiable in ``A``; ``check`` as there)."""
        A = self.matrix() if A is None else A
        if self.weights_mode == "fixed":
            return self._fixed_b.to(A.dtype)
        b = order_weights(A, check)
        # a negative weight rewards a larger query loss at its stage: the meta-loss is then unbounded below
        # (heun's c = A21 below 1/2 gives b1 < 0); refused, or under capture made non-finite (a skipped step)
        if check:
            if float(b.detach().min()) < -_NEGATIVE_WEIGHT_TOL:
                raise OrderConditionsError(
                    f"the learned tableau's weights b = {[round(x, 6) for x in b.detach().tolist()]} (from the order "
                    f"conditions at nodes c = {[round(x, 6) for x in A.detach().sum(1).tolist()]}) have a negative "
                    "entry: the meta-loss sum_j b_j L_j is then not bounded below (a negative weight rewards a larger "
                    "query loss at its stage) and training diverges. Keep b fixed (weights='fixed') or "
                    'lower the LearnedTableau lr (docs/method.md, "Learned tableaus")'
                )
        else:
            b = torch.where(b.min() < -_NEGATIVE_WEIGHT_TOL, torch.full_like(b, math.nan), b)
        return b.to(A.dtype)

    def current(self) -> Tableau:
        """The tableau at the current values (detached, float64 weights): what meta-test adaptation
        (:meth:`~rkfast.tableau.Tableau.test_step`) and the results report read."""
        with torch.no_grad():
            A = self.matrix().to(torch.float64)
            b = self.weights(A)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InconsistentTableauWarning)
            return Tableau.from_arrays(A.cpu(), b.cpu(), self.name)

    def reduce(self, grad_A: Tensor, grad_b: Tensor) -> list[Tensor]:
        """The gradient of :attr:`tensors` from gradients with respect to ``A [s, s]`` and ``b [s]`` (the
        chain through :meth:`weights` for ``"order"``)."""
        with torch.enable_grad():
            A = self.matrix()
            # the step that produced these gradients already checked the weights at these values
            total = (grad_A.to(A.dtype) * A).sum() + (grad_b.to(A.dtype) * self.weights(A, check=False)).sum()
            (g,) = torch.autograd.grad(total, self.tensors, allow_unused=True)
        return [torch.zeros_like(self.tensor) if g is None else g]

    def config(self) -> dict[str, Any]:
        return {
            "base": self.base.to_dict(),
            "pattern": self.pattern,
            "weights": self.weights_mode,
            "entries": [list(e) for e in self.entries],
        }

    _what = "learned tableau"
    key = "learned_tableau"
    lr_name = "tableau_lr"

    def _option(self) -> str:
        return f"LearnedTableau({self.base.name!r}, {self.pattern!r}, {self.weights_mode!r})"

    def check_update(self) -> None:
        """Updated entries must still give usable weights (solvable, none negative): checked after each outer
        update, so that the state a step leaves behind (and a checkpoint saves) always has them."""
        self.weights()

    def check_compatible(self, *, first_order: bool, captured: bool) -> None:
        """A captured step needs second order: the first-order step reads ``b`` on the host."""
        if first_order and captured:
            raise ValueError(
                "a learned tableau (LearnedTableau) with capture needs second order: the first-order "
                "step reads the tableau's weights b on the host, which a CUDA graph cannot replay. "
                "Use first_order=False or capture=False."
            )

    def summary(self, inner_lr: float) -> dict[str, Any]:
        """``pattern``, ``weights``, ``base`` (the starting tableau's name), ``entries`` (the learned ``(j, m)``
        positions of ``A``, 0-based), ``A`` and ``b`` now (:func:`tableau_summary`), its ``order`` and the
        meta-test ``test_step`` it gives at ``inner_lr``."""
        current = self.current()
        return {
            "pattern": self.pattern,
            "weights": self.weights_mode,
            "base": self.base.name,
            "entries": [list(e) for e in self.entries],
            **tableau_summary(current),
            "order": current.order,
            "test_step": _rate(current.test_step(inner_lr)),
        }

    def values(self) -> dict[str, Any]:
        """``{"A": [[...]], "b": [...]}``: the current tableau as plain lists (for logs and results)."""
        tab = self.current()
        return {"A": [list(r) for r in tab.A], "b": list(tab.b)}

    def __repr__(self) -> str:
        return (
            f"TableauCoefficients(base={self.base.name!r}, pattern={self.pattern!r}, "
            f"weights={self.weights_mode!r}, entries={list(self.entries)})"
        )


@dataclass(frozen=True)
class LearnedTableau:
    """A learned tableau: ``MetaOptimizer(..., tableau=LearnedTableau("rk4"))`` (``docs/api.md``, "Learned
    tableaus"; the math in ``docs/method.md``).

    Args:
        tableau: the starting tableau (a name or a :class:`~rkfast.tableau.Tableau`), whose stage count is kept.
        pattern: ``"pattern"``: its non-zero entries of ``A`` are learned (the step keeps its cost);
            ``"full"``: every entry below the diagonal.
        weights: ``"fixed"``: ``b`` stays the tableau's; ``"order"``: ``b = order_weights(A)`` follows ``A``.
        lr: the entries' outer learning rate (default: the optimizer's ``lr``).

    Raises:
        ValueError: an unknown pattern or weights, a bad ``lr``, a tableau with no entry to learn (``euler``),
            or (:class:`OrderConditionsError`) order weights the starting ``A`` does not admit.
    """

    tableau: Tableau | str
    pattern: str = "pattern"
    weights: str = "fixed"
    lr: float | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tableau", get_tableau(self.tableau))
        object.__setattr__(self, "lr", _coefficient_lr("LearnedTableau", self.lr))
        self.bind(torch.float64)  # everything the live tableau refuses, refused now

    @property
    def _base(self) -> Tableau:
        """``tableau`` as a :class:`~rkfast.tableau.Tableau` (a name is resolved when the spec is built)."""
        return get_tableau(self.tableau)  # a Tableau since __post_init__: returned as is

    def __repr__(self) -> str:
        return (
            f"LearnedTableau({self._base.name!r}, {self.pattern!r}, {self.weights!r}"
            + (f", lr={self.lr}" if self.lr is not None else "")
            + ")"
        )

    @property
    def name(self) -> str:
        """``"learned-<base name>"``: the name of the tableaus it produces."""
        return f"learned-{self._base.name}"

    def bind(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TableauCoefficients:
        """The live tableau: its learned entries as one leaf tensor of ``dtype`` on ``device``."""
        return TableauCoefficients(self._base, self.pattern, self.weights, dtype=dtype, device=device, lr=self.lr)

    def to_json(self) -> dict[str, Any]:
        """A plain-JSON form (:meth:`from_json` reads it back): the tableau by name when the name gives it back."""
        tab = self._base
        try:
            named: Any = tab.name if get_tableau(tab.name) == tab else tab.to_dict()
        except (ValueError, TypeError):
            named = tab.to_dict()
        return {"tableau": named, "pattern": self.pattern, "weights": self.weights, "lr": self.lr}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LearnedTableau:
        """Inverse of :meth:`to_json` (validated as the constructor validates)."""
        if isinstance(d, Mapping) and isinstance(d.get("tableau"), Mapping):
            d = {**d, "tableau": Tableau.from_dict(d["tableau"])}
        return _from_json(cls, d)
