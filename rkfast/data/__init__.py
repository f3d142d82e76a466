"""Few-shot image data from local files (nothing is downloaded), decoded once into cached uint8 arrays.

* :func:`load_omniglot`: Omniglot's original release (``images_background/``, ``images_evaluation/``).
* :func:`load_miniimagenet`: MiniImageNet as CSV splits + ``images/``, or the pickled cache files.
* :func:`load_glyphs`: the built-in ``glyphs`` benchmark, rendered from matplotlib's fonts.

Each returns a :class:`ClassImages` (``uint8 [classes, per_class, C, H, W]``) and raises :class:`DataError`
naming the path and what was expected; :mod:`rkfast.data.cache` keeps the decoded arrays.
"""

from .cache import CacheWarning, cache_dir, cached
from .glyphs import load_glyphs, render_glyphs
from .images import ClassImages, DataError
from .miniimagenet import load_miniimagenet
from .omniglot import load_omniglot

__all__ = [
    "ClassImages",
    "DataError",
    "CacheWarning",
    "cache_dir",
    "cached",
    "load_omniglot",
    "load_miniimagenet",
    "load_glyphs",
    "render_glyphs",
]
