"""Fails when a function is longer than 80 lines or a class longer than 400 in rkfast/ (docstrings included).

    python tools/check_sizes.py [PATH ...] [--function-lines N] [--class-lines N]

PATH is a folder (every ``*.py`` under it) or a file; the default is ``rkfast``. A function or class is
measured from its ``def``/``class`` line to its last line. Each one over its limit is printed as
``path:line: name is N lines (limit L)``, and the exit status is 1; with none, it is 0.
Long explanations belong in docs/, and a long function in smaller named steps (docs/contributing.md).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

FUNCTION_LINES = 80
CLASS_LINES = 400


def python_files(paths: Sequence[Path]) -> Iterator[Path]:
    """Every ``.py`` file named in ``paths`` or under a folder of it, sorted within each folder."""
    for path in paths:
        if path.is_dir():
            yield from sorted(path.rglob("*.py"))
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")


def oversized(
    path: Path, function_lines: int = FUNCTION_LINES, class_lines: int = CLASS_LINES
) -> Iterator[tuple[int, str, int, int]]:
    """``(line, name, length, limit)`` for each function or class in ``path`` longer than its limit."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            assert node.end_lineno is not None  # set by ast.parse on every statement
            length = node.end_lineno - node.lineno + 1
            limit = class_lines if isinstance(node, ast.ClassDef) else function_lines
            if length > limit:
                yield node.lineno, node.name, length, limit


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("rkfast")], help="files or folders")
    parser.add_argument("--function-lines", type=int, default=FUNCTION_LINES, metavar="N")
    parser.add_argument("--class-lines", type=int, default=CLASS_LINES, metavar="N")
    args = parser.parse_args(argv)
    found = 0
    for path in python_files(args.paths):
        for line, name, length, limit in sorted(oversized(path, args.function_lines, args.class_lines)):
            print(f"{path}:{line}: {name} is {length} lines (limit {limit})")
            found += 1
    if found:
        print(f"{found} function(s) or class(es) over the size limits", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
