"""A run's folder on disk: which files it holds, checking it before training, atomic writes, checkpoints.

A run folder holds ``results.json`` (the run as JSON, written at every checkpoint with its ``status``:
``"running"``, ``"interrupted"``, ``"diverged"`` or ``"complete"``), ``checkpoint.pt`` (the latest state:
enough to resume bit for bit), ``best.pt`` (the state at the best held-out evaluation) and the domain's
plots. Every file is written through a temporary file in the same folder, flushed to disk and renamed over
the old one, so an interrupted write never leaves half a file. :class:`RunFolder` checks every output
path before training starts, so a run never trains for an hour and then fails to save.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RunError",
    "RunFolder",
    "atomic_write",
    "write_json",
    "finite_or_none",
    "save_payload",
    "load_checkpoint",
    "CHECKPOINT_FORMAT",
    "READABLE_FORMATS",
    "RUN_FILES",
]

CHECKPOINT_FORMAT = "rkfast-run/2"
READABLE_FORMATS = ("rkfast-run/1", CHECKPOINT_FORMAT)  # /1: written before resume existed (no random state)
RUN_FILES = ("results.json", "checkpoint.pt", "best.pt")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp makes it private)


class RunError(ValueError):
    """A run folder or checkpoint that cannot be used as asked (the message names the file and why)."""


def atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """Write through a temporary file in the same folder, flushed to disk, then renamed over ``path``:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(err: OSError, path: Path) -> str:
    """An ``OSError`` in a few words (``"Permission denied"``), naming the file when it is outside ``path``
    (a parent folder that cannot be created, say; not a probe file inside it)."""
    reason = err.strerror or str(err)
    failed = None if err.filename is None else Path(err.filename)
    if failed is not None and failed != path and path not in failed.parents:
        reason += f" (at {failed})"
    return reason


def finite_or_none(data: Any) -> Any:
    """``data`` (JSON-like: dicts, lists, tuples, numbers, strings) with every NaN or infinity as ``None``
    (strict JSON has no such numbers) and tuples as lists."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k if isinstance(k, str) else str(k): finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(v) for v in data]
    return data


def write_json(path: Path | str, data: Any) -> None:
    """``data`` as indented strict JSON at ``path`` (NaN and infinities as ``null``, :func:`finite_or_none`;
    any other JSON parser reads it), written atomically. Readers of such files take ``null`` where a number
    was as NaN; files written before held bare ``NaN``, which Python's :mod:`json` still reads."""
    text = json.dumps(finite_or_none(data), indent=1, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda f: f.write(text), "w")


def save_payload(path: Path | str, payload: dict[str, Any]) -> None:
    """A checkpoint dictionary at ``path`` (``torch.save``), written atomically."""
    atomic_write(Path(path), lambda f: torch.save(payload, f), "wb")


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a run checkpoint; a missing, truncated or foreign file raises :class:`RunError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise RunError(f"{path} is not a readable rkfast checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        raise RunError(f"{path} is not an rkfast run checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return payload


class RunFolder:
    """The folder of one run and the files it writes there.

    Args:
        path: the folder (created if needed).
        extra_files: file names besides :data:`RUN_FILES` that the run writes there (its plots).
    """

    def __init__(self, path: Path | str, extra_files: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.files = (*RUN_FILES, *extra_files)

    results = property(lambda self: self.path / "results.json", doc="``results.json``")
    checkpoint = property(lambda self: self.path / "checkpoint.pt", doc="``checkpoint.pt``: the latest state")
    best = property(lambda self: self.path / "best.pt", doc="``best.pt``: the best held-out evaluation's state")

    def check_writable(self) -> None:
        """Raise :class:`RunError` unless every output can be written: the folder is (or can be made) a
        writable directory and none of its output names is taken by a directory.

        Writability is established by doing it, not read from permission bits (which say nothing for root,
        ``/proc``, ``/sys``, read-only mounts or ACLs): a missing folder is created with its missing parents,
        and a probe file is created and deleted in it. The folders the check created are removed again (the
        first write creates them for good), so a run that fails before it saves leaves no trace."""
        created: list[Path] = []
        try:
            if self.path.exists() and not self.path.is_dir():
                raise RunError(f"output folder {self.path} is an existing file, not a folder")
            if self.path.is_dir():
                for name in self.files:
                    target = self.path / name
                    if target.is_dir():
                        raise RunError(f"cannot write {target}: a folder of that name is in the way")
            else:
                self._create(created)
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".write-test.")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:  # the probe, or a folder on the way that cannot even be looked at
            raise RunError(f"cannot write into the output folder {self.path}: {_reason(err, self.path)}") from None
        finally:
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:  # no longer empty (another process wrote there): it stays
                    break

    def _create(self, created: list[Path]) -> None:
        """Create the missing folder and its missing parents, outermost first, appending each to ``created``
        (for the caller to remove). Raises :class:`RunError` naming the folder and why it cannot be made."""
        ancestor = next(p for p in self.path.absolute().parents if p.exists())
        if not ancestor.is_dir():
            raise RunError(f"cannot create the output folder {self.path}: {ancestor} is a file")
        for folder in reversed([p for p in (self.path, *self.path.parents) if not p.exists()]):
            try:
                folder.mkdir()
            except OSError as err:
                raise RunError(f"cannot create the output folder {self.path}: {_reason(err, self.path)}") from None
            created.append(folder)

    def holds_run(self) -> bool:
        """Whether an earlier run left its results or checkpoint here."""
        return self.results.is_file() or self.checkpoint.is_file()

    def describe_run(self) -> str:
        """The earlier run in a few words (``"2000 of 20000 meta-steps, interrupted"``), for messages."""
        try:
            data = json.loads(self.results.read_text())
            done, total = data["iteration"], data["config"]["iterations"]
            return f"{done} of {total} meta-steps, {data['status']}"
        except Exception:  # noqa: BLE001 - an old or damaged results.json still names a run
            return "an earlier run"

    def clear(self) -> None:
        """Delete the files an earlier run wrote here (nothing else in the folder is touched)."""
        for name in self.files:
            (self.path / name).unlink(missing_ok=True)
