"""Build script: compiles the C++ kernels (``rkfast._C``); the package metadata lives in pyproject.toml.

The extension is plain C++ over raw buffers (pybind11, no libtorch), built with ``-O3`` and OpenMP when the
compiler supports it. If it cannot be built (no compiler), the package still installs and rkfast falls back
to its pure-PyTorch kernels with a warning; set ``RKFAST_REQUIRE_CPP=1`` to make a failed build an error.
The kernels carry an AVX2 copy chosen at run time, so the default build is portable and fast;
``RKFAST_NATIVE=1`` adds ``-march=native`` (not portable to other CPUs).
"""

from __future__ import annotations

import os
import sys
import tempfile

from setuptools import setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pybind11 is a build requirement; without it, install the pure-Python package
    Pybind11Extension = None
    from setuptools.command.build_ext import build_ext


def _flag_works(compiler, flags: list[str]) -> bool:
    """Whether the compiler accepts ``flags`` when compiling and linking a tiny OpenMP program."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            objects = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=flags)
        except Exception:
            return False
    return True


class OptionalBuildExt(build_ext):
    """Adds OpenMP when available; turns a failed build into a warning unless RKFAST_REQUIRE_CPP=1."""

    def build_extensions(self) -> None:
        openmp = ["/openmp"] if self.compiler.compiler_type == "msvc" else ["-fopenmp"]
        if not _flag_works(self.compiler, openmp):
            openmp = []
            print("rkfast: the compiler has no OpenMP; building the C++ kernels single-threaded", file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args += openmp
            ext.extra_link_args += openmp
        super().build_extensions()

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure leaves the pure-PyTorch fallback
            if os.environ.get("RKFAST_REQUIRE_CPP") == "1":
                raise
            print(f"rkfast: WARNING: the C++ kernels were not built ({exc}); "
                  "rkfast will use its pure-PyTorch kernels on CPU", file=sys.stderr)


ext_modules = []
if Pybind11Extension is not None:
    compile_args = ["-O3"] if sys.platform != "win32" else ["/O2"]
    if os.environ.get("RKFAST_NATIVE") == "1":
        compile_args.append("-march=native")
    ext_modules.append(
        Pybind11Extension("rkfast._C", ["csrc/kernels.cpp"], depends=["csrc/kernels_impl.h"], cxx_std=17,
                          extra_compile_args=compile_args)
    )
elif os.environ.get("RKFAST_REQUIRE_CPP") == "1":
    raise RuntimeError("RKFAST_REQUIRE_CPP=1 but pybind11 is not installed in the build environment")

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
