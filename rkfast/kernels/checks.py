"""Argument checks of the public ops: every problem is reported, by argument name, before any kernel runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_float", "check_like", "check_list", "check_out", "check_vectors", "floats"]


def check_float(name: str, t: object) -> Tensor:
    """``t``, once it is a floating-point tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    return t


def check_like(name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    """``t`` has ``ref``'s dtype and device."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, {ref_name} has {ref.dtype}: they must match")
    if t.device != ref.device:
        raise RuntimeError(f"{name} is on {t.device}, {ref_name} on {ref.device}: they must be on one device")


def check_list(
    name: str, tensors: Sequence[Tensor], scalars: Sequence[float] | Sequence[Tensor], scalar_name: str
) -> list[Tensor]:
    """A non-empty list of ``[T, N]`` tensors of one shape, dtype and device, one per entry of ``scalars`` (the
    coefficients that go with them: numbers, or coefficient vectors); made contiguous."""
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence) or len(tensors) == 0:
        raise ValueError(f"{name} must be a non-empty list of [T, N] tensors")
    if len(scalars) != len(tensors):
        raise ValueError(f"{len(tensors)} {name} but {len(scalars)} {scalar_name}: one per tensor")
    first = check_float(f"{name}[0]", tensors[0])
    if first.dim() != 2:
        raise ValueError(f"{name}[0] must be [T, N], got shape {tuple(first.shape)}")
    for i, t in enumerate(tensors):
        check_float(f"{name}[{i}]", t)
        if t.shape != first.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, {name}[0] has {tuple(first.shape)}")
        check_like(f"{name}[{i}]", t, first, f"{name}[0]")
    return [t.contiguous() for t in tensors]


def check_vectors(
    name: str, vectors: Sequence[Tensor], count: int, count_name: str, ref: Tensor, ref_name: str
) -> list[Tensor]:
    """A list of ``count`` (one per ``count_name``) ``[N]`` tensors with ``ref``'s length (``ref`` is ``[N]``),
    dtype and device; made contiguous."""
    if isinstance(vectors, Tensor) or not isinstance(vectors, Sequence):
        raise ValueError(
            f"{name} must be a list of [N] tensors, one per {count_name.removesuffix('s')}; "
            f"got {type(vectors).__name__}"
        )
    if len(vectors) != count:
        raise ValueError(f"{count} {count_name} but {len(vectors)} {name}: one per tensor")
    for i, v in enumerate(vectors):
        check_float(f"{name}[{i}]", v)
        if v.shape != ref.shape:
            raise ValueError(
                f"{name}[{i}] must be [N] like {ref_name}, shape {tuple(ref.shape)}; got shape {tuple(v.shape)}"
            )
        check_like(f"{name}[{i}]", v, ref, ref_name)
    return [v.contiguous() for v in vectors]


def check_out(out: Tensor, shape: torch.Size, ref: Tensor) -> None:
    """``out`` is a contiguous buffer of ``shape`` with ``ref``'s dtype and device."""
    check_float("out", out)
    if out.shape != shape:
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    check_like("out", out, ref, "the inputs")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def floats(name: str, values: Sequence[float]) -> list[float]:
    """``values`` as Python floats (what the kernels and the registered ops take)."""
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}") from None
