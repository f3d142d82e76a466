"""The checks a contributor runs (docs/contributing.md), run by the test suite too, so that
``pip install -e ".[test]" && python -m pytest`` holds the tree to them: the import layers (import-linter),
lint and formatting (ruff), types (mypy) and the size limits (tools/check_sizes.py).

The tools come with the test extra; a missing one fails here with the command that installs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {
    "import layers": ["lint-imports"],
    "ruff lint": ["ruff", "check", "rkfast"],
    "ruff format": ["ruff", "format", "--check", "rkfast"],
    "mypy": [sys.executable, "-m", "mypy", "rkfast"],
    "sizes": [sys.executable, "tools/check_sizes.py"],
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_the_tree_passes(name: str) -> None:
    command = CHECKS[name]
    if command[0] != sys.executable and shutil.which(command[0]) is None:
        pytest.fail(f"{command[0]} is not installed: pip install -e '.[test]' brings it")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
