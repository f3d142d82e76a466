"""The on-disk cache of decoded images: a data set is decoded once, later runs map the array in seconds.

Each cached :class:`~rkfast.data.images.ClassImages` is two files in the cache folder
(:func:`cache_dir`), named after the data and a hash of everything the array depends on (the *key*)::

    <name>-<hash>.npy   the uint8 array, uncompressed .npy, so that a hit is a read-only memory map
    <name>-<hash>.json  {"format", "name", "key", "shape", "dtype", "classes", "meta"}

``<hash>`` is the first 16 hex digits of the SHA-256 of the key's canonical JSON. The key holds the data
set, its resolved root, a :func:`fingerprint` of the source files, the image size, and the loader's
format version: changing any of them (editing a source file included) makes a new pair of files.

Both files are written atomically (a temporary file in the same folder, flushed to disk, renamed), the
``.npy`` first; a reader starts from the ``.json``, so it never finds an index without its complete array.
A cache file that cannot be read back (truncated, corrupt, the wrong shape) is rebuilt with a
:class:`CacheWarning`; a cache folder that cannot be written gives one warning per process and uncached
data.
Bit flips inside the array's data are not detected (that would mean hashing it on every hit).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..runs import atomic_write, write_json
from .images import ClassImages

__all__ = ["CACHE_FORMAT", "CacheWarning", "cache_dir", "cache_files", "cached", "fingerprint"]

CACHE_FORMAT = "rkfast-images/1"
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_warned: set[str] = set()  # cache folders already warned about as unwritable, in this process


class CacheWarning(UserWarning):
    """The image cache could not be used: a cache file was rebuilt, or the data was not cached."""


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``explicit`` when given, else ``$RKFAST_CACHE``, else ``$XDG_CACHE_HOME/rkfast``,
    else ``~/.cache/rkfast`` (empty variables count as unset). Nothing is created here."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get("RKFAST_CACHE"):
        return Path(os.environ["RKFAST_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "rkfast"
    return Path.home() / ".cache" / "rkfast"


def fingerprint(files: Iterable[tuple[str, os.stat_result]]) -> dict[str, Any]:
    """A cheap fingerprint of source files, from ``(name, stat)`` pairs (names relative to the data root):
    their count, total size, newest modification time and a hash of their names. Editing, adding,
    removing or renaming a file changes it; nothing is read but the folder listings and ``stat``."""
    count = total_bytes = newest_ns = 0
    names = hashlib.sha256()
    for name, stat in sorted(files, key=lambda file: file[0]):
        count += 1
        total_bytes += stat.st_size
        newest_ns = max(newest_ns, stat.st_mtime_ns)
        names.update(name.encode("utf-8", "surrogateescape") + b"\n")
    return {"files": count, "bytes": total_bytes, "newest_mtime_ns": newest_ns, "names_sha256": names.hexdigest()[:16]}


def cache_files(name: str, key: dict[str, Any], directory: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """The ``(.npy, .json)`` paths that cache ``name`` under ``key`` (see the module docstring)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"cache name {name!r}: use letters, digits, '.', '_' and '-' only")
    digest = hashlib.sha256(_canonical(key).encode()).hexdigest()[:16]
    folder = cache_dir(directory)
    return folder / f"{name}-{digest}.npy", folder / f"{name}-{digest}.json"


def cached(
    name: str, key: dict[str, Any], build: Callable[[], ClassImages], directory: str | os.PathLike[str] | None = None
) -> ClassImages:
    """``build()``'s images, from the cache when an earlier call stored them under the same ``name`` and
    ``key``, else built now and stored.

    Args:
        name: the first part of the file names (e.g. ``"omniglot-28px"``).
        key: everything the array depends on (JSON-serializable; paths are written as strings).
        build: decodes the data; its errors propagate, and nothing is written before it returns.
        directory: the cache folder; None: :func:`cache_dir`'s default.

    Returns:
        the images; ``images`` is read-only either way (a memory map of the cache file on a hit).
    """
    array_path, index_path = cache_files(name, key, directory)
    hit = _load(array_path, index_path, key)
    if hit is not None:
        return hit
    built = build()
    # as a hit would return it: read-only images, meta as JSON gives it back (tuples become lists)
    built.images.setflags(write=False)
    built = ClassImages(built.images, built.classes, json.loads(json.dumps(built.meta, default=str)))
    try:
        _store(array_path, index_path, name, key, built)
    except OSError as error:
        _warn_once(
            str(array_path.parent),
            f"cannot write the image cache in {array_path.parent} ({error}); using the data "
            f"uncached (set RKFAST_CACHE or pass a writable cache folder)",
        )
    return built


def _canonical(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


def _load(array_path: Path, index_path: Path, key: dict[str, Any]) -> ClassImages | None:
    """The cached images, or None on a miss (after a warning when the files are there but unusable)."""
    try:
        text = index_path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # never written (or the folder is a file: see _store)
        return None
    except OSError as error:
        warnings.warn(
            f"cannot read the image cache file {index_path} ({error}); rebuilding it", CacheWarning, stacklevel=3
        )
        return None
    try:
        index = json.loads(text)
        if index.get("format") != CACHE_FORMAT or index.get("key") != json.loads(_canonical(key)):
            return None  # written by another version (or a hash collision): not this data
        images = np.load(array_path, mmap_mode="r", allow_pickle=False)
        expected_shape = tuple(index["shape"])
        if images.dtype != np.uint8 or images.shape != expected_shape:
            raise ValueError(f"holds {images.dtype} {images.shape}, its index says uint8 {expected_shape}")
        return ClassImages(images, tuple(index["classes"]), index["meta"])
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as error:
        # np.load of a truncated file: ValueError (mmap larger than the file) or EOFError (empty file)
        warnings.warn(
            f"the image cache file {array_path} is unusable ({error}); rebuilding it", CacheWarning, stacklevel=3
        )
        return None


def _store(array_path: Path, index_path: Path, name: str, key: dict[str, Any], data: ClassImages) -> None:
    """The array, then its index (a reader that finds the index finds the complete array)."""
    atomic_write(array_path, lambda file: np.save(file, np.ascontiguousarray(data.images), allow_pickle=False), "wb")
    try:
        write_json(
            index_path,
            {
                "format": CACHE_FORMAT,
                "name": name,
                "key": json.loads(_canonical(key)),
                "shape": list(data.images.shape),
                "dtype": "uint8",
                "classes": list(data.classes),
                "meta": data.meta,
            },
        )
    except OSError:
        array_path.unlink(missing_ok=True)  # an array without its index is never read: free the space
        raise


def _warn_once(topic: str, message: str) -> None:
    """One warning per topic and process (an unwritable folder would otherwise warn at every split)."""
    if topic not in _warned:
        _warned.add(topic)
        warnings.warn(message, CacheWarning, stacklevel=3)
