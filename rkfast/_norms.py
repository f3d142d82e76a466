"""Normalization layers written out in elementary ops, for code that runs under ``vmap``.

PyTorch's batching rules for the fused ``batch_norm``/``layer_norm`` backward give wrong input gradients
under ``vmap(grad(...))`` (pytorch/functorch#534): a second-order MAML direction through batch, instance
or layer norm disagrees with finite differences, so a second-order meta-gradient through a normalized model
would be silently wrong (``docs/method.md``, "Normalization layers"). Inside
:func:`elementary_norms`, ``F.batch_norm``, ``F.instance_norm`` and ``F.layer_norm`` are computed from
means, variances and elementwise ops, whose batching rules and derivatives are exact.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["elementary_norms"]


def _normalize(x: Tensor, dims: Sequence[int], eps: float) -> Tensor:
    mean = x.mean(dim=tuple(dims), keepdim=True)
    var = x.var(dim=tuple(dims), correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Sequence[int]) -> Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5) -> Tensor | None:
    if training and running_mean is not None:
        return None  # running statistics are updated in place: only the fused op does that
    if training or running_mean is None:
        y = _normalize(x, [0, *range(2, x.dim())], eps)
    else:
        shape = _channel_shape(x)
        y = (x - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine(y, weight, bias, _channel_shape(x))


def _instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                   momentum=0.1, eps=1e-5) -> Tensor | None:
    if not use_input_stats or running_mean is not None:
        return None
    return _affine(_normalize(x, range(2, x.dim()), eps), weight, bias, _channel_shape(x))


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5) -> Tensor:
    dims = range(x.dim() - len(normalized_shape), x.dim())
    return _affine(_normalize(x, dims, eps), weight, bias, list(normalized_shape))


_ELEMENTARY: dict[Callable, Callable[..., Tensor | None]] = {
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
    F.layer_norm: _layer_norm,
}


class _ElementaryNorms(TorchFunctionMode):
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        replacement = _ELEMENTARY.get(func)
        if replacement is not None:
            out = replacement(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def elementary_norms() -> Iterator[None]:
    """Within the block, normalization functionals run as elementary (vmap-exact) ops."""
    with _ElementaryNorms():
        yield
