"""The C++ extension's absence, said plainly: at build time (setup.py records why it did not build) and at run
time (one warning under ``backend="auto"``, an error for ``backend="cpp"``, naming the cause and the fix).

The run-time cases are simulated (``rkfast._C`` not built / built but failing to load) by re-running the C++
backend's loader with a patched module finder; the build-time cases build real wheels from a copy of the
source tree with a broken compiler or without pybind11.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import rkfast
from rkfast import kernels
from rkfast.kernels import cpp, registry

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
REASON = "no working C++ compiler: command '/bin/false' failed with exit code 1"


def _simulate(monkeypatch, package_dir: Path, *, found: bool, load_error: BaseException | None = None,
              source: tuple[str, bool] | None = None, installed: str | None = None) -> None:
    """Re-run the C++ backend's loader as if ``rkfast._C`` were absent (``found=False``) or present but raising
    ``load_error`` on import, with ``package_dir`` as rkfast's folder and ``installed`` as the only other copy
    of rkfast with a compiled ``_C`` (``None``: there is none); install its results for this test."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != cpp.EXTENSION:
            return real_find_spec(name, *args, **kwargs)
        if not found:
            return None
        origin = str(package_dir / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}")
        return importlib.machinery.ModuleSpec(name, None, origin=origin)

    def import_module(name, *args, **kwargs):
        assert name == cpp.EXTENSION
        raise load_error

    monkeypatch.setattr(cpp.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(cpp.importlib, "import_module", import_module)
    monkeypatch.setattr(cpp, "_PACKAGE_DIR", str(package_dir))
    monkeypatch.setattr(cpp, "_install_source", lambda: source)
    monkeypatch.setattr(cpp, "compiled_copy_elsewhere", lambda _package_dir: installed)
    loaded, error, hint = cpp._load()
    monkeypatch.undo()  # the patched finder only for the loader; the results stay for the test
    assert loaded is None
    monkeypatch.setattr(cpp, "_C", None)
    monkeypatch.setattr(cpp, "IMPORT_ERROR", error)
    monkeypatch.setattr(cpp, "HINT", hint)
    monkeypatch.setattr(registry, "_warned_fallbacks", set())


def _record(package_dir: Path, reason: str = REASON) -> None:
    (package_dir / cpp.BUILD_RECORD).write_text(json.dumps({"cpp_extension": "not built", "reason": reason}))


def _auto_warning() -> str:
    """The one warning that ``backend="auto"`` gives on CPU float32 tensors; checks that it comes once."""
    with pytest.warns(RuntimeWarning) as caught:
        assert kernels.resolve_backend("auto", CPU, torch.float32) == "torch"
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once per process
        assert kernels.resolve_backend("auto", CPU, torch.float64) == "torch"
    return str(caught[0].message)


def _cpp_error() -> str:
    with pytest.raises(RuntimeError) as raised:
        kernels.resolve_backend("cpp", CPU, torch.float32)
    return str(raised.value)


def _assert_messages(cause: str, fix: str) -> str:
    """The "auto" warning and the ``backend="cpp"`` error say ``cause`` and ``fix``, word for word; the warning."""
    warning = _auto_warning()
    assert warning == (f"rkfast's C++ kernels are not available ({cause}); CPU tensors use the pure-PyTorch "
                       f"kernels. To use them, {fix}. (The pure-PyTorch kernels compute the same results, more "
                       "slowly.)")
    assert _cpp_error() == f"backend 'cpp' is not available ({cause}); {fix}, or use backend='torch'"
    return warning


# -- run time: what the warning and the error say ------------------------------------------------------


def test_not_built_says_why_and_how_to_build(monkeypatch, tmp_path):
    _record(tmp_path)
    _simulate(monkeypatch, tmp_path, found=False, source=("/src/rkfast", False))
    assert kernels.available()["cpp"] is False
    cause = f"rkfast._C was not built when rkfast was installed: {REASON}"
    fix = ("install a C++ compiler (g++ or clang) and reinstall rkfast: "
           "`RKFAST_REQUIRE_CPP=1 pip install --force-reinstall --no-deps /src/rkfast` "
           "(RKFAST_REQUIRE_CPP=1 makes a failed build an error)")
    warning = _assert_messages(cause, fix)
    assert "circular import" not in warning


def test_not_built_without_a_record_still_says_so(monkeypatch, tmp_path):
    _simulate(monkeypatch, tmp_path, found=False, source=None)
    warning = _auto_warning()
    assert f"rkfast._C was not built when rkfast was installed (there is no rkfast._C in {tmp_path})" in warning
    # not knowing where rkfast came from, the hint names both ways to reinstall
    assert "install a C++ compiler (g++ or clang) and reinstall rkfast" in warning
    assert "`RKFAST_REQUIRE_CPP=1 pip install --force-reinstall --no-deps .` in rkfast's source folder" in warning
    assert "--no-cache-dir rkfast`" in warning  # else pip reuses the wheel it built without the extension
    assert "was not built when rkfast was installed" in _cpp_error()


def test_an_editable_install_is_told_to_reinstall_editable(monkeypatch, tmp_path):
    _record(tmp_path)
    _simulate(monkeypatch, tmp_path, found=False, source=("/work/my rkfast", True))
    assert "`RKFAST_REQUIRE_CPP=1 pip install --force-reinstall --no-deps -e '/work/my rkfast'`" in _auto_warning()


@pytest.mark.parametrize("error", [ImportError("/x/_C.so: undefined symbol: _ZN6rkfast4axpyE"),
                                   OSError("libgomp.so.1: cannot open shared object file")],
                         ids=["ImportError", "OSError"])
def test_built_but_failing_to_load_says_so_with_the_error(monkeypatch, tmp_path, error):
    _record(tmp_path)  # a stale record must not hide that there is a module file, which fails to load
    _simulate(monkeypatch, tmp_path, found=True, load_error=error, source=("/src/rkfast", False))
    cause = f"rkfast._C was built but fails to load ({tmp_path}{os.sep}_C"
    warning = _auto_warning()
    assert cause in warning and f"{type(error).__name__}: {error}" in warning
    assert "was not built" not in warning and REASON not in warning
    assert ("To use them, reinstall rkfast so that rkfast._C is rebuilt here: "
            "`RKFAST_REQUIRE_CPP=1 pip install --force-reinstall --no-deps /src/rkfast`.") in warning
    error_text = _cpp_error()
    assert cause in error_text and str(error) in error_text and "reinstall rkfast" in error_text


def test_a_build_for_another_python_is_named(monkeypatch, tmp_path):
    (tmp_path / "_C.cpython-39-x86_64-linux-gnu.so").write_bytes(b"")
    _simulate(monkeypatch, tmp_path, found=False, source=None)
    warning = _auto_warning()
    assert f"rkfast._C was built for another Python: {tmp_path} holds _C.cpython-39-x86_64-linux-gnu.so" in warning
    assert "To use them, rebuild it for this Python: `RKFAST_REQUIRE_CPP=1 pip install" in warning


def test_a_missing_extension_is_not_mistaken_for_a_circular_import(monkeypatch, tmp_path):
    # `from .. import _C` said "cannot import name '_C' from partially initialized module 'rkfast' (most likely
    # due to a circular import)" when the backend was first loaded while rkfast was still being imported
    monkeypatch.setitem(sys.modules, cpp.EXTENSION, None)  # what the import system sees when there is no file
    monkeypatch.setattr(rkfast.__spec__, "_initializing", True, raising=False)
    monkeypatch.setattr(cpp, "_PACKAGE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "compiled_copy_elsewhere", lambda _package_dir: None)  # no compiled copy elsewhere
    _record(tmp_path)
    loaded, error, _ = cpp._load()
    assert loaded is None
    assert str(error) == f"rkfast._C was not built when rkfast was installed: {REASON}"


# -- run time: a source tree that shadows the installed, compiled copy ----------------------------------


def _package(folder: Path, *files: str) -> Path:
    """A fake ``rkfast`` package folder under ``folder`` holding empty ``files``."""
    package = folder / "rkfast"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in files:
        (package / name).write_bytes(b"")
    return package


EXTENSION_FILE = f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"


def test_a_compiled_copy_elsewhere_on_the_path_is_found(tmp_path):
    source = _package(tmp_path / "clone")
    (tmp_path / "clone" / "setup.py").write_text("")
    installed = _package(tmp_path / "site-packages", EXTENSION_FILE)
    entries = [str(tmp_path / "clone"), str(tmp_path / "nowhere"), str(tmp_path / "site-packages")]
    assert cpp.compiled_copy_elsewhere(str(source), entries) == str(installed)


def test_only_a_compiled_copy_for_this_python_counts(tmp_path):
    source = _package(tmp_path / "clone")
    _package(tmp_path / "other", "_C.cpython-39-x86_64-linux-gnu.so", "_C.cpp")
    _package(tmp_path / "uncompiled")
    entries = [str(tmp_path / name) for name in ("clone", "other", "uncompiled")]
    assert cpp.compiled_copy_elsewhere(str(source), entries) is None


def test_the_imported_folder_itself_is_not_another_copy(tmp_path):
    source = _package(tmp_path / "clone", EXTENSION_FILE)
    assert cpp.compiled_copy_elsewhere(str(source), [str(tmp_path / "clone"), str(tmp_path / "clone" / ".")]) is None


def test_a_source_tree_shadowing_the_installed_copy_says_so(monkeypatch, tmp_path):
    source = _package(tmp_path / "clone")
    installed = str(tmp_path / "site-packages" / "rkfast")
    _simulate(monkeypatch, source, found=False, installed=installed)
    cause = (f"rkfast was imported from the source tree at {tmp_path / 'clone'}, which has no compiled `_C`; "
             f"the installed copy is at {installed}")
    fix = "run from another folder, or `pip install -e .`"
    warning = _assert_messages(cause, fix)
    assert "compiler" not in warning


def test_without_a_compiled_copy_anywhere_the_compiler_advice_stays(monkeypatch, tmp_path):
    source = _package(tmp_path / "clone")
    _simulate(monkeypatch, source, found=False, installed=None)
    warning = _auto_warning()
    assert "install a C++ compiler (g++ or clang) and reinstall rkfast" in warning
    assert "source tree" not in warning


# -- build time: a failed build is recorded in the wheel -----------------------------------------------


def _source_copy(dest: Path) -> Path:
    """The files a build reads (not the built extension, caches or build folders)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", cpp.BUILD_RECORD, "*.egg-info")
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for folder in ("rkfast", "csrc"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    return dest


def _build_wheel(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``pip wheel`` of a copy of the source tree in this environment (no build isolation, no downloads)."""
    (tmp_path / "src").mkdir()
    src, out = _source_copy(tmp_path / "src"), tmp_path / "wheels"
    environ = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **env}
    if "RKFAST_REQUIRE_CPP" not in env:
        environ.pop("RKFAST_REQUIRE_CPP", None)
    done = subprocess.run(  # -v: pip shows the build's output only then (or when the build fails)
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        env=environ, capture_output=True, text=True, timeout=300,
        start_new_session=True,  # no controlling terminal: setup.py's notice for a person goes nowhere
    )
    return done, out


def _wheel_record(out: Path) -> tuple[dict, list[str]]:
    (wheel,) = out.glob("rkfast-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        return json.loads(zf.read(f"rkfast/{cpp.BUILD_RECORD}")), names


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_setuptools = pytest.mark.skipif(not _has("setuptools"), reason="building a wheel without build isolation "
                                      "needs setuptools installed here")


@pytest.fixture
def no_pybind11(tmp_path) -> dict[str, str]:
    """PYTHONPATH that hides any installed pybind11 behind a stub without ``setup_helpers``."""
    stub = tmp_path / "stub"
    (stub / "pybind11").mkdir(parents=True)
    (stub / "pybind11" / "__init__.py").write_text("")
    return {"PYTHONPATH": os.pathsep.join([str(stub), *filter(None, [os.environ.get("PYTHONPATH")])])}


@needs_setuptools
def test_a_build_without_pybind11_installs_and_records_why(tmp_path, no_pybind11, monkeypatch):
    done, out = _build_wheel(tmp_path, **no_pybind11)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record, names = _wheel_record(out)
    assert record["cpp_extension"] == "not built"
    assert record["reason"].startswith("pybind11 was not installed in the build environment")
    assert not any(name.startswith("rkfast/_C.") for name in names)
    # and rkfast, installed from that wheel, says it
    package = tmp_path / "installed"
    package.mkdir()
    (package / cpp.BUILD_RECORD).write_text(json.dumps(record))
    _simulate(monkeypatch, package, found=False)
    assert "rkfast._C was not built when rkfast was installed: pybind11 was not installed" in _auto_warning()


@needs_setuptools
def test_require_cpp_makes_a_failed_build_an_error(tmp_path, no_pybind11):
    done, _ = _build_wheel(tmp_path, RKFAST_REQUIRE_CPP="1", **no_pybind11)
    assert done.returncode != 0
    assert ("RKFAST_REQUIRE_CPP=1 and the C++ kernels (rkfast._C) were not built: pybind11 was not installed"
            in done.stdout + done.stderr)


@pytest.mark.skipif(sys.platform == "win32" or not os.path.exists("/bin/false"), reason="uses /bin/false as the "
                    "compiler")
@pytest.mark.skipif(not (_has("setuptools") and _has("pybind11")), reason="building the extension without build "
                    "isolation needs setuptools and pybind11 installed here (pip install pybind11)")
def test_a_build_without_a_working_compiler_installs_and_records_why(tmp_path, monkeypatch):
    done, out = _build_wheel(tmp_path, CC="/bin/false", CXX="/bin/false")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record, names = _wheel_record(out)
    assert record["reason"] == REASON
    assert not any(name.startswith("rkfast/_C.") for name in names)
    assert f"rkfast: WARNING: the C++ kernels (rkfast._C) were not built: {REASON}." in done.stdout + done.stderr
    package = tmp_path / "installed"
    package.mkdir()
    (package / cpp.BUILD_RECORD).write_text(json.dumps(record))
    _simulate(monkeypatch, package, found=False)
    assert f"rkfast._C was not built when rkfast was installed: {REASON}" in _auto_warning()


@pytest.mark.skipif(not (_has("setuptools") and _has("pybind11")), reason="building the extension without build "
                    "isolation needs setuptools and pybind11 installed here (pip install pybind11)")
def test_a_script_in_the_clone_root_is_told_of_the_installed_copy(tmp_path):
    """``pip install .`` (not editable) into a fresh venv, then a script run from the clone's root: it imports
    the clone, which has no ``_C``, and the warning names the clone and the installed copy."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    # torch, pip, setuptools and pybind11 from this environment, without running its .pth files (which
    # would add an editable install of rkfast)
    modules = [importlib.util.find_spec(name) for name in ("torch", "numpy", "pip", "setuptools", "pybind11")]
    here = dict.fromkeys(str(Path(spec.origin).parent.parent) for spec in modules if spec and spec.origin)
    (site / "dependencies.pth").write_text("\n".join(here) + "\n")
    (tmp_path / "clone").mkdir()
    clone = _source_copy(tmp_path / "clone")
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "RKFAST_"))}
    environ.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(clone)],
                          env=environ, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    installed = site / "rkfast"
    assert any(name.name.startswith("_C.") for name in installed.iterdir()), "the installed copy has no _C"
    script = ("import warnings, torch, rkfast.kernels.cpp\n"
              "from rkfast import kernels\n"
              "warnings.simplefilter('always')\n"
              "kernels.resolve_backend('auto', torch.device('cpu'), torch.float32)\n")
    ran = subprocess.run([str(python), "-c", script], cwd=clone, env=environ, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert (f"rkfast was imported from the source tree at {clone}, which has no compiled `_C`; the installed "
            f"copy is at {installed}); CPU tensors use the pure-PyTorch kernels. To use them, run from another "
            "folder, or `pip install -e .`.") in ran.stderr, ran.stderr


# -- the package's type hints (PEP 561) --------------------------------------------------------------------


def test_the_package_marks_itself_typed():
    assert (Path(rkfast.__file__).parent / "py.typed").is_file()


@needs_setuptools
def test_the_wheel_carries_py_typed(tmp_path, no_pybind11):
    done, out = _build_wheel(tmp_path, **no_pybind11)  # without pybind11: nothing to compile, a quick build
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, names = _wheel_record(out)
    assert "rkfast/py.typed" in names
