"""tools/check_sizes.py, the size limits' check: run as CI runs it, on synthetic files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "check_sizes.py"


def _function(name: str, lines: int, indent: str = "") -> str:
    """A function of exactly ``lines`` lines, its docstring included."""
    body = [f'{indent}    """A docstring counts."""'] + [f"{indent}    x = {i}" for i in range(lines - 2)]
    return "\n".join([f"{indent}def {name}():", *body]) + "\n"


def _class(name: str, lines: int, method_lines: int = 0) -> str:
    """A class of exactly ``lines`` lines: a docstring, a method of ``method_lines`` (if any), attributes."""
    method = _function("method", method_lines, indent="    ").splitlines() if method_lines else []
    attributes = [f"    a{i} = {i}" for i in range(lines - 2 - len(method))]
    return "\n".join([f"class {name}:", '    """Doc."""', *method, *attributes]) + "\n"


def _check(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_the_synthetic_shapes_have_the_lengths_they_say():
    assert len(_function("f", 80).splitlines()) == 80
    assert len(_class("C", 400).splitlines()) == 400
    assert len(_class("C", 400, method_lines=80).splitlines()) == 400


def test_at_the_limits_passes(tmp_path):
    (tmp_path / "ok.py").write_text(_function("longest", 80) + "\n\n" + _class("Largest", 400, method_lines=80))
    done = _check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


def test_a_function_over_80_lines_fails_naming_it(tmp_path):
    path = tmp_path / "long.py"
    path.write_text("import os\n\n\n" + _function("too_long", 81))
    done = _check(path)
    assert done.returncode == 1
    assert done.stdout == f"{path}:4: too_long is 81 lines (limit 80)\n"


def test_a_class_over_400_lines_fails_and_so_does_its_long_method(tmp_path):
    path = tmp_path / "big.py"
    path.write_text(_class("TooBig", 401, method_lines=81))
    done = _check(path)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"{path}:1: TooBig is 401 lines (limit 400)",
        f"{path}:3: method is 81 lines (limit 80)",
    ]


def test_folders_are_searched_and_limits_can_be_set(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    nested = tmp_path / "pkg" / "sub" / "mod.py"
    nested.write_text(_function("medium", 30))
    assert _check(tmp_path / "pkg").returncode == 0
    done = _check(tmp_path / "pkg", "--function-lines", "20")
    assert done.returncode == 1
    assert done.stdout == f"{nested}:1: medium is 30 lines (limit 20)\n"


def test_a_missing_path_is_an_error(tmp_path):
    done = _check(tmp_path / "nowhere")
    assert done.returncode != 0
    assert "no such file or folder" in done.stderr
