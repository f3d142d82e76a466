"""Build script: compiles the C++ kernels (``rkfast._C``); the package metadata lives in pyproject.toml.

The extension is plain C++ over raw buffers (pybind11, no libtorch), built with ``-O3`` and OpenMP when the
compiler supports it. The kernels carry an AVX2 copy chosen at run time, so the default build is portable
and fast; ``RKFAST_NATIVE=1`` adds ``-march=native`` (not portable to other CPUs).

If the extension cannot be built (no working compiler, no pybind11, a compile error), the package still
installs and rkfast falls back to its pure-PyTorch kernels; set ``RKFAST_REQUIRE_CPP=1`` to make a failed
build an error instead. A failed build writes why into the package (``rkfast/_build_info.json``), so that
rkfast's run-time warning can say what happened and how to fix it: pip shows a build's output only with
``-v`` or when the build fails, so the warning printed here is also written to the terminal (``/dev/tty``)
when there is one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator

from setuptools import Extension, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pybind11 is a build requirement; without it, install the pure-Python package
    Pybind11Extension = None
    from setuptools.command.build_ext import build_ext

try:
    from setuptools.errors import BaseError as _SetupError
except ImportError:  # setuptools < 59
    from distutils.errors import DistutilsError as _SetupError

PACKAGE = "rkfast"
BUILD_RECORD = "_build_info.json"  # read by rkfast/kernels/cpp.py; present only when the extension was not built
REQUIRE = os.environ.get("RKFAST_REQUIRE_CPP") == "1"


class CppBuildFailed(Exception):
    """Why the extension was not built: ``reason`` is one line for rkfast's run-time warning."""

    def __init__(self, reason: str, output: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.output = output  # what the compiler printed


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Collects everything written to stdout and stderr, the compiler's own messages included (file
    descriptors 1 and 2), and echoes it to stderr at the end; yields a list that then holds the text."""
    text: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text.append(sink.read().decode(errors="replace"))
            sys.stderr.write(text[0])
            sys.stderr.flush()


_ERROR_LINE = re.compile(r"(^|[\s:])(fatal )?error( [A-Z]+\d+)?:", re.IGNORECASE)  # gcc, clang and MSVC


def _first_error(output: str) -> str:
    """The compiler's first error line in ``output``, or ''."""
    for line in output.splitlines():
        if _ERROR_LINE.search(line):
            return line.strip()[:300]
    return ""


def _describe(exc: BaseException) -> str:
    """``exc`` in one short line: a failed command by its program and exit code, not its whole command line."""
    seen = exc
    while seen is not None:
        if isinstance(seen, subprocess.CalledProcessError):
            program = seen.cmd[0] if isinstance(seen.cmd, (list, tuple)) and seen.cmd else seen.cmd
            return f"command {str(program)!r} failed with exit code {seen.returncode}"
        if isinstance(seen, FileNotFoundError) and seen.filename:
            return f"command {str(seen.filename)!r} not found"
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _compile_error(compiler, source: str, flags: list[str], link: bool) -> tuple[str, str] | None:
    """None when the compiler compiles (and with ``link``, links into a program) ``source`` with ``flags``;
    else what went wrong, and the compiler's output."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        try:
            with _captured_output() as output:
                objects = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
                if link:
                    compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=flags)
        except Exception as exc:  # noqa: BLE001 - any failure means "does not work"
            printed = output[0] if output else ""
            first = _first_error(printed)
            return _describe(exc) + (f" ({first})" if first else ""), printed
    return None


class OptionalBuildExt(build_ext):
    """Checks the compiler and adds OpenMP when available. A failed build is a warning, recorded in the
    package (``rkfast/_build_info.json``), unless RKFAST_REQUIRE_CPP=1 makes it an error."""

    def build_extensions(self) -> None:
        if Pybind11Extension is None:
            raise CppBuildFailed("pybind11 was not installed in the build environment (pip installs it, a build "
                                 "requirement, unless --no-build-isolation is given)")
        error = _compile_error(self.compiler, "int main() { return 0; }\n", [], link=False)
        if error is not None:
            raise CppBuildFailed(f"no working C++ compiler: {error[0]}", error[1])
        openmp = ["/openmp"] if self.compiler.compiler_type == "msvc" else ["-fopenmp"]
        omp_probe = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
        if _compile_error(self.compiler, omp_probe, openmp, link=True) is not None:
            openmp = []
            print("rkfast: the compiler has no OpenMP; building the C++ kernels single-threaded", file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args += openmp
            ext.extra_link_args += openmp
        with _captured_output() as output:
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                failure = exc
            else:
                failure = None
        if failure is not None:
            first = _first_error(output[0])
            raise CppBuildFailed(f"compiling the C++ kernels failed: {_describe(failure)}"
                                 + (f" ({first})" if first else ""), output[0])

    def run(self) -> None:
        inplace = self.inplace  # setuptools' run() clears it while building and leaves it cleared if that raises
        self._record_written = False
        try:
            super().run()
        except Exception as exc:  # any build failure leaves the pure-PyTorch fallback
            self.inplace = inplace
            reason = exc.reason if isinstance(exc, CppBuildFailed) else f"{type(exc).__name__}: {_describe(exc)}"
            output = exc.output if isinstance(exc, CppBuildFailed) else ""
            if REQUIRE:
                raise _SetupError(f"rkfast: RKFAST_REQUIRE_CPP=1 and the C++ kernels (rkfast._C) were not "
                                  f"built: {reason}") from exc
            self._write_record(reason, output)
            _tell_user(
                f"rkfast: WARNING: the C++ kernels (rkfast._C) were not built: {reason}.\n"
                "rkfast: rkfast still installs and runs on its pure-PyTorch kernels (the same results, slower).\n"
                "rkfast: to build them, install a C++ compiler (g++ or clang) and reinstall rkfast; with "
                "RKFAST_REQUIRE_CPP=1 set, a failed build stops the install and shows the compiler's error."
            )
        else:
            for regular, target in self._record_paths().items():
                for path in {regular, target}:
                    if os.path.exists(path):  # from an earlier failed build into the same folder
                        os.remove(path)

    def _record_paths(self) -> dict[str, str]:
        """Where the build record goes: the build folder, and with ``--inplace`` (an editable install) the
        package's source folder, keyed by the build folder's path."""
        regular = os.path.join(self.build_lib, PACKAGE, BUILD_RECORD)
        if not self.inplace:
            return {regular: regular}
        source = self.get_finalized_command("build_py").get_package_dir(PACKAGE)
        return {regular: os.path.join(source, BUILD_RECORD)}

    def _write_record(self, reason: str, output: str) -> None:
        record = {
            "cpp_extension": "not built",
            "reason": reason,
            "compiler_output": output.splitlines()[-40:],
            "python": sys.version.split()[0],
            "platform": sysconfig.get_platform(),
            "hint": "install a C++ compiler (g++ or clang) and reinstall rkfast; RKFAST_REQUIRE_CPP=1 makes a "
                    "failed build an error",
        }
        for regular, target in self._record_paths().items():
            for path in {regular, target}:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump(record, f, indent=1)
                    f.write("\n")
        self._record_written = True

    def get_outputs(self) -> list[str]:
        outputs = super().get_outputs()
        if getattr(self, "_record_written", False):
            outputs += [p for p in self._record_paths() if p not in outputs]
        return outputs

    def get_output_mapping(self) -> dict[str, str]:
        mapping = dict(super().get_output_mapping())
        if getattr(self, "_record_written", False) and self.inplace:
            mapping.update(self._record_paths())
        return mapping


def _tell_user(message: str) -> None:
    """Print ``message`` to stderr, and to the terminal too: pip hides a build's output unless ``-v``."""
    print(message, file=sys.stderr, flush=True)
    try:
        if sys.stderr.isatty():
            return  # run directly (python setup.py ...): the message is already on the terminal
        with open("/dev/tty", "w") as tty:  # no terminal (CI, Windows): OSError, and the record must do
            tty.write("\n" + message + "\n")
    except OSError:
        pass


if Pybind11Extension is not None:
    compile_args = ["-O3"] if sys.platform != "win32" else ["/O2"]
    if os.environ.get("RKFAST_NATIVE") == "1":
        compile_args.append("-march=native")
    extension = Pybind11Extension("rkfast._C", ["csrc/kernels.cpp"], depends=["csrc/kernels_impl.h"], cxx_std=17,
                                  extra_compile_args=compile_args)
else:  # a placeholder, so that build_ext runs and records (or with RKFAST_REQUIRE_CPP=1, raises) why not
    extension = Extension("rkfast._C", ["csrc/kernels.cpp"], depends=["csrc/kernels_impl.h"])

setup(ext_modules=[extension], cmdclass={"build_ext": OptionalBuildExt})
