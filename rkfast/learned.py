"""Learned inner rates: Meta-SGD, MAML++ per-layer per-step rates and ANIL (``docs/method.md``, "Learned
inner rates").

With learned rates the stage points of a meta-step are

    theta_i^(j) = theta - sum_{l<j} A[j][l] * (r_l ⊙ k_i^(l))

where ``r_l`` is a vector ``[N]`` over the flat meta-parameters: the one set of rates ``r``, or with
per-stage rates the set of slope ``l`` (the rate of the step that slope ``l`` takes; for ``maml(k)`` set
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
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor

from .layout import ParamLayout
from .results import MetaStepOutput

__all__ = ["GRANULARITIES", "Granularity", "LearnedRates", "RatesStepOutput", "resolve_frozen"]

Granularity = Literal["scalar", "tensor", "element"]
GRANULARITIES: tuple[str, ...] = ("scalar", "tensor", "element")


class RatesStepOutput(MetaStepOutput):
    """A :class:`~rkfast.results.MetaStepOutput` that also carries the meta-direction of the learned rate
    tensors (``rate_directions``, one per tensor of :attr:`LearnedRates.tensors`, detached)."""

    def __init__(self, out: MetaStepOutput, rate_directions: list[Tensor]) -> None:
        super().__init__(out.direction, out.loss, out.stage_losses, out.stage_metrics)
        self.rate_directions = rate_directions


def resolve_frozen(layout: ParamLayout, frozen: Mapping[str, float] | None) -> dict[str, float]:
    """``{parameter name: fixed rate}`` from ``{name or glob pattern: rate}`` (``fnmatch``, case-sensitive).

    Raises ``ValueError`` for a pattern that matches no meta-parameter, a rate that is not a finite number,
    or a tensor matched by two patterns with different rates; ``TypeError`` for a non-mapping."""
    if frozen is None:
        return {}
    if not isinstance(frozen, Mapping):
        raise TypeError(f"frozen_rates must be a mapping {{name or glob: rate}}, got {type(frozen).__name__}")
    out: dict[str, float] = {}
    for pattern, value in frozen.items():
        if not isinstance(pattern, str):
            raise TypeError(f"frozen_rates keys must be parameter names or glob patterns, got {pattern!r}")
        if isinstance(value, (bool, str, bytes)):
            raise ValueError(f"frozen_rates[{pattern!r}] must be a finite number, got {value!r}")
        try:
            rate = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"frozen_rates[{pattern!r}] must be a finite number, got {value!r}") from None
        if not math.isfinite(rate):
            raise ValueError(f"frozen_rates[{pattern!r}] must be a finite number, got {value!r}")
        matched = [n for n in layout.names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"frozen_rates pattern {pattern!r} matches no meta-parameter; the names are "
                             f"{list(layout.names)}")
        for name in matched:
            if name in out and out[name] != rate:
                raise ValueError(f"frozen_rates gives parameter {name!r} two rates, {out[name]} and {rate}")
            out[name] = rate
    return out


class LearnedRates:
    """The inner rates of a meta-step: learned tensors at a granularity, per stage or not, and fixed rates.

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

    Attributes:
        tensors: the learned leaf tensors (empty for ``granularity=None``): ``[sets]`` for ``"scalar"``,
            ``[sets, P]`` for ``"tensor"`` (``P`` the learned, i.e. not frozen, parameter tensors, in layout
            order), ``[sets, N_l]`` for ``"element"`` (``N_l`` their elements, in flat order).
        frozen: ``{parameter name: fixed rate}``; learned_names: the parameter tensors whose rates are learned.
        sets: the number of rate sets.
    """

    def __init__(self, layout: ParamLayout, inner_lr: float, granularity: Granularity | None = None, *,
                 per_stage: bool = False, stages: int = 2, frozen: Mapping[str, float] | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if granularity is not None and granularity not in GRANULARITIES:
            raise ValueError(f"learn_rates must be one of {GRANULARITIES} or None, got {granularity!r}")
        self.layout = layout
        self.inner_lr = float(inner_lr)
        self.granularity = granularity
        self.per_stage = bool(per_stage)
        self.sets = max(1, int(stages) - 1) if self.per_stage else 1
        self.frozen = resolve_frozen(layout, frozen)
        self.learned_names = tuple(n for n in layout.names if n not in self.frozen)
        if granularity is not None and not self.learned_names:
            raise ValueError("frozen_rates freezes every meta-parameter tensor: there is no rate left to learn "
                             "(use learn_rates=None for fixed rates only)")
        numels = dict(zip(layout.names, layout.numels))
        width = {"scalar": 1, "tensor": len(self.learned_names),
                 "element": sum(numels[n] for n in self.learned_names), None: 1}[granularity]
        self.tensors: list[Tensor] = []
        if granularity is not None:
            shape = (self.sets,) if granularity == "scalar" else (self.sets, width)
            self.tensors.append(torch.full(shape, self.inner_lr, dtype=dtype, device=device).requires_grad_())
        # vector(set) = cat([learned row (width), frozen rates])[index]
        self._width = width
        self._frozen_values = [self.frozen[n] for n in layout.names if n in self.frozen]
        index: list[Tensor] = []
        learned_k, offset, frozen_k = 0, 0, 0
        for name, numel in zip(layout.names, layout.numels):
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
        self._index = self._index_cpu.to(self._device)

    @property
    def learned(self) -> bool:
        """Whether any rate is learned (``granularity`` is not ``None``)."""
        return bool(self.tensors)

    def to_(self, dtype: torch.dtype, device: torch.device) -> None:
        """Move the learned tensors (in place: the same tensor objects) to ``dtype`` and ``device``."""
        with torch.no_grad():
            for t in self.tensors:
                t.data = t.data.to(dtype=dtype, device=device)
                if t.grad is not None:
                    t.grad = t.grad.to(dtype=dtype, device=device)
        self._dtype, self._device = dtype, torch.device(device)
        self._index = self._index_cpu.to(self._device)

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
            row = torch.cat([row, row.new_tensor(self._frozen_values)])
        return row.index_select(0, self._index)

    def fixed_vector(self) -> Tensor:
        """``[N]``: ``inner_lr`` at every tensor that is not frozen and the fixed rate at the frozen ones (what
        the rates are at initialization)."""
        table = torch.tensor([self.inner_lr] * 1 + self._frozen_values, dtype=self._dtype, device=self._device)
        index = torch.where(self._index >= self._width, self._index - self._width + 1, 0)
        return table.index_select(0, index)

    def values(self) -> dict[str, Tensor]:
        """``{parameter name: rates}`` (detached copies), each of shape ``[sets]``, or ``[sets, *shape]`` for
        ``"element"`` granularity; frozen and unlearned tensors included (their constant rate)."""
        with torch.no_grad():
            rows = torch.stack([self.vector(s).detach() for s in range(self.sets)])  # [sets, N]
        out = {}
        offset = 0
        for name, shape, numel in zip(self.layout.names, self.layout.shapes, self.layout.numels):
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
        return [torch.zeros_like(t) if g is None else g for t, g in zip(self.tensors, grads)]

    def config(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "per_stage": self.per_stage, "sets": self.sets,
                "frozen": dict(self.frozen)}

    def state(self) -> dict[str, Any]:
        """What ``MetaOptimizer.state_dict`` saves: the configuration and the learned values (copies)."""
        return {**self.config(), "values": [t.detach().clone() for t in self.tensors]}

    def check_state(self, state: Any) -> list[Tensor]:
        """The values of a :meth:`state`, checked against this configuration (``ValueError`` otherwise)."""
        if not isinstance(state, Mapping):
            raise ValueError("the state dict has no learned rates, but this MetaOptimizer has "
                             f"learn_rates={self.granularity!r}, frozen_rates={self.frozen}")
        theirs = {k: state.get(k) for k in self.config()}
        if theirs != self.config():
            raise ValueError(f"the state dict's learned rates are configured as {theirs}, this MetaOptimizer's as "
                             f"{self.config()}")
        values = list(state.get("values", ()))
        if len(values) != len(self.tensors) or any(
                not isinstance(v, Tensor) or v.shape != t.shape for v, t in zip(values, self.tensors)):
            raise ValueError("the state dict's learned rate values do not match this MetaOptimizer's rate tensors "
                             f"({[tuple(t.shape) for t in self.tensors]})")
        return values

    def load(self, values: Sequence[Tensor]) -> None:
        with torch.no_grad():
            for t, v in zip(self.tensors, values):
                t.copy_(v)

    def __repr__(self) -> str:
        return (f"LearnedRates(granularity={self.granularity!r}, per_stage={self.per_stage}, sets={self.sets}, "
                f"frozen={self.frozen})")
