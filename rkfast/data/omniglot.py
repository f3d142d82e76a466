"""Omniglot (Lake et al. 2015) from the original release, as few-shot classes (Finn et al. 2017).

The layout read is the original release, unzipped::

    ROOT/images_background/<Alphabet>/<characterNN>/*.png    30 alphabets, 964 characters
    ROOT/images_evaluation/<Alphabet>/<characterNN>/*.png    20 alphabets, 659 characters

(105x105 black-on-white PNGs, 20 drawings per character; torchvision's ``ROOT/omniglot-py/...`` works too).

Pixels: ``uint8 [classes, drawings, 1, size, size]`` with **ink high** (stroke 255, paper 0): the PNGs are
inverted, so ``x / 255`` equals MAML's ``1 - png / 255``. Drawings are resized from 105x105 with PIL's
LANCZOS filter (as Finn et al.'s ``proc_images.py``), then rotated.

Classes: each character in each of 4 rotations (0, 90, 180, 270 degrees counterclockwise, ``np.rot90``)
is a class, named ``"<Alphabet>/<characterNN>/rot<degrees>"``.

Split rules (the rule, seed and counts go into ``meta``):

``"finn"`` (default, Finn et al. 2017): the characters of both folders, sorted by (alphabet, character),
    are permuted by ``numpy.random.RandomState(seed).permutation`` (``seed=1``, Finn's); the first
    ``train_characters`` (1100) are train, the next ``val_characters`` (100) val, the rest (423) test.
    Finn et al.'s "1200 training characters" are these 1100 plus the 100 validation ones; the 423 test
    characters are the count the literature reports. (Finn's own code shuffled an ``os.listdir`` order,
    which no one can reproduce; the characters drawn here are not the same ones, the counts are.)
``"alphabets"``: the background alphabets are train, except ``val_alphabets`` (5) of them, drawn by
    ``RandomState(seed).permutation`` over the sorted names, which are val; the evaluation alphabets are
    test (Lake et al.'s background/evaluation split: no test alphabet is seen in training).

All 1623 characters are decoded once (both folders, unrotated) and cached (:mod:`rkfast.data.cache`):
choosing a split, a rule or a seed never decodes again; the split and its rotations are taken from the
cached array on every call (well under a second at 28x28).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _source
from .cache import cached, fingerprint
from .images import ClassImages, DataError

__all__ = ["load_omniglot", "SPLITS", "SPLIT_RULES", "FOLDERS", "ROTATIONS"]

SPLITS = ("train", "val", "test")
SPLIT_RULES = ("finn", "alphabets")
FOLDERS = ("images_background", "images_evaluation")
ROTATIONS = (0, 90, 180, 270)
FORMAT_VERSION = 1  # of the decoded array: bump when decoding changes, so old cache files are not used
_LAYOUT = (
    "images_background/<Alphabet>/<characterNN>/*.png and images_evaluation/<Alphabet>/<characterNN>/"
    "*.png (the original Omniglot release, unzipped)"
)


@dataclass(frozen=True)
class _Character:
    """One character's drawings; ``folder`` is ``images_background`` or ``images_evaluation``."""

    folder: str
    alphabet: str
    name: str
    drawings: tuple[Path, ...]

    @property
    def label(self) -> str:
        return f"{self.alphabet}/{self.name}"


def load_omniglot(
    root: str | os.PathLike[str],
    split: str,
    image_size: int = 28,
    cache_dir: str | os.PathLike[str] | None = None,
    split_rule: str = "finn",
    *,
    seed: int = 1,
    train_characters: int = 1100,
    val_characters: int = 100,
    val_alphabets: int = 5,
) -> ClassImages:
    """One split of Omniglot: ``uint8 [4 * characters, drawings, 1, image_size, image_size]``, ink high.

    Args:
        root: the folder holding ``images_background/`` and ``images_evaluation/`` (see the module docs).
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: the side the 105x105 drawings are resized to (LANCZOS); 105 keeps them as they are.
        cache_dir: the folder of the decoded-image cache (default: :func:`rkfast.data.cache.cache_dir`).
        split_rule: ``"finn"`` or ``"alphabets"`` (module docs).
        seed: the seed of the rule's permutation (``numpy.random.RandomState``, stable across versions).
        train_characters, val_characters: the ``"finn"`` rule's train and val character counts (the rest
            is test); small data sets (tests) set them small.
        val_alphabets: how many background alphabets the ``"alphabets"`` rule holds out as val.

    Returns:
        the split; ``meta`` records the data set, root, split rule, seed, per-split character, class and
        alphabet counts, rotations, image size, resize filter, pixel convention and source fingerprint.

    Raises:
        DataError: a missing root, a root that is a file, a wrong layout, a character folder without PNGs,
            characters with different drawing counts, an unreadable or truncated PNG, or too few
            characters or alphabets for the split rule. All before anything is written to the cache.
    """
    _check_arguments(split, image_size, split_rule, train_characters, val_characters, val_alphabets)
    root = _dataset_root(root)
    characters, source_files = _list_characters(root)
    splits, split_meta = _split(characters, root, split_rule, seed, train_characters, val_characters, val_alphabets)
    source = fingerprint(source_files)
    key = {
        "dataset": "omniglot",
        "format": FORMAT_VERSION,
        "root": str(root),
        "source": source,
        "image_size": image_size,
        "resize": _source.RESIZE_FILTER,
        "pixels": "ink-high",
    }
    decoded = cached(f"omniglot-{image_size}px", key, lambda: _decode(characters, image_size), cache_dir)
    chosen = splits[split]
    meta = {
        "dataset": "omniglot",
        "root": str(root),
        "split": split,
        **split_meta,
        "rotations": list(ROTATIONS),
        "classes": len(chosen) * len(ROTATIONS),
        "drawings_per_class": decoded.per_class,
        "image_size": image_size,
        "resize": _source.RESIZE_FILTER,
        "pixels": "uint8, ink 255 on paper 0 (the PNGs inverted)",
        "source": source,
    }
    return ClassImages(_rotated(decoded.images, chosen), _class_names(characters, chosen), meta)


def _check_arguments(
    split: str, image_size: int, split_rule: str, train_characters: int, val_characters: int, val_alphabets: int
) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if split_rule not in SPLIT_RULES:
        raise ValueError(f"split_rule {split_rule!r}: expected one of {', '.join(SPLIT_RULES)}")
    for name, value in [
        ("image_size", image_size),
        ("train_characters", train_characters),
        ("val_characters", val_characters),
        ("val_alphabets", val_alphabets),
    ]:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _dataset_root(root: str | os.PathLike[str]) -> Path:
    """The folder holding both image folders: ``root`` itself or torchvision's ``root/omniglot-py``."""
    path = _source.check_root(root, _LAYOUT)
    for candidate in (path, path / "omniglot-py"):
        if all((candidate / folder).is_dir() for folder in FOLDERS):
            return candidate
    missing = next(folder for folder in FOLDERS if not (path / folder).is_dir())
    archive = path / f"{missing}.zip"
    hint = f"; unzip {archive} there" if archive.is_file() else ""
    raise DataError(f"{path}: no {missing}/ folder{hint}; expected {_LAYOUT}")


def _list_characters(root: Path) -> tuple[list[_Character], list[tuple[str, os.stat_result]]]:
    """Every character folder of both image folders, sorted by (alphabet, character, folder), and the
    ``(relative name, stat)`` of every drawing (for the cache key)."""
    characters: list[_Character] = []
    source_files: list[tuple[str, os.stat_result]] = []
    for folder in FOLDERS:
        found_before = len(characters)
        for alphabet in _source.subfolders(root / folder):
            for character in _source.subfolders(Path(alphabet.path)):
                pngs = _source.files_by_name(Path(character.path), (".png",))
                if not pngs:
                    raise DataError(
                        f"{character.path}: no .png drawings; expected each "
                        f"<Alphabet>/<characterNN>/ folder to hold the PNG drawings of one "
                        f"character (20 in the original release)"
                    )
                names = sorted(pngs)
                characters.append(
                    _Character(folder, alphabet.name, character.name, tuple(Path(pngs[n].path) for n in names))
                )
                prefix = f"{folder}/{alphabet.name}/{character.name}/"
                source_files += [(prefix + n, pngs[n].stat()) for n in names]
        if len(characters) == found_before:
            raise DataError(
                f"{root / folder}: no <Alphabet>/<characterNN>/ folders with .png drawings; expected {_LAYOUT}"
            )
    characters.sort(key=lambda c: (c.alphabet, c.name, c.folder))
    _check_drawing_counts(characters, root)
    return characters, source_files


def _check_drawing_counts(characters: Sequence[_Character], root: Path) -> None:
    """Every character needs the same number of drawings (one array): name the first that differs."""
    counts = Counter(len(c.drawings) for c in characters)
    if len(counts) == 1:
        return
    usual, how_many = counts.most_common(1)[0]
    odd = next(c for c in characters if len(c.drawings) != usual)
    raise DataError(
        f"{root / odd.folder / odd.alphabet / odd.name}: {len(odd.drawings)} drawings, but "
        f"{how_many} other characters have {usual}; every character needs the same number "
        f"(20 in the original release)"
    )


def _split(
    characters: Sequence[_Character],
    root: Path,
    rule: str,
    seed: int,
    train_characters: int,
    val_characters: int,
    val_alphabets: int,
) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """The character indices of each split (sorted) and the meta that describes the rule."""
    if rule == "finn":
        splits = _finn_split(len(characters), root, seed, train_characters, val_characters)
        rule_meta: dict[str, Any] = {}
    else:
        splits, held_out = _alphabet_split(characters, root, seed, val_alphabets)
        rule_meta = {"val_alphabets": held_out}
    meta = {
        "split_rule": rule,
        "seed": seed,
        "characters": {name: len(indices) for name, indices in splits.items()},
        "alphabets": {name: len({characters[i].alphabet for i in indices}) for name, indices in splits.items()},
        **rule_meta,
    }
    return splits, meta


def _finn_split(count: int, root: Path, seed: int, train_characters: int, val_characters: int) -> dict[str, list[int]]:
    if count <= train_characters + val_characters:
        raise DataError(
            f"{root}: {count} characters, but split_rule='finn' takes {train_characters} for "
            f"train and {val_characters} for val and needs at least one more for test (the "
            f"original release has 1623; for a smaller data set set train_characters/"
            f"val_characters, on the command line --train-characters/--val-characters)"
        )
    order = np.random.RandomState(seed).permutation(count)
    boundaries = {
        "train": (0, train_characters),
        "val": (train_characters, train_characters + val_characters),
        "test": (train_characters + val_characters, count),
    }
    return {name: sorted(order[start:stop].tolist()) for name, (start, stop) in boundaries.items()}


def _alphabet_split(
    characters: Sequence[_Character], root: Path, seed: int, val_alphabets: int
) -> tuple[dict[str, list[int]], list[str]]:
    background = sorted({c.alphabet for c in characters if c.folder == FOLDERS[0]})
    if len(background) <= val_alphabets:
        raise DataError(
            f"{root / FOLDERS[0]}: {len(background)} alphabets, but split_rule='alphabets' "
            f"holds out {val_alphabets} for val and needs at least one more for train (the "
            f"original release has 30; set val_alphabets for a smaller data set)"
        )
    held_out = sorted(background[i] for i in np.random.RandomState(seed).permutation(len(background))[:val_alphabets])
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for index, character in enumerate(characters):
        if character.folder == FOLDERS[1]:
            splits["test"].append(index)
        else:
            splits["val" if character.alphabet in held_out else "train"].append(index)
    return splits, held_out


def _decode(characters: Sequence[_Character], image_size: int) -> ClassImages:
    """All characters, unrotated: ``uint8 [characters, drawings, 1, size, size]``, ink high."""
    images = _source.decode_classes(
        [c.drawings for c in characters],
        lambda path: _decode_drawing(path, image_size),
        (1, image_size, image_size),
        f"Decoding Omniglot ({image_size}px)",
    )
    classes = tuple(f"{c.folder}/{c.label}" for c in characters)
    return ClassImages(images, classes, {"dataset": "omniglot", "image_size": image_size})


def _decode_drawing(path: Path, image_size: int) -> np.ndarray:
    # the PNGs draw black (0) on white (255); inverted, ink is 255 and x / 255 is MAML's 1 - png / 255
    return 255 - _source.decode_image(path, image_size, channels=1)


def _rotated(decoded: np.ndarray, chosen: Sequence[int]) -> np.ndarray:
    """``[4 * len(chosen), drawings, 1, H, W]``: the chosen characters, each in every rotation in turn."""
    characters = decoded[np.asarray(chosen, dtype=np.intp)]
    rotations = [np.rot90(characters, k=degrees // 90, axes=(-2, -1)) for degrees in ROTATIONS]
    images = np.stack(rotations, axis=1).reshape(-1, *characters.shape[1:])
    images.setflags(write=False)  # as the cache returns arrays: read-only
    return images


def _class_names(characters: Sequence[_Character], chosen: Sequence[int]) -> tuple[str, ...]:
    return tuple(f"{characters[i].label}/rot{degrees}" for i in chosen for degrees in ROTATIONS)
