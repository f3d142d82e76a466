"""The meta-parameters as views into one flat buffer, and their gradients as views into another.

Every kernel over the meta-parameters (stage points, the first-order reduction, the outer update) is then
one launch over all of them, and a meta-direction ``[N]`` is written to every ``.grad`` with one copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .layout import ParamLayout

__all__ = ["FlatParameters", "check_one_kind"]


def check_one_kind(params: Sequence[Tensor]) -> None:
    """Raise unless all ``params`` share one dtype and one device (one flat buffer holds them)."""
    kinds = {(p.dtype, p.device) for p in params}
    if len(kinds) > 1:
        raise TypeError(f"meta-parameters must share one dtype and device, got {sorted(map(str, kinds))}")


class FlatParameters:
    """Binds ``params`` to one contiguous buffer ``data [N]`` and their ``.grad`` to one buffer ``grad [N]``.

    The parameters stay the same ``Parameter`` objects (so a model, its ``state_dict`` and user code keep
    working); only their storage moves. If something later replaces a parameter's storage
    (``p.data = ...``, ``model.to(...)``), :meth:`replaced` says so and :meth:`rebind` copies the parameters into new
    buffers.

    Attributes:
        params: the parameters, in ``layout`` order.
        layout: where each parameter lives inside ``data``.
        data, grad: the flat value and gradient buffers.
    """

    def __init__(self, params: Sequence[nn.Parameter], layout: ParamLayout) -> None:
        if len(params) != len(layout.names):
            raise ValueError(f"{len(params)} parameters but a layout of {len(layout.names)}")
        check_one_kind(params)
        self.params = list(params)
        self.layout = layout
        self._bind()

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def _bind(self) -> None:
        """Copy the parameters (and any ``.grad``) into new flat buffers and make each a view into them.

        Outside inference mode even when called inside it (e.g. reading ``flat_parameters`` there): the
        buffers become the parameters' storage, and inference tensors could never be trained again."""
        with torch.inference_mode(False), torch.no_grad():
            self._bind_buffers()

    def _bind_buffers(self) -> None:
        params, numels = self.params, self.layout.numels
        first = params[0]
        data = torch.empty(self.layout.numel, dtype=first.dtype, device=first.device)
        grad = torch.zeros_like(data)
        values, grad_views = [], []
        for p, chunk, grad_chunk in zip(params, data.split(numels), grad.split(numels), strict=True):
            chunk.copy_(p.reshape(-1))
            values.append(chunk.view_as(p))
            grad_views.append(grad_chunk.view_as(p))
            if p.grad is not None:
                grad_chunk.copy_(p.grad.reshape(-1))
        for p, value, grad_view in zip(params, values, grad_views, strict=True):
            p.data = value  # same Parameter object, now backed by the flat buffer
            if p.grad is not None:
                p.grad = grad_view
        self.data, self.grad, self._grad_views = data, grad, grad_views
        self._addresses = [p.data_ptr() for p in params]

    def replaced(self) -> bool:
        """Whether something replaced a parameter's storage since the last binding."""
        return any(
            p.data_ptr() != a or p.dtype != self.data.dtype or p.device != self.data.device
            for p, a in zip(self.params, self._addresses, strict=True)
        )

    def check_rebind(self) -> None:
        """Raise, before anything changes, unless :meth:`rebind` can bind the parameters as they are now:
        one dtype and device, and every shape the layout's (the flat layout is fixed)."""
        check_one_kind(self.params)
        for name, p, shape in zip(self.layout.names, self.params, self.layout.shapes, strict=True):
            if p.shape != shape:
                raise ValueError(
                    f"parameter {name!r} changed shape from {tuple(shape)} to {tuple(p.shape)} after the optimizer "
                    "was built; its flat layout is fixed: build a new MetaOptimizer for the new shapes"
                )

    def rebind(self) -> None:
        """Bind again after :meth:`replaced`: the parameters' new values (dtype and device may differ) into
        new flat buffers (:meth:`check_rebind` first: nothing is re-bound if it raises)."""
        self.check_rebind()
        self._bind()

    def expose_grads(self) -> None:
        """Make every parameter's ``.grad`` its view into :attr:`grad` (``zero_grad`` may have unset them)."""
        for p, g in zip(self.params, self._grad_views, strict=True):
            if p.grad is not g:  # the setter checks shape, dtype and device: skipped when nothing changes
                p.grad = g

    def write_grad(self, direction: Tensor) -> None:
        """``.grad`` of every parameter = its slice of the flat ``direction [N]`` (one copy)."""
        self.grad.copy_(direction)
        self.expose_grads()

    def adopt_grads(self) -> None:
        """Bring edits of ``.grad`` back into :attr:`grad`, before an update that reads the flat buffer.

        In-place edits (``clip_grad_norm_``, ``mul_``) already land in the flat buffer. A ``.grad`` replaced
        by another tensor is copied in and becomes the view again; a ``.grad`` set to ``None`` reads as zero
        in the flat buffer and stays ``None`` (a torch optimizer then skips that parameter, as usual).
        """
        # every problem is reported before anything changes
        for p, view in zip(self.params, self._grad_views, strict=True):
            if p.grad is not None and p.grad.shape != view.shape:
                raise ValueError(f"a parameter of shape {tuple(view.shape)} has a .grad of shape {tuple(p.grad.shape)}")
        with torch.no_grad():
            for p, view in zip(self.params, self._grad_views, strict=True):
                if p.grad is None:
                    view.zero_()
                elif p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
                    p.grad = view
