"""Few-shot image data as the episode sampler reads it: one uint8 array per split, classes x drawings.

Every loader (Omniglot, MiniImageNet, the built-in glyphs) returns a :class:`ClassImages`; decoding happens
once, and the arrays are cached on disk (:mod:`rkfast.data.cache`), so a second run starts in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ClassImages", "DataError"]


class DataError(ValueError):
    """Data that cannot be used as asked: a missing root, a wrong layout, an unreadable or truncated image, a
    split with too few classes. The message names the path and what was expected (the command line prints
    it in one line and exits with code 2)."""


@dataclass(frozen=True)
class ClassImages:
    """The images of one split: ``images[c, i]`` is drawing ``i`` of class ``c``.

    Attributes:
        images: ``uint8 [classes, per_class, channels, height, width]`` (C-contiguous; may be a read-only
            memory map of the cache file).
        classes: a name per class (``"Latin/character01/rot90"``, a WordNet id, ``"U+0041"``...).
        meta: what produced the split (dataset, root, split rule, image size...): written into each run's
            results JSON.
    """

    images: np.ndarray
    classes: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 5:
            raise ValueError(
                f"ClassImages.images must be uint8 [classes, per_class, C, H, W], "
                f"got {self.images.dtype} {self.images.shape}"
            )
        if len(self.classes) != self.images.shape[0]:
            raise ValueError(f"{len(self.classes)} class names for {self.images.shape[0]} classes")

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])

    @property
    def per_class(self) -> int:
        """Drawings (images) per class."""
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)``."""
        c, h, w = self.images.shape[2:]
        return int(c), int(h), int(w)
