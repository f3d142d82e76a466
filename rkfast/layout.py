"""Where each meta-parameter lives inside one flat vector ``[N]`` (and per-task rows ``[T, N]``)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ParamLayout"]


@dataclass(frozen=True)
class ParamLayout:
    """Where each named parameter lives inside a flat vector: ``row[offset : offset + numel].view(shape)``."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_named(cls, named: Iterable[tuple[str, Tensor]]) -> ParamLayout:
        pairs = list(named)
        return cls(tuple(n for n, _ in pairs), tuple(t.shape for _, t in pairs))

    @classmethod
    def from_module(cls, module: nn.Module) -> ParamLayout:
        """The layout of ``module.named_parameters()`` (tied parameters once)."""
        return cls.from_named(module.named_parameters())

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        """``N``, the length of the flat vector."""
        return sum(self.numels)

    def flatten(self, tensors: Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        """Concatenate tensors (in layout order) into a new flat vector."""
        if isinstance(tensors, Mapping):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, row: Tensor) -> dict[str, Tensor]:
        """Views of a flat ``row [N]`` (or ``[..., N]``) as the named parameter shapes."""
        chunks = row.split(self.numels, dim=-1)
        lead = tuple(row.shape[:-1])
        # one size tuple, not unpacked arguments: a 0-d parameter of a flat vector is view(()), and
        # view() with no arguments at all is not a call torch accepts
        return {n: c.view(lead + tuple(s)) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}
