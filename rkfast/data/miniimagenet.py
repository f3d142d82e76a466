"""MiniImageNet (Vinyals et al. 2016) with Ravi & Larochelle's split: 64 train, 16 val, 20 test classes of
600 images, in either of its two common layouts (found by looking at the root)::

    csv:    ROOT/{train,val,test}.csv (header "filename,label") and ROOT/images/<filename>
    pickle: ROOT/mini-imagenet-cache-{train,val,test}.pkl, each {"image_data": uint8 [N, 84, 84, 3],
            "class_dict": {wnid: [indices into image_data]}}

When both are there, the csv layout (the published split files) is read. Images are
``uint8 [classes, per_class, 3, size, size]`` RGB, classes sorted by WordNet id, each class's images in
the CSV's (or the class_dict's) order. Images of another size are resized with PIL's LANCZOS filter.
Classes with different image counts are refused (:class:`DataError` naming the class and the counts):
the published split has 600 each, so a difference means missing or extra files, not a choice to make.

Each split is decoded once and cached (:mod:`rkfast.data.cache`); a later call maps the cache file.
"""

from __future__ import annotations

import csv
import functools
import os
import pickle
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _source
from .cache import cached, fingerprint
from .images import ClassImages, DataError

__all__ = ["load_miniimagenet", "SPLITS"]

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1  # of the cached array: bump when decoding changes, so old cache files are not used
CSV_HEADER = ["filename", "label"]
_LAYOUTS = (
    "either {split}.csv (header 'filename,label') with an images/ folder (Ravi & Larochelle's "
    "split), or mini-imagenet-cache-{split}.pkl (the pickled layout)"
)
# What a mini-ImageNet pickle may construct: numpy arrays, dtypes and scalars, and the helpers that
# pickles of bytes use; anything else (os.system...) is refused before it runs.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


def load_miniimagenet(
    root: str | os.PathLike[str], split: str, image_size: int = 84, cache_dir: str | os.PathLike[str] | None = None
) -> ClassImages:
    """One split of MiniImageNet: ``uint8 [classes, per_class, 3, image_size, image_size]`` (RGB).

    The pickled layout is read with a restricted unpickler that only builds numpy arrays, so a pickle
    cannot run code; still, read only pickles you made or downloaded yourself.

    Args:
        root: the folder holding either layout (see the module docs).
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: the side of the returned images (LANCZOS resize when the files differ; 84 is native).
        cache_dir: the folder of the decoded-image cache (default: :func:`rkfast.data.cache.cache_dir`).

    Returns:
        the split; ``meta`` records the data set, root, split, layout, source file, class and image
        counts, image size, resize filter and source fingerprint.

    Raises:
        DataError: a missing root, a root that is a file, neither layout, a CSV with a wrong header or
            a row naming a file not in ``images/``, an unreadable or truncated image, a pickle that
            is not a mini-ImageNet pickle, or classes with different image counts. All before anything
            is written to the cache.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    root = _source.check_root(root, _LAYOUTS.format(split=split))
    csv_file, images_folder = root / f"{split}.csv", root / "images"
    pickle_file = root / f"mini-imagenet-cache-{split}.pkl"
    if csv_file.is_file() and images_folder.is_dir():
        layout, source_file = "csv", csv_file
        source, build = _csv_source(csv_file, images_folder, image_size)
    elif pickle_file.is_file():
        layout, source_file = "pickle", pickle_file
        source = fingerprint([(pickle_file.name, pickle_file.stat())])
        build = functools.partial(_from_pickle, pickle_file, image_size)
    elif csv_file.is_file():
        raise DataError(
            f"{root}: {csv_file.name} is there but no images/ folder; expected {_LAYOUTS.format(split=split)}"
        )
    else:
        raise DataError(f"{root}: no MiniImageNet {split} split; expected {_LAYOUTS.format(split=split)}")
    key = {
        "dataset": "miniimagenet",
        "format": FORMAT_VERSION,
        "root": str(root),
        "split": split,
        "layout": layout,
        "source": source,
        "image_size": image_size,
        "resize": _source.RESIZE_FILTER,
    }
    data = cached(f"miniimagenet-{split}-{image_size}px", key, build, cache_dir)
    meta = {
        "dataset": "miniimagenet",
        "root": str(root),
        "split": split,
        "layout": layout,
        "source_file": source_file.name,
        "classes": data.num_classes,
        "images_per_class": data.per_class,
        "image_size": image_size,
        "resize": _source.RESIZE_FILTER,
        "pixels": "uint8 RGB",
        "source": source,
    }
    return ClassImages(data.images, data.classes, meta)


def _csv_source(
    csv_file: Path, images_folder: Path, image_size: int
) -> tuple[dict[str, Any], Callable[[], ClassImages]]:
    """The csv layout's fingerprint (the CSV and every image it names) and its decoder; a wrong header,
    a missing image or unequal class counts raise here, before any decoding."""
    rows = _read_split_csv(csv_file)
    files = _source.files_by_name(images_folder)
    stats = [(csv_file.name, csv_file.stat())]
    by_class: dict[str, list[Path]] = {}
    missing: list[tuple[int, str]] = []
    for line, filename, label in rows:
        stat = _file_stat(files, images_folder, filename)
        if stat is None:
            missing.append((line, filename))
            continue
        stats.append((f"images/{filename}", stat))
        by_class.setdefault(label, []).append(images_folder / filename)
    if missing:
        line, filename = missing[0]
        more = f" ({len(missing) - 1} more of its files are missing too)" if len(missing) > 1 else ""
        raise DataError(
            f"{csv_file}, line {line}: {images_folder / filename} does not exist{more}; "
            f"expected every file the CSV names in {images_folder}/"
        )
    labels = sorted(by_class)
    _check_class_sizes({label: len(by_class[label]) for label in labels}, csv_file)

    def build() -> ClassImages:
        images = _source.decode_classes(
            [by_class[label] for label in labels],
            lambda path: _source.decode_image(path, image_size, channels=3),
            (3, image_size, image_size),
            f"Decoding MiniImageNet {csv_file.stem} ({image_size}px)",
        )
        return ClassImages(images, tuple(labels))

    return fingerprint(stats), build


def _read_split_csv(csv_file: Path) -> list[tuple[int, str, str]]:
    """``(line, filename, label)`` of each row of a Ravi & Larochelle split file."""
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as file:  # -sig: a BOM is not in the header
            lines = list(csv.reader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{csv_file}: unreadable CSV ({error})") from error
    header = [cell.strip() for cell in lines[0]] if lines else []
    if header != CSV_HEADER:
        raise DataError(
            f"{csv_file}: header {','.join(header)!r}, expected {','.join(CSV_HEADER)!r} "
            f"(Ravi & Larochelle's split files)"
        )
    rows = []
    for line, cells in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != 2 or not all(cell.strip() for cell in cells):
            raise DataError(f"{csv_file}, line {line}: {','.join(cells)!r}, expected 'filename,label'")
        rows.append((line, cells[0].strip(), cells[1].strip()))
    if not rows:
        raise DataError(f"{csv_file}: no images listed; expected 'filename,label' rows after the header")
    return rows


def _file_stat(files: dict[str, os.DirEntry[str]], folder: Path, filename: str) -> os.stat_result | None:
    """The stat of ``folder/filename`` from the folder listing (or the file system, for names with a
    folder part); None when it is not a file."""
    try:
        if filename in files:
            return files[filename].stat()
        stat = (folder / filename).stat()
    except OSError:
        return None
    return stat if (folder / filename).is_file() else None


def _check_class_sizes(sizes: dict[str, int], source: Path) -> None:
    """Every class needs the same number of images (one array): name the first that differs."""
    counts = Counter(sizes.values())
    if len(counts) == 1:
        return
    usual, how_many = counts.most_common(1)[0]
    odd = next(label for label, size in sizes.items() if size != usual)
    raise DataError(
        f"{source}: class {odd!r} has {sizes[odd]} images, but {how_many} other classes have "
        f"{usual}; every class needs the same number (600 in the published split)"
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers only (see :data:`_PICKLE_GLOBALS`)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        return super().find_class(module, name)


def _from_pickle(pickle_file: Path, image_size: int) -> ClassImages:
    """The classes of a ``mini-imagenet-cache-<split>.pkl``, checked and (when asked) resized."""
    image_data, class_dict = _read_pickle(pickle_file)
    labels = sorted(class_dict)
    _check_class_sizes({label: len(class_dict[label]) for label in labels}, pickle_file)
    images = _source.decode_classes(
        [class_dict[label] for label in labels],
        lambda index: _source.resize_pixels(image_data[index], image_size),
        (3, image_size, image_size),
        f"Reading {pickle_file.name} ({image_size}px)",
    )
    return ClassImages(images, tuple(labels))


def _read_pickle(pickle_file: Path) -> tuple[np.ndarray, dict[str, Sequence[int]]]:
    """``image_data`` and ``class_dict`` (indices checked) of a mini-ImageNet pickle."""
    try:
        with open(pickle_file, "rb") as file:
            # latin1: the arrays of Python 2 pickles (it changes nothing for Python 3 ones)
            content = _ArrayUnpickler(file, encoding="latin1").load()
    except Exception as error:  # malformed pickle data can raise nearly any exception type
        raise DataError(f"{pickle_file}: not a readable pickle ({type(error).__name__}: {error})") from error
    expected = "expected a dict with 'image_data' (uint8 [N, H, W, 3]) and 'class_dict' ({wnid: [indices]})"
    if not isinstance(content, dict) or not {"image_data", "class_dict"} <= content.keys():
        found = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise DataError(f"{pickle_file}: holds {found}; {expected}")
    image_data, class_dict = content["image_data"], content["class_dict"]
    if (
        not isinstance(image_data, np.ndarray)
        or image_data.dtype != np.uint8
        or image_data.ndim != 4
        or image_data.shape[3] != 3
    ):
        found = (
            f"{image_data.dtype} {image_data.shape}"
            if isinstance(image_data, np.ndarray)
            else type(image_data).__name__
        )
        raise DataError(f"{pickle_file}: 'image_data' is {found}; {expected}")
    if not isinstance(class_dict, dict) or not class_dict:
        found = "empty" if isinstance(class_dict, dict) else type(class_dict).__name__
        raise DataError(f"{pickle_file}: 'class_dict' is {found}; {expected}")
    return image_data, {
        str(label): _indices(indices, len(image_data), pickle_file, label) for label, indices in class_dict.items()
    }


def _indices(indices: Any, count: int, pickle_file: Path, label: Any) -> list[int]:
    """``class_dict[label]`` as a list of ints, or a DataError when it is not indices into image_data."""
    try:
        array = np.asarray(indices)
    except (TypeError, ValueError):
        array = np.zeros(0)
    if (
        array.ndim != 1
        or array.size == 0
        or not np.issubdtype(array.dtype, np.integer)
        or array.min() < 0
        or array.max() >= count
    ):
        raise DataError(
            f"{pickle_file}: class_dict[{label!r}] is not a list of indices into the {count} images of image_data"
        )
    return array.tolist()
