"""The outer update: what consumes the meta-direction in ``.grad`` and moves the meta-parameters.

``"sgd"`` without momentum or weight decay is the plain step ``theta <- theta - lr * d`` of the method, one
fused ``axpy_`` over the flat buffer; anything else is a ``torch.optim`` optimizer (torch's fused
implementation for SGD/Adam/AdamW unless the user chose).

"A failed step changes nothing" has two forms here. :meth:`OuterUpdate.transaction` is the eager one: it
saves what an update may change (parameters, ``.grad``, the optimizer's state and groups) into buffers kept
between steps, and restores all of it if the update, or a check after it, raises. :meth:`OuterUpdate.update_if`
is the device-side one, for steps replayed from a CUDA graph, where raising would need a host
synchronization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .flat import FlatParameters
from .results import MetaStepOutput, NonFiniteLossError

__all__ = [
    "OUTER_OPTIMIZERS",
    "outer_class",
    "make_outer_optimizer",
    "check_lr",
    "OuterUpdate",
    "UpdateSnapshot",
    "guarded_update",
    "written_tensors",
    "state_tensors",
    "cast_state_to_params",
    "all_finite",
    "finite_probe",
    "non_finite_direction_error",
    "NON_FINITE_GRAD",
]

NON_FINITE_GRAD = "non-finite .grad; parameters, .grad and optimizer state were left unchanged"

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


def check_lr(value: Any, where: str = "lr") -> None:
    """Raise ``ValueError`` unless the learning rate ``value`` is a finite, non-negative number.

    torch refuses a negative lr, but takes NaN (SGD) and infinity (every optimizer), which turn the
    parameters non-finite at the first update."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one element
        raise ValueError(f"{where} must be a finite, non-negative number, got {value!r}") from None
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{where} must be a finite, non-negative number, got {number}")


def make_outer_optimizer(
    cls: type[torch.optim.Optimizer], params: Any, lr: float, kwargs: dict[str, Any], capturable: bool = False
) -> torch.optim.Optimizer:
    """The outer optimizer; torch's fused implementation for SGD/Adam/AdamW unless the caller chose, and
    Adam/AdamW with ``capturable=True`` (its step counter on the device) for a step replayed from a graph.

    Raises ``ValueError`` for a non-finite or negative ``lr``, the default's or a param group's."""
    check_lr(lr)
    optimizer = _construct(cls, params, lr, kwargs, capturable)
    for i, group in enumerate(optimizer.param_groups):
        if "lr" in group:
            check_lr(group["lr"], f"lr of param group {i}")
    return optimizer


def _construct(
    cls: Callable[..., torch.optim.Optimizer], params: Any, lr: float, kwargs: dict[str, Any], capturable: bool
) -> torch.optim.Optimizer:
    # Callable, not type[Optimizer]: the base class's __init__ takes no lr, every subclass this builds does
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
        extra: other leaf tensors the optimizer updates beside ``flat.params`` (the learned coefficients,
            :mod:`rkfast.learned`); a failed transaction restores them too.
        checks: called after each checked update (:meth:`checked_update`); one that raises undoes it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        flat: FlatParameters,
        extra: Sequence[Tensor] = (),
        checks: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.optimizer = optimizer
        self.flat = flat
        self.extra = list(extra)
        self.checks = list(checks)
        self._snapshot = UpdateSnapshot(optimizer, flat, extra)

    def write_grads(self, direction: Tensor, extra: Sequence[Tensor]) -> None:
        """The meta-direction into every ``.grad``: the parameters' flat buffer and the extra tensors'."""
        self.flat.write_grad(direction)
        for t, d in zip(self.extra, extra, strict=True):
            t.grad = d

    def checked_update(
        self,
        set_grad: Callable[[], None],
        inputs: Sequence[Tensor | None],
        direction_error: Callable[[], NonFiniteLossError],
        *,
        check_finite: bool,
        backend: kernels.Backend = "auto",
    ) -> None:
        """``set_grad()`` (the new ``.grad``), :meth:`update` and the :attr:`checks` as one :meth:`transaction`:
        any exception, and with ``check_finite`` non-finite ``inputs`` (the direction, the loss) or non-finite
        updated parameters, restores everything and raises (``direction_error()`` for the inputs).

        The finiteness of the inputs and of the result is read once, after the update (the step's one host
        synchronization, of one :func:`finite_probe` of everything): a non-finite direction makes the update
        produce garbage, which is then undone."""
        with self.transaction():
            set_grad()
            inputs_probe = finite_probe(*inputs) if check_finite else None  # on the device: no sync yet
            try:
                self.update(backend)
            except Exception as err:
                # an optimizer that refuses a non-finite gradient itself: report what was non-finite
                if inputs_probe is not None and not _inputs_finite(inputs_probe, inputs):
                    raise direction_error() from err
                raise
            if inputs_probe is not None:
                self._raise_if_non_finite(inputs_probe, inputs, direction_error)
            for check in self.checks:
                check()

    def _raise_if_non_finite(
        self, inputs_probe: Tensor, inputs: Sequence[Tensor | None], direction_error: Callable[[], NonFiniteLossError]
    ) -> None:
        """Raise ``direction_error()`` for non-finite ``inputs``, else the update's error for non-finite
        updated parameters: one host read of the sum of both probes, and a closer look only when that is
        not finite (a non-finite entry, or finite values whose sum overflowed)."""
        total = inputs_probe + finite_probe(self.flat.data, *self.extra)
        if bool(total.isfinite()):  # the one sync
            return
        if not _inputs_finite(inputs_probe, inputs):
            raise direction_error()
        if not bool(all_finite(self.flat.data, *self.extra)):
            raise _non_finite_update_error(self.optimizer)

    def guarded_step(
        self, direction: Tensor, extra: Sequence[Tensor], ok: Tensor, backend: kernels.Backend = "auto"
    ) -> None:
        """The update of a step replayed from a CUDA graph: where the 0-d boolean ``ok`` is false, a zero
        ``.grad`` and every parameter and state tensor kept (:meth:`update_if`); no host synchronization."""
        self.write_grads(torch.where(ok, direction, 0.0), [torch.where(ok, d, 0.0) for d in extra])
        self.update_if(ok, backend)

    def plain_sgd(self) -> bool:
        """``theta <- theta - lr * d`` over the whole flat buffer: SGD with one group and no extras."""
        groups = self.optimizer.param_groups
        if type(self.optimizer) is not torch.optim.SGD or len(groups) != 1:
            return False
        group = groups[0]
        return (
            group["momentum"] == 0
            and group["weight_decay"] == 0
            and not group.get("maximize", False)
            and len(group["params"]) == len(self.flat.params)
        )

    def update(self, backend: kernels.Backend = "auto") -> None:
        """One outer step from the current ``.grad`` (``backend`` runs the plain-SGD ``axpy_``)."""
        if self.plain_sgd():
            lr = float(self.optimizer.param_groups[0]["lr"])
            kernels.axpy_(self.flat.data, self.flat.grad, -lr, backend=backend)
        else:
            self.optimizer.step()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block (new ``.grad``, :meth:`update`, checks) as one transaction: if it raises anything,
        the parameters, the gradient buffer and every ``.grad``, the optimizer's state and its groups are
        put back as they were before it, and the exception propagates. No host synchronization."""
        self._snapshot.save()
        try:
            yield
        except BaseException:
            self._snapshot.restore()
            raise
        finally:
            self._snapshot.forget()

    def update_if(self, ok: Tensor, backend: kernels.Backend = "auto") -> None:
        """:meth:`update`, then every parameter and optimizer-state tensor (the extra tensors' and their state
        included) keeps its old value where the 0-d boolean ``ok`` is false; no host synchronization (the
        caller zeroes ``.grad`` of a skipped step)."""
        guarded = [*written_tensors(self.optimizer, self.flat), *self.extra, *state_tensors(self.optimizer, self.extra)]
        guarded_update(ok, guarded, lambda: self.update(backend))


def all_finite(*tensors: Tensor | None) -> Tensor:
    """A 0-d device boolean: every element of every given tensor is finite (reading it synchronizes)."""
    checks = [torch.isfinite(t).all() for t in tensors if t is not None]
    ok = checks[0]
    for check in checks[1:]:
        ok = ok & check
    return ok


def finite_probe(*tensors: Tensor | None) -> Tensor:
    """A 0-d device value that is finite only if every element of every given tensor is finite: the sum of
    all of them (no sum over a NaN or an infinity is finite). Cheaper than :func:`all_finite` (one
    reduction per tensor, nothing else), but finite values whose sum overflows make it non-finite too: a
    non-finite probe calls for :func:`all_finite`."""
    with torch.no_grad():
        sums = [t if t.dim() == 0 else t.sum() for t in tensors if t is not None]
        total = sums[0]
        for s in sums[1:]:
            total = total + s
    return total


def _inputs_finite(probe: Tensor, inputs: Sequence[Tensor | None]) -> bool:
    """Whether every entry of ``inputs`` is finite, given their :func:`finite_probe` taken before the update
    (a finite probe decides; otherwise the entries are checked, as the update left them: it reads
    ``.grad``, it does not write it)."""
    return bool(probe.isfinite()) or bool(all_finite(*inputs))


def non_finite_direction_error(out: MetaStepOutput, note: str = "") -> NonFiniteLossError:
    """The error of a step whose meta-loss or meta-direction is non-finite (``note``: where it was reduced)."""
    stages = {j: float(v) for j, v in out.stage_losses.items()}
    return NonFiniteLossError(
        f"non-finite meta-loss {float(out.loss)} (query loss per stage: {stages}) or meta-direction{note}; "
        "parameters and optimizer state were left unchanged. Lower inner_lr or lr, or check the batch."
    )


def _non_finite_update_error(optimizer: torch.optim.Optimizer) -> NonFiniteLossError:
    lrs = [group.get("lr") for group in optimizer.param_groups]
    lr = f"lr={lrs[0]}" if len(lrs) == 1 else f"lr per param group={lrs}"
    return NonFiniteLossError(
        f"the outer update ({type(optimizer).__name__}, {lr}) produced non-finite parameters although the "
        "meta-direction (.grad) was finite; parameters, .grad and optimizer state were restored. Check the "
        "outer optimizer's learning rate and settings (a scheduler or an edit of param_groups may have set them)."
    )


class UpdateSnapshot:
    """What an outer update may change, saved so that a failed one can be undone exactly.

    Tensor values (the flat parameters and gradient, every state tensor) are copied into buffers kept between
    steps, one multi-tensor copy per dtype and device; a buffer is re-allocated only when the tensor in its
    place changes shape, dtype or device (the first step creates Adam's moments, a re-bind changes the
    dtype), so steady-state steps allocate no tensors. The structure is saved by reference: which
    ``Tensor`` is each ``.grad`` (or ``None``), which state entries each parameter has (or none yet: a
    failed first step must not leave empty moments behind), and each param group's settings. Restoring puts
    the same objects back and copies the saved values into them, so an update that writes in place and one
    that replaces state tensors are both undone.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, flat: FlatParameters, extra: Sequence[Tensor] = ()) -> None:
        self.optimizer, self.flat = optimizer, flat
        self.extra = list(extra)  # leaf tensors outside the flat buffer: values and .grad saved one by one
        self._buffers: list[Tensor] = []
        self._forget_structure()

    def _forget_structure(self) -> None:
        self._tensors: list[Tensor] = []
        self._kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}  # positions of _tensors, by_kind
        self._grads: list[Tensor | None] = []
        self._state: list[tuple[Tensor, dict[str, Any] | None, dict[str, Any]]] = []
        self._groups: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def save(self) -> None:
        """Save the current parameters, gradients, optimizer state and groups."""
        state = self.optimizer.state
        params = [*self.flat.params, *self.extra]
        self._grads = [p.grad for p in params]
        self._state = [(p, state.get(p), dict(state.get(p, {}))) for p in params]
        self._groups = [(group, dict(group)) for group in self.optimizer.param_groups]
        extra_grads = [g for g in self._grads[len(self.flat.params) :] if g is not None]
        self._tensors = [
            self.flat.grad,
            *written_tensors(self.optimizer, self.flat),
            *self.extra,
            *extra_grads,
            *state_tensors(self.optimizer, self.extra),
        ]
        self._buffers, self._kinds = _buffers_for(self._buffers, self._tensors)
        copy_all(self._buffers, self._tensors, self._kinds)

    def restore(self) -> None:
        """Put back exactly what :meth:`save` saw."""
        groups = self.optimizer.param_groups
        groups[:] = [group for group, _ in self._groups]
        for group, settings in self._groups:
            group.clear()
            group.update(settings)
        state = self.optimizer.state
        for p, entries, items in self._state:
            if entries is None:
                state.pop(p, None)  # no state before this update
            else:
                entries.clear()
                entries.update(items)
                state[p] = entries
        copy_all(self._tensors, self._buffers, self._kinds)
        for p, g in zip([*self.flat.params, *self.extra], self._grads, strict=True):
            p.grad = g

    def forget(self) -> None:
        """Drop the references to the saved objects (the buffers are kept for the next :meth:`save`)."""
        self._forget_structure()


def _buffers_for(
    buffers: list[Tensor], tensors: list[Tensor]
) -> tuple[list[Tensor], dict[tuple[torch.dtype, torch.device], list[int]]]:
    """A buffer for each of ``tensors`` (the one in its place in ``buffers`` if it can hold the value, else a
    new one) and their positions grouped by dtype and device (:func:`by_kind`), found in one pass."""
    out: list[Tensor] = []
    kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        dtype, device = t.dtype, t.device
        buffer = buffers[i] if i < len(buffers) else None
        if buffer is None or buffer.dtype != dtype or buffer.device != device or buffer.shape != t.shape:
            buffer = torch.empty_like(t, memory_format=torch.contiguous_format)
        out.append(buffer)
        kinds.setdefault((dtype, device), []).append(i)
    return out, kinds


def by_kind(tensors: list[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """The positions of ``tensors`` grouped by dtype and device: what one multi-tensor kernel takes."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def copy_all(
    dst: list[Tensor], src: list[Tensor], kinds: dict[tuple[torch.dtype, torch.device], list[int]] | None = None
) -> None:
    """``dst[i].copy_(src[i])`` for every ``i``: one multi-tensor copy per dtype and device (``kinds``: the
    positions grouped so, :func:`by_kind` of ``dst`` when not given)."""
    with torch.no_grad():
        for positions in (by_kind(dst) if kinds is None else kinds).values():
            torch._foreach_copy_([dst[i] for i in positions], [src[i] for i in positions])


def guarded_update(ok: Tensor, tensors: list[Tensor], update: Callable[[], None]) -> None:
    """Run ``update`` (in place on ``tensors``), then put back every tensor's old value where ``ok`` is false.

    ``t = t_new * ok + t_old * (1 - ok)`` with multi-tensor (foreach) kernels: three launches per dtype
    however many tensors (parameters, moments, step counters) there are, instead of a ``clone``/``where``/
    ``copy_`` per tensor. Exact: ``x * 1 + y * 0 == x`` for finite values, and both sides are finite (the
    old state was committed as finite, and the caller runs a skipped ``update`` on a zero gradient).
    """
    groups = {key: [tensors[i] for i in positions] for key, positions in by_kind(tensors).items()}
    with torch.no_grad():  # leaf tensors that require grad (learned rates) are written in place
        kept = {key: torch._foreach_mul(group, (~ok).to(key[0])) for key, group in groups.items()}  # t_old * (1 - ok)
    update()
    with torch.no_grad():
        for key, group in groups.items():
            torch._foreach_mul_(group, ok.to(key[0]))
            torch._foreach_add_(group, kept[key])


def written_tensors(optimizer: torch.optim.Optimizer, flat: FlatParameters) -> list[Tensor]:
    """The tensors an outer update writes in place: the flat parameters and the optimizer's state tensors
    (what :func:`guarded_update` guards on the device and :class:`UpdateSnapshot` saves on the host)."""
    return [flat.data, *state_tensors(optimizer, flat.params)]


def state_tensors(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor]:
    """The tensors of ``optimizer``'s state for ``params`` (moments, step counters...)."""
    out = []
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, Tensor):
                out.append(value)
    return out


def cast_state_to_params(optimizer: torch.optim.Optimizer) -> None:
    """Cast ``optimizer``'s state to its parameters' current dtype and device (after ``model.to(...)``).

    Through ``load_state_dict``, which casts exactly as torch does when resuming: floating-point state to the
    parameter's dtype and device, and Adam's ``step`` kept as it is, except for fused and capturable
    optimizers, which keep it as a float32 tensor on the parameter's device. ``optimizer.state`` and
    ``optimizer.param_groups`` are new objects afterwards; their contents are the same.
    """
    optimizer.load_state_dict(optimizer.state_dict())
