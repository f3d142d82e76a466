"""Compile every Triton kernel variant for a GPU target without a GPU (run by test_kernels.py).

Triton's interpreter runs the kernels' logic on CPU but does not compile them; this script lowers each
variant (dtype x number of streams x flags) through Triton's real compiler to a cubin for sm_90, so code
the GPU compiler rejects fails here too. Must run without TRITON_INTERPRET. Prints the variant count.
"""

from __future__ import annotations

import itertools
import os
import re

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rkfast.kernels import triton as kernels  # noqa: E402

INTS = {"n", "tasks", "theta_task_stride"}
SCALAR = re.compile(r"^(c\d|w\d|a)[hl]$")  # the float32 (high, low) coefficient pairs
STORAGE = {"fp32": tl.float32, "fp64": tl.float64, "fp16": tl.float32, "bf16": tl.float32}  # -> accumulator
FLAGS = {"NUM": (1, 2, 3, 4), "ACCUMULATE": (False, True), "WRITE_THETA": (False, True)}


def signature(fn, storage: str) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name.isupper():
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif SCALAR.match(name):
            sig[name] = "fp32"
        else:
            sig[name] = f"*{storage}"
    return sig


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    fns = [kernels._stage_point_kernel, kernels._combine_kernel, kernels._stage_point_backward_kernel,
           kernels._axpy_kernel]
    count = 0
    for fn, (storage, acc) in itertools.product(fns, STORAGE.items()):
        flags = [f for f in FLAGS if f in fn.arg_names]
        for values in itertools.product(*(FLAGS[f] for f in flags)):
            constexprs = {**dict(zip(flags, values)), "ACC": acc, "BLOCK": 1024}
            triton.compile(ASTSource(fn=fn, signature=signature(fn, storage), constexprs=constexprs), target=target)
            count += 1
    print(f"compiled {count} kernel variants for sm_90")


if __name__ == "__main__":
    main()
