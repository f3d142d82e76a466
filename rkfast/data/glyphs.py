"""``glyphs``: a built-in, offline, Omniglot-style few-shot benchmark rendered from the fonts matplotlib ships.

* **Alphabets** are Unicode blocks (a few small related blocks merged), :data:`ALPHABETS`.
* **Classes** are the code points of an alphabet that are letters, digits or symbols (no marks, spaces,
  punctuation or control characters), have no Unicode decomposition (so no accented copies of a base letter,
  super/subscripts, full-width or circled variants), have a non-empty glyph in at least one of the
  :data:`FONT_FACES`, and do not look like a character kept before them (Latin ``A``, Greek ``Α`` and
  Cyrillic ``А`` are one class, the first one). The catalog depends only on the font files, never on the
  seed, the image size or the number of drawings.
* **Drawings** of a class: the glyph drawn by one of the faces that has it (chosen per drawing), in its
  place in the character cell (so Braille dots and box-drawing half lines keep their positions) and scaled
  to fill the image, with a random stroke weight and a random affine distortion (rotation, scale, aspect,
  shear, translation), see :data:`DISTORTION`; rendered at twice the size and area-averaged down, then
  stretched so that each drawing's strongest ink is 255. The random choices of a drawing come from
  ``seed``, the code point and the drawing's index only: a class's drawings do not depend on which other
  classes are rendered, nor the first k drawings on how many are asked for.
* **Pixels**: ``uint8 [classes, drawings, 1, image_size, image_size]``, **ink high**: 255 is full ink, 0 the
  background, as :mod:`rkfast.data.omniglot` gives Omniglot.
* **Splits** are by alphabet (:data:`ALPHABET_SPLITS`), so no class, and no alphabet, is in two splits:
  2642 train classes in 24 alphabets, 402 val in 3, 771 test in 7 (matplotlib 3.11's fonts).

Rasterization is FreeType's (through Pillow, which matplotlib depends on) of matplotlib's own font files, so
the same seed gives bit-identical arrays in one environment; other font files (another matplotlib) or
another FreeType may move pixels, so their versions are in ``meta`` and in the cache key of
:func:`load_glyphs`. Rendering every split takes about 10 s on two CPU cores (:func:`render_glyphs`);
:func:`load_glyphs` caches each split on disk.
"""

from __future__ import annotations

import functools
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import ft2font
from PIL import Image, ImageDraw, ImageFont, features
from PIL import __version__ as pillow_version

from .cache import cached, fingerprint
from .images import ClassImages, DataError

__all__ = [
    "load_glyphs",
    "render_glyphs",
    "glyph_catalog",
    "split_classes",
    "GlyphClass",
    "ALPHABETS",
    "ALPHABET_SPLITS",
    "FONT_FACES",
    "SPLITS",
    "SPLIT_RULE",
]

# Of the rendered arrays: bump whenever a change here changes a pixel, so that old cache files are not used.
FORMAT_VERSION = 1

# Upright regular and bold faces of four families. Italics are left out on purpose: a true italic changes
# letterforms (Cyrillic italic "т" looks like Latin "m"), and the random shear already slants. Left out
# too: the Display faces (subsets of the others), STIXNonUni (private-use code points), the STIXSiz* faces
# (big delimiters), the Computer Modern faces (TeX encodings, not Unicode) and LastResort (placeholder boxes).
# The order is a priority: the first face that has a code point draws it when the catalog compares classes.
FONT_FACES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
)
BOLD_FACES = frozenset({"DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf", "STIXGeneralBol.ttf"})

# name -> (code point ranges, inclusive; general categories kept by their first letter). Letters-only where a
# block also holds symbols that belong to another alphabet.
ALPHABETS: dict[str, tuple[tuple[tuple[int, int], ...], str]] = {
    "Latin": (((0x0000, 0x007F),), "LN"),
    "Latin Extended": (((0x0080, 0x024F), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF)), "L"),
    "IPA": (((0x0250, 0x02AF), (0x1D00, 0x1DBF)), "L"),
    "Greek": (((0x0370, 0x03FF),), "LN"),
    "Cyrillic": (((0x0400, 0x04FF),), "LN"),
    "Cyrillic Extended": (((0x0500, 0x052F), (0xA640, 0xA69F)), "LN"),
    "Armenian": (((0x0530, 0x058F),), "LN"),
    "Hebrew": (((0x0590, 0x05FF),), "LN"),
    "Arabic": (((0x0600, 0x06FF),), "LN"),
    "NKo": (((0x07C0, 0x07FF),), "LN"),
    "Lao": (((0x0E80, 0x0EFF),), "LN"),
    "Georgian": (((0x10A0, 0x10FF), (0x2D00, 0x2D2F)), "LN"),
    "Canadian Syllabics": (((0x1400, 0x167F),), "L"),
    "Ogham": (((0x1680, 0x169F),), "L"),
    "Tifinagh": (((0x2D30, 0x2D7F),), "L"),
    "Lisu": (((0xA4D0, 0xA4FF),), "L"),
    "Old Italic": (((0x10300, 0x1032F),), "LN"),
    "Currency and Letterlike Symbols": (((0x20A0, 0x20CF), (0x2100, 0x214F)), "LS"),
    "Arrows": (((0x2190, 0x21FF),), "S"),
    "Supplemental Arrows": (((0x27F0, 0x27FF), (0x2900, 0x297F)), "S"),
    "Mathematical Operators": (((0x2200, 0x22FF),), "S"),
    "Supplemental Mathematical Operators": (((0x2A00, 0x2AFF),), "S"),
    "Miscellaneous Mathematical Symbols": (((0x27C0, 0x27EF), (0x2980, 0x29FF)), "S"),
    "Miscellaneous Technical": (((0x2300, 0x23FF),), "S"),
    "Box Drawing": (((0x2500, 0x257F),), "S"),
    "Geometric Shapes": (((0x25A0, 0x25FF),), "S"),
    "Miscellaneous Symbols": (((0x2600, 0x26FF),), "S"),
    "Dingbats": (((0x2700, 0x27BF),), "SN"),
    "Miscellaneous Symbols and Arrows": (((0x2B00, 0x2BFF),), "S"),
    "Braille": (((0x2800, 0x28FF),), "S"),
    "Yijing Hexagrams": (((0x4DC0, 0x4DFF),), "S"),
    "Tai Xuan Jing": (((0x1D300, 0x1D35F),), "S"),
    "Domino Tiles": (((0x1F030, 0x1F09F),), "S"),
    "Emoticons": (((0x1F600, 0x1F64F),), "S"),
}

SPLIT_RULE = (
    "by alphabet: alphabets by class count, largest first (ties by name), each given to the split "
    "whose class count is furthest below its share (train 70%, val 10%, test 20%), the shortfall "
    "measured relative to the share; frozen in ALPHABET_SPLITS, so a split never moves with the "
    "environment"
)

# SPLIT_RULE applied once (balanced_split(alphabet_sizes())) to the catalog of matplotlib 3.11's fonts, then
# frozen; the comments give those class counts.
ALPHABET_SPLITS: dict[str, str] = {
    # train: 2642 classes
    "Latin": "train",  # 61
    "Latin Extended": "train",  # 243
    "IPA": "train",  # 145
    "Greek": "train",  # 61
    "Cyrillic Extended": "train",  # 55
    "Hebrew": "train",  # 27
    "Arabic": "train",  # 116
    "NKo": "train",  # 40
    "Georgian": "train",  # 118
    "Canadian Syllabics": "train",  # 391
    "Tifinagh": "train",  # 45
    "Lisu": "train",  # 16
    "Old Italic": "train",  # 29
    "Supplemental Arrows": "train",  # 143
    "Mathematical Operators": "train",  # 208
    "Miscellaneous Mathematical Symbols": "train",  # 127
    "Box Drawing": "train",  # 88
    "Miscellaneous Symbols": "train",  # 188
    "Dingbats": "train",  # 153
    "Miscellaneous Symbols and Arrows": "train",  # 75
    "Yijing Hexagrams": "train",  # 64
    "Tai Xuan Jing": "train",  # 87
    "Domino Tiles": "train",  # 100
    "Emoticons": "train",  # 62
    # val: 402 classes
    "Currency and Letterlike Symbols": "val",  # 42
    "Arrows": "val",  # 105
    "Braille": "val",  # 255
    # test: 771 classes
    "Cyrillic": "test",  # 141
    "Armenian": "test",  # 63
    "Lao": "test",  # 46
    "Ogham": "test",  # 26
    "Supplemental Mathematical Operators": "test",  # 246
    "Miscellaneous Technical": "test",  # 157
    "Geometric Shapes": "test",  # 92
}

SPLITS = ("train", "val", "test")
SPLIT_SHARES = {"train": 0.7, "val": 0.1, "test": 0.2}

# The catalog renders every glyph at this font size (pixels), normalized to this side, to find blanks and
# look-alikes; the catalog therefore never depends on the image size asked for.
_CATALOG_FONT_PX = 64
_CATALOG_SIDE = 64
# A glyph with less ink than this fraction of font size squared (about 41 full pixels at 64 px) is blank.
_MIN_INK = 0.01
# Look-alikes: pairs whose normalized images are this close (squared distance over the sum of squared norms)
# are compared pixel by pixel; they look alike when, after a 3x3 erosion of the ink one has and the other
# has not (either way), no pixel is left above _LOOKALIKE_INK. The erosion ignores the thin slivers of two
# designs of one shape (Latin "I", Greek "Ι", NKo "ߊ"), and keeps a dot, a bar or a hook that tells two
# characters apart (Arabic "ص" and "ض").
_LOOKALIKE_PREFILTER = 0.08
_LOOKALIKE_INK = 0.33

# Normalization: the farthest ink from the cell's centre lands at this fraction of half the image (room for
# the distortions) ...
_FILL = 0.8
# ... but a small glyph (a dot) grows at most as much as one that reaches a quarter em from the centre.
_MIN_EXTENT_EM = 0.25

# The random distortion of each drawing (uniform ranges). Scale and aspect multiply the glyph's size
# (aspect as exp(±a): wider and lower, or narrower and taller); shear slants x by shear * y; translation is
# a fraction of the half image. Stroke: a regular face's strokes are drawn as they are or half a pixel
# thicker on each side, a bold face's as they are or half a pixel thinner, so that the weights run
# regular, regular+, bold-, bold (eroding a regular face would erase STIX's hairlines).
DISTORTION: dict[str, Any] = {
    "rotation_degrees": (-12.0, 12.0),
    "scale": (0.85, 1.05),
    "log_aspect": (-0.1, 0.1),
    "shear": (-0.2, 0.2),
    "translation": (-0.08, 0.08),
    "stroke": ("regular face: as drawn or thicker", "bold face: as drawn or thinner"),
}

# Drawings are warped and stroked at this multiple of the image size, then area-averaged down (anti-aliasing).
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class GlyphClass:
    """One class of the benchmark: a code point, its alphabet and the faces that draw it (non-blank)."""

    alphabet: str
    code_point: int
    faces: tuple[str, ...]

    @property
    def name(self) -> str:
        """``"U+0041"``."""
        return f"U+{self.code_point:04X}"


# -- fonts ------------------------------------------------------------------------------------------------


def font_dir() -> Path:
    """matplotlib's own TrueType folder (``mpl-data/fonts/ttf``)."""
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def _face_code_points(face: str) -> frozenset[int]:
    path = font_dir() / face
    if not path.is_file():
        raise DataError(f"glyphs: the font {path} that matplotlib ships is missing")
    return frozenset(ft2font.FT2Font(str(path)).get_charmap())


@functools.cache
def _font(face: str, pixels: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: one code point, one glyph, no shaping, whether or not Raqm is installed (Arabic letters
    # are drawn in their isolated forms).
    return ImageFont.truetype(str(font_dir() / face), pixels, layout_engine=ImageFont.Layout.BASIC)


def _draw_cell(code_point: int, face: str, pixels: int) -> Image.Image:
    """The glyph with the middle of its cell (half its advance, halfway between the font's ascender and
    descender) at the centre of a ``4 * pixels`` square canvas; ink 255 on 0."""
    canvas = Image.new("L", (4 * pixels, 4 * pixels), 0)
    ImageDraw.Draw(canvas).text(
        (2 * pixels, 2 * pixels), chr(code_point), font=_font(face, pixels), fill=255, anchor="mm"
    )
    return canvas


def _inked_cell(
    code_point: int, face: str, pixels: int, min_ink: float = 0.0
) -> tuple[Image.Image, tuple[int, int, int, int]] | None:
    """:func:`_draw_cell` and the box around its ink, or None when it has less ink than ``min_ink`` times
    ``pixels**2`` (or none at all)."""
    canvas = _draw_cell(code_point, face, pixels)
    box = canvas.getbbox()
    if box is None:
        return None
    if min_ink > 0 and np.asarray(canvas.crop(box), dtype=np.float64).sum() / 255.0 < min_ink * pixels**2:
        return None
    return canvas, box


def _normalized(cell: tuple[Image.Image, tuple[int, int, int, int]], pixels: int, side: int) -> np.ndarray:
    """An inked cell as ``float32 [side, side]`` in [0, 1].

    The crop is a square about the cell's centre, so a glyph keeps its place in the cell (Braille dots, box
    drawing half lines); its half side is the farthest ink from the centre (at least :data:`_MIN_EXTENT_EM`
    em) over :data:`_FILL`, so that every glyph fills the image about as much."""
    canvas, box = cell
    centre = 2 * pixels
    extent = max(centre - box[0], box[2] - centre, centre - box[1], box[3] - centre, _MIN_EXTENT_EM * pixels)
    half = extent / _FILL
    square = (centre - half, centre - half, centre + half, centre + half)
    image = canvas.resize((side, side), Image.Resampling.BILINEAR, box=square, reducing_gap=None)
    return np.asarray(image, dtype=np.float32) / 255.0


# -- the catalog ------------------------------------------------------------------------------------------


def _candidates() -> list[tuple[str, int]]:
    """(alphabet, code point) of every letter/digit/symbol without decomposition that some face maps."""
    mapped = frozenset().union(*(_face_code_points(face) for face in FONT_FACES))
    found = []
    for alphabet, (ranges, categories) in ALPHABETS.items():
        for first, last in ranges:
            for code_point in range(first, last + 1):
                char = chr(code_point)
                if (
                    code_point in mapped
                    and unicodedata.category(char)[0] in categories
                    and not unicodedata.decomposition(char)
                ):
                    found.append((alphabet, code_point))
    return found


def _max_3x3(images: torch.Tensor) -> torch.Tensor:
    """Maximum over each pixel's 3x3 neighbourhood of ``[..., h, w]``, with 0 outside the image.

    Two separable passes of elementwise maxima: several times faster than ``max_pool2d`` with stride 1."""
    padded = F.pad(images, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(padded[..., :, :-2], padded[..., :, 1:-1]), padded[..., :, 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def _dilate(images: torch.Tensor) -> torch.Tensor:
    """3x3 grey-level dilation of ink in [0, 1]."""
    return _max_3x3(images)


def _erode(images: torch.Tensor) -> torch.Tensor:
    """3x3 grey-level erosion of ink in [0, 1] (outside the image is background, so it erodes too)."""
    return -_max_3x3(-images)


def _lookalike_pairs(images: np.ndarray) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of ``images [n, side, side]`` that look alike (see _LOOKALIKE_INK)."""
    full = torch.from_numpy(images)[:, None]
    # Prefilter on 4x smaller images, where the matrix of all pairwise distances is cheap (in float64, so
    # that BLAS's summation order cannot move a pair across the threshold).
    small = F.avg_pool2d(full, 4).flatten(1).double()
    norms = (small * small).sum(1)
    sums = norms[:, None] + norms[None, :]
    close = ((sums - 2 * small @ small.T) < _LOOKALIKE_PREFILTER * sums).triu(diagonal=1).nonzero()
    pairs = []
    for part in close.split(1024):  # bounds the memory of the pairwise differences
        difference = full[part[:, 0]] - full[part[:, 1]]
        only_one = torch.maximum(_erode(difference.clamp(min=0)), _erode((-difference).clamp(min=0)))
        alike = only_one.flatten(1).amax(1) <= _LOOKALIKE_INK
        pairs += [(int(i), int(j)) for i, j in part[alike].tolist()]
    return pairs


def _drop_lookalikes(images: np.ndarray) -> np.ndarray:
    """Which of ``images [n, side, side]`` to keep: each one unless it looks like a kept one before it."""
    earlier_lookalikes: dict[int, list[int]] = {}
    for i, j in _lookalike_pairs(images):
        earlier_lookalikes.setdefault(j, []).append(i)
    keep = np.ones(len(images), dtype=bool)
    for j in range(len(images)):
        keep[j] = not any(keep[i] for i in earlier_lookalikes.get(j, ()))
    return keep


@functools.lru_cache(maxsize=1)
def glyph_catalog() -> tuple[GlyphClass, ...]:
    """Every class of the benchmark, alphabet by alphabet (in :data:`ALPHABETS` order) and by code point.

    A face draws a class when its character map has the code point and its glyph is not blank; a candidate
    that looks like an earlier class (both drawn by their first face) is dropped. Takes 2-3 s on two CPU
    cores; the result is kept for the life of the process."""
    classes, first_drawings = [], []
    for alphabet, code_point in _candidates():
        faces, first = [], None
        for face in FONT_FACES:
            if code_point in _face_code_points(face):
                cell = _inked_cell(code_point, face, _CATALOG_FONT_PX, _MIN_INK)
                if cell is not None:
                    faces.append(face)
                    first = cell if first is None else first
        if first is not None:  # some face draws it
            classes.append(GlyphClass(alphabet, code_point, tuple(faces)))
            first_drawings.append(_normalized(first, _CATALOG_FONT_PX, _CATALOG_SIDE))
    keep = _drop_lookalikes(np.stack(first_drawings))
    return tuple(glyph for glyph, kept in zip(classes, keep, strict=True) if kept)


def alphabet_sizes() -> dict[str, int]:
    """Classes per alphabet, in :data:`ALPHABETS` order (alphabets left with no class are absent)."""
    sizes: dict[str, int] = {}
    for glyph in glyph_catalog():
        sizes[glyph.alphabet] = sizes.get(glyph.alphabet, 0) + 1
    return sizes


def balanced_split(sizes: dict[str, int]) -> dict[str, str]:
    """:data:`SPLIT_RULE`: alphabet -> split, given the classes per alphabet."""
    total = sum(sizes.values())
    assigned = dict.fromkeys(SPLITS, 0)
    split_of = {}
    for name in sorted(sizes, key=lambda name: (-sizes[name], name)):
        split = max(SPLITS, key=lambda s: (SPLIT_SHARES[s] * total - assigned[s]) / SPLIT_SHARES[s])
        split_of[name] = split
        assigned[split] += sizes[name]
    return split_of


def split_classes(split: str) -> tuple[GlyphClass, ...]:
    """The classes of one split, in catalog order."""
    if split not in SPLITS:
        raise DataError(f"glyphs: split must be one of {', '.join(SPLITS)}, got {split!r}")
    return tuple(glyph for glyph in glyph_catalog() if ALPHABET_SPLITS[glyph.alphabet] == split)


# -- drawings ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DrawingChoices:
    """The random choices of one class's drawings."""

    face: np.ndarray  # int [drawings]: index into the class's faces
    stroke: np.ndarray  # int [drawings]: -1 thinner, 0 as drawn, 1 thicker
    theta: np.ndarray  # float64 [drawings, 2, 3]: output -> glyph coordinates, as F.affine_grid takes them


def _random_choices(glyph: GlyphClass, seed: int, drawings: int) -> _DrawingChoices:
    """Faces, strokes and affine maps of a class's drawings, from ``seed`` and the code point only."""
    # One row of uniforms per drawing, so the first k drawings are the same whatever the number asked for.
    uniform = np.random.default_rng([seed, glyph.code_point]).random((drawings, 8))

    def between(bounds: tuple[float, float], column: np.ndarray) -> np.ndarray:
        return bounds[0] + (bounds[1] - bounds[0]) * column

    face = np.minimum((uniform[:, 0] * len(glyph.faces)).astype(np.int64), len(glyph.faces) - 1)
    bold = np.array([glyph.faces[i] in BOLD_FACES for i in face], dtype=bool)
    stroke = (uniform[:, 1] < 0.5) * np.where(bold, -1, 1)
    rotation = np.deg2rad(between(DISTORTION["rotation_degrees"], uniform[:, 2]))
    scale = between(DISTORTION["scale"], uniform[:, 3])
    aspect = np.exp(between(DISTORTION["log_aspect"], uniform[:, 4]))
    shear = between(DISTORTION["shear"], uniform[:, 5])
    shift = between(DISTORTION["translation"], uniform[:, 6:8])
    # Forward map (glyph -> image): p' = R(rotation) @ [[1, shear], [0, 1]] @ diag(sx, sy) @ p + shift,
    # with y pointing down as in the image; grid_sample wants its inverse.
    cos, sin = np.cos(rotation), np.sin(rotation)
    sx, sy = scale * aspect, scale / aspect
    forward = np.empty((drawings, 2, 2))
    forward[:, 0, 0], forward[:, 0, 1] = cos * sx, (cos * shear - sin) * sy
    forward[:, 1, 0], forward[:, 1, 1] = sin * sx, (sin * shear + cos) * sy
    inverse = np.linalg.inv(forward)
    theta = np.concatenate([inverse, -inverse @ shift[:, :, None]], axis=2)
    return _DrawingChoices(face, stroke, theta)


def _affine_grid(theta: torch.Tensor, side: int) -> torch.Tensor:
    """``F.affine_grid(theta, [n, 1, side, side], align_corners=False)``, as the sum of a row term and a column
    term (one pass over the grid: twice as fast on CPU)."""
    centres = (torch.arange(side, dtype=theta.dtype) * 2 + 1) / side - 1
    n = len(theta)
    along_x = theta[:, :, 0].view(n, 1, 1, 2) * centres.view(1, 1, side, 1) + theta[:, :, 2].view(n, 1, 1, 2)
    along_y = theta[:, :, 1].view(n, 1, 1, 2) * centres.view(1, side, 1, 1)
    return along_x + along_y


def _stroked_sources(
    classes: tuple[GlyphClass, ...], choices: list[_DrawingChoices], image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct (glyph, face, stroke) sources that the drawings use, ``float32 [sources, 1, s, s]`` at
    the supersampled size ``s``, and the source of every drawing (class-major), ``int64 [classes * drawings]``.

    The stroke is applied to the glyph before its distortion (the distortions barely change the scale),
    once per source rather than once per drawing."""
    side = _SUPERSAMPLE * image_size
    image_index: dict[tuple[int, str], int] = {}  # (code point, face) -> row of glyph_images
    glyph_images: list[np.ndarray] = []
    source_index: dict[tuple[int, int], int] = {}  # (row of glyph_images, stroke) -> source
    sources: list[tuple[int, int]] = []
    source_of_drawing = []
    for glyph, choice in zip(classes, choices, strict=True):
        for face_index, stroke in zip(choice.face.tolist(), choice.stroke.tolist(), strict=True):
            face = glyph.faces[face_index]
            if (glyph.code_point, face) not in image_index:
                image_index[glyph.code_point, face] = len(glyph_images)
                glyph_images.append(_drawing_glyph(glyph.code_point, face, side))
            key = (image_index[glyph.code_point, face], stroke)
            if key not in source_index:
                source_index[key] = len(sources)
                sources.append(key)
            source_of_drawing.append(source_index[key])
    image_of_source, stroke_of_source = torch.tensor(sources, dtype=torch.int64).T
    images = torch.from_numpy(np.stack(glyph_images))[:, None][image_of_source]
    # Half a pixel of the output on each side: a 3x3 erosion or dilation at the supersampled size.
    thinner, thicker = stroke_of_source < 0, stroke_of_source > 0
    images[thinner] = _erode(images[thinner])
    images[thicker] = _dilate(images[thicker])
    return images, torch.tensor(source_of_drawing, dtype=torch.int64)


def _drawing_glyph(code_point: int, face: str, side: int) -> np.ndarray:
    """A glyph normalized to ``side`` pixels square, drawn at a font size of ``side`` pixels."""
    cell = _inked_cell(code_point, face, side)
    # The catalog found ink at its own size; a glyph can only vanish at a tiny one.
    return np.zeros((side, side), np.float32) if cell is None else _normalized(cell, side, side)


def _warp(sources: torch.Tensor, theta: torch.Tensor, image_size: int) -> torch.Tensor:
    """Drawings ``uint8 [n, 1, image_size, image_size]`` of ``sources float32 [n, 1, s, s]`` (s the
    supersampled size) under the affine maps ``theta [n, 2, 3]``, area-averaged down."""
    warped = F.grid_sample(
        sources, _affine_grid(theta, sources.shape[-1]), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    small = F.avg_pool2d(warped, _SUPERSAMPLE)
    # A hairline (a thin face, shrunk) averages to grey: stretch each drawing so its darkest ink is full ink.
    peak = small.amax(dim=(1, 2, 3), keepdim=True)
    small = small / torch.where(peak > 0, peak, torch.ones_like(peak))
    return small.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _evenly_spaced(classes: tuple[GlyphClass, ...], count: int | None) -> tuple[GlyphClass, ...]:
    if count is None or count >= len(classes):
        return classes
    if count < 1:
        raise DataError(f"glyphs: max_classes must be at least 1, got {count}")
    return tuple(classes[int(i)] for i in np.linspace(0, len(classes) - 1, count).round())


def load_glyphs(
    split: str, seed: int = 0, image_size: int = 28, drawings: int = 20, cache_dir: str | os.PathLike[str] | None = None
) -> ClassImages:
    """:func:`render_glyphs`, through the image cache (:mod:`rkfast.data.cache`): rendered once per split,
    seed, size and drawing count, then read back as a memory map.

    The cache key holds this module's :data:`FORMAT_VERSION`, the versions of matplotlib, Pillow and
    FreeType, and a fingerprint of the font files, so another environment renders afresh."""
    if split not in SPLITS:  # before the cache makes a file name of it
        raise DataError(f"glyphs: split must be one of {', '.join(SPLITS)}, got {split!r}")
    fonts = fingerprint((face, (font_dir() / face).stat()) for face in FONT_FACES if (font_dir() / face).is_file())
    key = {
        "dataset": "glyphs",
        "format": FORMAT_VERSION,
        "split": split,
        "seed": seed,
        "image_size": image_size,
        "drawings": drawings,
        "fonts": fonts,
        "matplotlib": matplotlib.__version__,
        "pillow": pillow_version,
        "freetype": features.version("freetype2"),
    }
    return cached(
        f"glyphs-{split}-{image_size}px",
        key,
        lambda: render_glyphs(split, seed=seed, image_size=image_size, drawings=drawings),
        cache_dir,
    )


def render_glyphs(
    split: str,
    seed: int = 0,
    image_size: int = 28,
    drawings: int = 20,
    max_classes: int | None = None,
    chunk: int = 4096,
) -> ClassImages:
    """The drawings of one split of the ``glyphs`` benchmark (see the module's docstring).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: seed of the random faces, strokes and distortions (non-negative). Same seed, same arrays
            (bit for bit, in one environment); a class's drawings depend only on the seed and its code
            point, and their distortions not on ``image_size``.
        image_size: side of the square images in pixels.
        drawings: drawings per class.
        max_classes: at most this many classes, evenly spaced through the split (for quick tests).
        chunk: drawings warped at once (bounds the memory; the result does not depend on it).

    Returns:
        ``ClassImages`` with images ``uint8 [classes, drawings, 1, image_size, image_size]``, ink 255 on a 0
        background; classes named ``"U+0041"``; meta with the dataset, split rule, alphabets, fonts,
        versions and options.
    """
    if seed < 0:
        raise DataError(f"glyphs: the seed must be non-negative, got {seed}")
    if image_size < 8:
        raise DataError(f"glyphs: image_size must be at least 8 pixels, got {image_size}")
    if drawings < 1:
        raise DataError(f"glyphs: drawings must be at least 1, got {drawings}")
    classes = _evenly_spaced(split_classes(split), max_classes)
    choices = [_random_choices(glyph, seed, drawings) for glyph in classes]

    sources, source_of_drawing = _stroked_sources(classes, choices, image_size)
    theta = torch.from_numpy(np.concatenate([choice.theta for choice in choices])).float()
    images = torch.empty((len(classes) * drawings, 1, image_size, image_size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        part = slice(start, start + chunk)
        images[part] = _warp(sources[source_of_drawing[part]], theta[part], image_size)
    array = images.view(len(classes), drawings, 1, image_size, image_size).numpy()
    return ClassImages(
        array, tuple(glyph.name for glyph in classes), _meta(split, seed, image_size, drawings, classes, max_classes)
    )


def _meta(
    split: str, seed: int, image_size: int, drawings: int, classes: tuple[GlyphClass, ...], max_classes: int | None
) -> dict[str, Any]:
    alphabets: dict[str, int] = {}
    for glyph in classes:
        alphabets[glyph.alphabet] = alphabets.get(glyph.alphabet, 0) + 1
    faces_used = sorted({face for glyph in classes for face in glyph.faces}, key=FONT_FACES.index)
    return {
        "dataset": "glyphs",
        "format": FORMAT_VERSION,
        "split": split,
        "seed": seed,
        "image_size": image_size,
        "drawings": drawings,
        "max_classes": max_classes,
        "classes": len(classes),
        "alphabets": alphabets,
        "split_rule": SPLIT_RULE,
        "pixels": "uint8, 1 channel, ink 255 on a 0 background",
        "fonts": faces_used,
        "font_dir": str(font_dir()),
        "matplotlib": matplotlib.__version__,
        "pillow": pillow_version,
        "freetype": features.version("freetype2"),
        "distortion": {key: list(value) for key, value in DISTORTION.items()},
    }
