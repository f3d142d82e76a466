"""The outer update: what consumes the meta-direction in ``.grad`` and moves the meta-parameters.

``"sgd"`` without momentum or weight decay is the plain step ``theta <- theta - lr * d`` of the method, one
fused ``axpy_`` over the flat buffer; anything else is a ``torch.optim`` optimizer (torch's fused
implementation for SGD/Adam/AdamW unless the user chose). :meth:`OuterUpdate.update_if` is the device-side
form of "a failed step changes nothing", for steps replayed from a CUDA graph, where raising would need a
host synchronization.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from . import kernels
from .flat import FlatParameters

__all__ = ["OUTER_OPTIMIZERS", "outer_class", "make_outer_optimizer", "OuterUpdate", "guarded_update", "state_tensors"]

OUTER_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def outer_class(outer: str | type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """The optimizer class of ``outer``: a name of :data:`OUTER_OPTIMIZERS` or a ``torch.optim.Optimizer`` subclass."""
    if isinstance(outer, str):
        try:
            return OUTER_OPTIMIZERS[outer.lower()]
        except KeyError:
            raise ValueError(
                f"unknown outer optimizer {outer!r}; use one of {', '.join(OUTER_OPTIMIZERS)} "
                "or a torch.optim.Optimizer subclass"
            ) from None
    if isinstance(outer, type) and issubclass(outer, torch.optim.Optimizer):
        return outer
    raise TypeError(f"outer must be a name or a torch.optim.Optimizer subclass, got {outer!r}")


def make_outer_optimizer(cls: type[torch.optim.Optimizer], params: Any, lr: float, kwargs: dict[str, Any],
                         capturable: bool = False) -> torch.optim.Optimizer:
    """The outer optimizer; torch's fused implementation for SGD/Adam/AdamW unless the caller chose, and
    Adam/AdamW with ``capturable=True`` (its step counter on the device) for a step replayed from a graph."""
    if capturable and cls in (torch.optim.Adam, torch.optim.AdamW):
        if kwargs.get("capturable") is False:
            raise ValueError("a captured step needs a capturable outer optimizer; drop capturable=False")
        kwargs = {**kwargs, "capturable": True}
    if cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW) and not {"fused", "foreach"} & set(kwargs):
        params = list(params)
        try:
            return cls(params, lr=lr, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):  # a device or dtype the fused kernel does not take
            pass
    return cls(params, lr=lr, **kwargs)


class OuterUpdate:
    """Applies the meta-direction in ``flat.grad`` to ``flat.data`` with ``optimizer``'s rule.

    Args:
        optimizer: the outer ``torch.optim`` optimizer over ``flat.params`` (its param groups and state are
            the ones the user's schedulers and ``state_dict`` see).
        flat: the flat parameter and gradient buffers.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, flat: FlatParameters) -> None:
        self.optimizer = optimizer
        self.flat = flat

    def plain_sgd(self) -> bool:
        """``theta <- theta - lr * d`` over the whole flat buffer: SGD with one group and no extras."""
        groups = self.optimizer.param_groups
        if type(self.optimizer) is not torch.optim.SGD or len(groups) != 1:
            return False
        group = groups[0]
        return (group["momentum"] == 0 and group["weight_decay"] == 0 and not group.get("maximize", False)
                and len(group["params"]) == len(self.flat.params))

    def update(self, backend: kernels.Backend = "auto") -> None:
        """One outer step from the current ``.grad`` (``backend`` runs the plain-SGD ``axpy_``)."""
        if self.plain_sgd():
            lr = float(self.optimizer.param_groups[0]["lr"])
            kernels.axpy_(self.flat.data, self.flat.grad, -lr, backend=backend)
        else:
            self.optimizer.step()

    def update_if(self, ok: Tensor, backend: kernels.Backend = "auto") -> None:
        """:meth:`update`, then every parameter and optimizer-state tensor keeps its old value where the 0-d
        boolean ``ok`` is false; no host synchronization (the caller zeroes ``.grad`` of a skipped step)."""
        guarded_update(ok, [self.flat.data, *state_tensors(self.optimizer, self.flat.params)],
                       lambda: self.update(backend))


def guarded_update(ok: Tensor, tensors: list[Tensor], update: Callable[[], None]) -> None:
    """Run ``update`` (in place on ``tensors``), then put back every tensor's old value where ``ok`` is false.

    ``t = t_new * ok + t_old * (1 - ok)`` with multi-tensor (foreach) kernels: three launches per dtype
    however many tensors (parameters, moments, step counters) there are, instead of a ``clone``/``where``/
    ``copy_`` per tensor. Exact: ``x * 1 + y * 0 == x`` for finite values, and both sides are finite (the
    old state was committed as finite, and the caller runs a skipped ``update`` on a zero gradient).
    """
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    kept = {key: torch._foreach_mul(group, (~ok).to(key[0])) for key, group in groups.items()}  # t_old * (1 - ok)
    update()
    for key, group in groups.items():
        torch._foreach_mul_(group, ok.to(key[0]))
        torch._foreach_add_(group, kept[key])


def state_tensors(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor]:
    """The tensors of ``optimizer``'s state for ``params`` (moments, step counters...)."""
    out = []
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, Tensor):
                out.append(value)
    return out
