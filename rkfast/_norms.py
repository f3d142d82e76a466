"""Normalization layers that stay exact under ``vmap`` for second-order gradients.

PyTorch's batching rule for the fused ``batch_norm`` backward gives wrong input gradients under
``vmap(grad(...))`` (pytorch/functorch#534): a second-order MAML direction through BatchNorm disagrees with
finite differences (measured: ~1e-2 relative on a conv4 direction), so a second-order meta-gradient through
a normalized model would be silently wrong (``docs/method.md``, "Normalization layers").

Inside :func:`exact_norms`, ``F.batch_norm`` (batch statistics), ``F.instance_norm`` and ``F.layer_norm`` are
computed by ``F.group_norm``, whose batching rule folds the task dimension into group norm's batch
dimension, so each task keeps its own statistics, and whose derivatives of every order are exact under
``vmap`` (tested against the sequential path and finite differences):

* batch norm of ``x [B, C, *]``: the per-channel statistics over ``B`` and ``*`` are group norm with ``C``
  groups of a ``[1, C, B * prod(*)]`` view (channel first);
* instance norm: group norm with ``C`` groups, as it is;
* layer norm over the trailing ``D`` elements: group norm with one group of a ``[M, 1, D]`` view.

A fused kernel per norm (statistics, normalization and affine in one or two passes) does the work of the
several elementwise passes of the same formulas written in elementary ops (:func:`reference_norms`, kept
as the reference the tests compare with).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["exact_norms", "reference_norms"]

Normalize = Callable[[Tensor, Sequence[int], float], Tensor]
"""``normalize(x, dims, eps)``: ``(x - mean) / sqrt(var + eps)`` with the statistics over ``dims``."""


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Sequence[int]) -> Tensor:
    if weight is not None and bias is not None:
        return torch.addcmul(bias.reshape(shape), y, weight.reshape(shape))  # one pass instead of two
    if weight is not None:
        return y * weight.reshape(shape)
    if bias is not None:
        return y + bias.reshape(shape)
    return y


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


# -- normalization: the reference in elementary ops, and group norm ---------------------------------------


def _elementary(x: Tensor, dims: Sequence[int], eps: float) -> Tensor:
    mean = x.mean(dim=tuple(dims), keepdim=True)
    var = x.var(dim=tuple(dims), correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _group_norm(x: Tensor, dims: Sequence[int], eps: float) -> Tensor:
    normalized = {d % x.dim() for d in dims}
    kept = [d for d in range(x.dim()) if d not in normalized]
    if x.numel() == 0:
        return _elementary(x, dims, eps)
    if kept == [1]:  # batch norm: statistics per channel over the batch and space
        moved = x.movedim(1, 0)  # [C, B, *]
        channels = x.shape[1]
        y = F.group_norm(moved.reshape(1, channels, -1), channels, eps=eps)
        return y.reshape(moved.shape).movedim(0, 1)
    if kept == [0, 1] and x.dim() > 2:  # instance norm: per sample and channel over space
        return F.group_norm(x, x.shape[1], eps=eps)
    if kept == list(range(len(kept))):  # layer norm: over the trailing dims
        trailing = math.prod(x.shape[len(kept) :])
        return F.group_norm(x.reshape(-1, 1, trailing), 1, eps=eps).reshape(x.shape)
    return _elementary(x, dims, eps)


# -- the three functionals, with either normalization ------------------------------------------------------


def _batch_norm(
    normalize: Normalize,
    x,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
) -> Tensor | None:
    if training and running_mean is not None:
        return None  # running statistics are updated in place: only the fused op does that
    if training or running_mean is None:
        y = normalize(x, [0, *range(2, x.dim())], eps)
    else:
        shape = _channel_shape(x)
        y = (x - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine(y, weight, bias, _channel_shape(x))


def _instance_norm(
    normalize: Normalize,
    x,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
) -> Tensor | None:
    if not use_input_stats or running_mean is not None:
        return None
    return _affine(normalize(x, range(2, x.dim()), eps), weight, bias, _channel_shape(x))


def _layer_norm(normalize: Normalize, x, normalized_shape, weight=None, bias=None, eps=1e-5) -> Tensor:
    dims = range(x.dim() - len(normalized_shape), x.dim())
    return _affine(normalize(x, dims, eps), weight, bias, list(normalized_shape))


class _ExactNorms(TorchFunctionMode):
    """Replaces the norm functionals it knows by ``normalize``-based ones (any call they decline, e.g. one
    that updates running statistics, goes to the fused op)."""

    def __init__(self, normalize: Normalize) -> None:
        super().__init__()
        self.replacements: dict[Callable, Callable[..., Tensor | None]] = {
            F.batch_norm: lambda *a, **k: _batch_norm(normalize, *a, **k),
            F.instance_norm: lambda *a, **k: _instance_norm(normalize, *a, **k),
            F.layer_norm: lambda *a, **k: _layer_norm(normalize, *a, **k),
        }

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        replacement = self.replacements.get(func)
        if replacement is not None:
            out = replacement(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def exact_norms() -> Iterator[None]:
    """Within the block, batch/instance/layer norm run through ``F.group_norm`` (exact under ``vmap`` to
    every order of differentiation)."""
    with _ExactNorms(_group_norm):
        yield


@contextlib.contextmanager
def reference_norms() -> Iterator[None]:
    """Within the block, batch/instance/layer norm run as elementary ops (means, variances, elementwise
    arithmetic): the reference that :func:`exact_norms` is tested against."""
    with _ExactNorms(_elementary):
        yield
