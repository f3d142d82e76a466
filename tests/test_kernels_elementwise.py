"""``stage_point_elementwise`` (per-element coefficient vectors, Meta-SGD's learned rates): every backend
against the pure-PyTorch reference, forward and backward, and the reference against the math.

Inputs are random and fresh each run (seed in the pytest header); sizes include ones that are not multiples
of any block size; outputs are poisoned with NaN before each call so an element a kernel forgets to write
fails the test. Without a GPU the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest.py), which is slow: it gets the small sizes only.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rkfast import kernels
from rkfast.kernels import registry

from helpers import KERNEL_RTOL, assert_kernel_close, nan_filled

SIZES = (1, 7, 1000, 4099)  # 4099: past one 4096 block (Triton interpreter) and two 2048 blocks (C++ backward)
LARGE = 3 * 8192 + 5  # the C++ forward's 8192-element work items, with a tail
TASKS = (1, 3)
STREAMS = (1, 2, 3, 4, 5)  # 5: more than one Triton launch takes (chunked) and more than one C++ fold group
DTYPES = (torch.float32, torch.float64)
RTOL = KERNEL_RTOL

ALL = kernels.runnable_targets(fused_only=False)
FUSED = kernels.runnable_targets()
SLOW = {"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set()  # interpreted: keep its cases few


def _ids(targets):
    return [f"{b}-{d}" for b, d in targets]




def _inputs(n: int, tasks: int, streams: int, dtype: torch.dtype, device: str):
    theta = torch.randn(n, dtype=dtype, device=device)
    slopes = [torch.randn(tasks, n, dtype=dtype, device=device) for _ in range(streams)]
    coefs = [torch.randn(n, dtype=dtype, device=device) * 0.7 for _ in range(streams)]
    return theta, slopes, coefs


def _cases():
    """(backend, device, dtype, streams, tasks, n): every combination, the interpreted Triton on fewer."""
    for (backend, device), dtype, streams, tasks, n in itertools.product(FUSED, DTYPES, STREAMS, TASKS,
                                                                         (*SIZES, LARGE)):
        if backend in SLOW and (n == LARGE or (streams in (2, 3) and n != 7)):
            continue
        yield pytest.param(backend, device, dtype, streams, tasks, n,
                           id=f"{backend}-{device}-{str(dtype)[6:]}-s{streams}-T{tasks}-n{n}")


CASES = list(_cases())


# -- forward and backward against the reference ------------------------------------------------------------


@pytest.mark.parametrize("backend,device,dtype,streams,tasks,n", CASES)
def test_forward_matches_reference(backend, device, dtype, streams, tasks, n):
    theta, slopes, coefs = _inputs(n, tasks, streams, dtype, device)
    out = kernels.stage_point_elementwise(theta, slopes, coefs, out=nan_filled((tasks, n), dtype, device), backend=backend)
    ref = kernels.stage_point_elementwise(theta, slopes, coefs, out=nan_filled((tasks, n), dtype, device), backend="torch")
    bound = theta.abs().double() + sum(c.abs().double() * k.abs().double() for c, k in zip(coefs, slopes))
    assert_kernel_close(out, ref, bound, dtype)
    # the allocating (differentiable) form computes the same
    assert_kernel_close(kernels.stage_point_elementwise(theta, slopes, coefs, backend=backend), ref, bound, dtype)


def _backward(name, grad_out, slopes, coefs, wanted=(True, True, True)):
    """The backend's backward kernel into NaN-poisoned buffers (the unwanted outputs are ``None``)."""
    tasks, n = grad_out.shape
    like = dict(dtype=grad_out.dtype, device=grad_out.device)
    grad_theta = nan_filled((n,), **like) if wanted[0] else None
    grad_slopes = [nan_filled((tasks, n), **like) for _ in slopes] if wanted[1] else None
    grad_coefs = [nan_filled((n,), **like) for _ in coefs] if wanted[2] else None
    registry.backend_module(name).stage_point_elementwise_backward_(grad_out, slopes, coefs, grad_theta,
                                                                    grad_slopes, grad_coefs)
    return grad_theta, grad_slopes, grad_coefs


@pytest.mark.parametrize("backend,device,dtype,streams,tasks,n", CASES)
def test_backward_matches_reference(backend, device, dtype, streams, tasks, n):
    _, slopes, coefs = _inputs(n, tasks, streams, dtype, device)
    grad_out = torch.randn(tasks, n, dtype=dtype, device=device)
    gt, gs, gc = _backward(backend, grad_out, slopes, coefs)
    rt, rs, rc = _backward("torch", grad_out, slopes, coefs)
    assert_kernel_close(gt, rt, grad_out.abs().double().sum(0), dtype)
    for g, r, c in zip(gs, rs, coefs):
        assert_kernel_close(g, r, c.abs().double() * grad_out.abs().double(), dtype)
    for g, r, k in zip(gc, rc, slopes):
        assert_kernel_close(g, r, (grad_out.abs().double() * k.abs().double()).sum(0), dtype)


@pytest.mark.parametrize("backend,device", ALL, ids=_ids(ALL))
@pytest.mark.parametrize("wanted", [w for w in itertools.product((False, True), repeat=3) if any(w)],
                         ids=lambda w: "".join("tkc"[i] if x else "-" for i, x in enumerate(w)))
def test_backward_computes_only_the_wanted_gradients(backend, device, wanted):
    # the autograd formula skips the gradients no input needs; what is computed is still right
    _, slopes, coefs = _inputs(4099 if backend not in SLOW else 1000, 3, 5, torch.float64, device)
    grad_out = torch.randn_like(slopes[0])
    full = _backward("torch", grad_out, slopes, coefs)
    partial = _backward(backend, grad_out, slopes if wanted[2] else [], coefs if wanted[1] else [], wanted)
    for want, got, ref in zip(wanted, partial, full):
        if not want:
            assert got is None
            continue
        for g, r in zip(got if isinstance(got, list) else [got], ref if isinstance(ref, list) else [ref]):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", ALL, ids=_ids(ALL))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_gradients_match_the_reference(backend, device, dtype):
    # theta, slopes and coefs through the public op's autograd path, against autograd of plain torch code
    theta, slopes, coefs = _inputs(1000, 3, 3, dtype, device)
    grad_out = torch.randn(3, 1000, dtype=dtype, device=device)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (theta, *slopes, *coefs)]
        th, ks, cs = leaves[0], leaves[1:4], leaves[4:]
        out = (kernels.stage_point_elementwise(th, ks, cs, backend=backend) if fused
               else th - sum(c * k for c, k in zip(cs, ks)))
        out.backward(grad_out)
        results.append([t.grad for t in leaves])
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=RTOL[dtype] * 10, atol=10 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("backend,device", ALL, ids=_ids(ALL))
@pytest.mark.parametrize("streams", (1, 5))
def test_gradcheck(backend, device, streams):
    theta, slopes, coefs = _inputs(7, 3, streams, torch.float64, device)
    inputs = (theta.requires_grad_(), *(k.requires_grad_() for k in slopes), *(c.requires_grad_() for c in coefs))

    def fn(theta, *rest):
        return kernels.stage_point_elementwise(theta, list(rest[:streams]), list(rest[streams:]), backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)  # its backward is differentiable too (create_graph)


@pytest.mark.parametrize("backend,device", ALL, ids=_ids(ALL))
def test_gradcheck_with_some_inputs_constant(backend, device):
    theta, slopes, coefs = _inputs(6, 3, 2, torch.float64, device)
    coefs[0].requires_grad_()  # only one coefficient vector and theta are differentiated
    theta.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda th, c0: kernels.stage_point_elementwise(th, slopes, [c0, coefs[1]], backend=backend), (theta, coefs[0]))


# -- the reference against the math, and against the scalar op --------------------------------------------


def test_reference_is_the_formula():
    theta, slopes, coefs = _inputs(9, 3, 3, torch.float64, "cpu")
    expected = torch.stack([theta - sum(c * k[t] for c, k in zip(coefs, slopes)) for t in range(3)])
    torch.testing.assert_close(kernels.stage_point_elementwise(theta, slopes, coefs, backend="torch"), expected)
    grad_out = torch.randn(3, 9, dtype=torch.float64)
    gt, gs, gc = _backward("torch", grad_out, slopes, coefs)
    torch.testing.assert_close(gt, sum(grad_out[t] for t in range(3)))
    for g, c in zip(gs, coefs):
        torch.testing.assert_close(g, -c * grad_out)
    for g, k in zip(gc, slopes):
        torch.testing.assert_close(g, -sum(grad_out[t] * k[t] for t in range(3)))


@pytest.mark.parametrize("backend,device", ALL, ids=_ids(ALL))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constant_vectors_give_the_scalar_op(backend, device, dtype):
    theta, slopes, _ = _inputs(1000, 3, 4, dtype, device)
    scalars = (torch.randn(4, dtype=torch.float64) * 0.7).to(dtype).tolist()  # exactly representable in dtype
    vectors = [torch.full_like(theta, c) for c in scalars]
    scalar_out = kernels.stage_point(theta, slopes, scalars, backend=backend)
    elementwise_out = kernels.stage_point_elementwise(theta, slopes, vectors, backend=backend)
    bound = theta.abs().double() + sum(abs(c) * k.abs().double() for c, k in zip(scalars, slopes))
    assert_kernel_close(elementwise_out, scalar_out, bound, dtype)
    # and the gradients of theta and the slopes agree with the scalar op's
    grad_out = torch.randn_like(scalar_out)
    grads = []
    for op, c in ((kernels.stage_point, scalars), (kernels.stage_point_elementwise, vectors)):
        leaves = [t.clone().requires_grad_() for t in (theta, *slopes)]
        op(leaves[0], leaves[1:], c, backend=backend).backward(grad_out)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=RTOL[dtype], atol=4 * torch.finfo(dtype).eps)


def test_compose_with_torch_compile():
    theta, slopes, coefs = _inputs(11, 3, 2, torch.float64, "cpu")

    def loss(theta, k0, k1, c0, c1):
        return (kernels.stage_point_elementwise(theta, [k0, k1], [c0, c1]).sin() ** 2).sum()

    inputs = [t.clone().requires_grad_() for t in (theta, *slopes, *coefs)]
    compiled_inputs = [t.clone().requires_grad_() for t in (theta, *slopes, *coefs)]
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_grads = torch.autograd.grad(loss(*inputs), inputs)
    compiled_grads = torch.autograd.grad(compiled(*compiled_inputs), compiled_inputs)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)

    def step(theta, point):
        kernels.stage_point_elementwise(theta, slopes, coefs, out=point)

    points = [torch.empty(3, 11, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        step(theta, points[0])
        torch.compile(step, backend="aot_eager", fullgraph=True)(theta, points[1])
    torch.testing.assert_close(points[1], points[0])


# -- clear errors, raised before anything is written -----------------------------------------------------


def test_bad_arguments_are_named():
    theta, slopes, coefs = _inputs(8, 2, 2, torch.float64, "cpu")
    op = kernels.stage_point_elementwise
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        op(theta, slopes, coefs, backend="cuda")
    with pytest.raises(ValueError, match="2 slopes but 1 coefs"):
        op(theta, slopes, coefs[:1])
    with pytest.raises(TypeError, match=r"coefs\[0\] must be a tensor, got float"):
        op(theta, slopes, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"coefs must be a list of \[N\] tensors"):
        op(theta, slopes, torch.stack(coefs))
    with pytest.raises(ValueError, match=r"coefs\[1\] must be \[N\] like theta, shape \(8,\); got shape \(2, 8\)"):
        op(theta, slopes, [coefs[0], coefs[1].expand(2, 8)])
    with pytest.raises(ValueError, match=r"coefs\[0\] must be \[N\] like theta, shape \(8,\); got shape \(7,\)"):
        op(theta, slopes, [coefs[0][:7], coefs[1]])
    with pytest.raises(TypeError, match=r"coefs\[1\] has dtype torch.float32, theta has torch.float64"):
        op(theta, slopes, [coefs[0], coefs[1].float()])
    with pytest.raises(RuntimeError, match=r"coefs\[0\] is on meta, theta on cpu"):
        op(theta, slopes, [coefs[0].to("meta"), coefs[1]])
    with pytest.raises(TypeError, match=r"coefs\[0\] must be floating point"):
        op(theta, slopes, [torch.ones(8, dtype=torch.long), coefs[1]])
    with pytest.raises(ValueError, match=r"theta must be \[N\] with N = 8"):
        op(theta[:5], slopes, coefs)
    with pytest.raises(ValueError, match=r"slopes\[1\] has shape \(3, 8\)"):
        op(theta, [slopes[0], torch.zeros(3, 8, dtype=torch.float64)], coefs)
    with pytest.raises(TypeError, match=r"slopes\[1\] has dtype torch.float32"):
        op(theta, [slopes[0], slopes[1].float()], coefs)
    with pytest.raises(TypeError, match=r"theta has dtype torch.float32, slopes\[0\] has torch.float64"):
        op(theta.float(), slopes, coefs)
    with pytest.raises(ValueError, match="non-empty list"):
        op(theta, [], [])
    with pytest.raises(ValueError, match=r"out must have shape \(2, 8\)"):
        op(theta, slopes, coefs, out=torch.empty(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be contiguous"):
        op(theta, slopes, coefs, out=torch.empty(8, 2, dtype=torch.float64).t())
    with pytest.raises(TypeError, match="backend 'cpp' supports float32 and float64"):
        op(theta.half(), [k.half() for k in slopes], [c.half() for c in coefs], backend="cpp")
    with pytest.raises(RuntimeError, match="not differentiable"):
        op(theta, slopes, [coefs[0].requires_grad_(), coefs[1]], out=torch.empty(2, 8, dtype=torch.float64))


def test_noncontiguous_inputs_are_made_contiguous():
    theta, slopes, coefs = _inputs(8, 2, 2, torch.float64, "cpu")
    strided = [torch.randn(16, dtype=torch.float64)[::2] for _ in range(2)]
    transposed = [k.t().contiguous().t() for k in slopes]
    out = kernels.stage_point_elementwise(theta, transposed, strided)
    torch.testing.assert_close(out, theta - sum(c * k for c, k in zip(strided, slopes)))


# -- the Triton kernels, compiled for a real GPU ------------------------------------------------------------

AOT = """
import itertools, sys
sys.path.insert(0, {tests!r})
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton_aot
from rkfast.kernels import triton as kernels
flags = {{"NUM": (1, 2, 3, 4), "WRITE_THETA": (False, True), "WRITE_SLOPES": (False, True),
          "WRITE_COEFS": (False, True)}}
count = 0
for fn in (kernels._stage_point_elementwise_kernel, kernels._stage_point_elementwise_backward_kernel):
    for storage, acc in triton_aot.STORAGE.items():
        names = [f for f in flags if f in fn.arg_names]
        for values in itertools.product(*(flags[f] for f in names)):
            if storage in ("fp16", "bf16") and values[1:] and not all(values[1:]):
                continue  # half storage: the flag subsets are the same code as fp32's
            constexprs = {{**dict(zip(names, values)), "ACC": acc, "BLOCK": 1024}}
            sig = triton_aot.signature(fn, storage)
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
            count += 1
print(f"compiled {{count}} kernel variants for sm_90")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="Triton ships Linux wheels only")
def test_triton_kernels_compile_for_a_real_gpu(tmp_path):
    # the interpreter checks the kernels' logic; this lowers every variant through Triton's compiler to sm_90
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    code = AOT.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 88 kernel variants" in done.stdout, done.stdout


@pytest.mark.skipif(not kernels.available()["cpp"], reason="needs the C++ extension")
def test_cpp_baseline_instruction_set_copy_matches_reference():
    # the extension holds a baseline and an AVX2 copy of every kernel; the tests above run the one this CPU
    # picks, this runs the baseline copy in a fresh process
    code = """
import torch, rkfast._C as C
from rkfast import kernels
from rkfast.kernels import registry
assert C.isa() == "baseline", C.isa()
for dtype in (torch.float32, torch.float64):
    for n, t in ((1, 1), (1000, 3), (3 * 8192 + 5, 3)):
        theta, ks = torch.randn(n, dtype=dtype), [torch.randn(t, n, dtype=dtype) for _ in range(5)]
        cs = [torch.randn(n, dtype=dtype) for _ in range(5)]
        torch.testing.assert_close(kernels.stage_point_elementwise(theta, ks, cs, backend="cpp"),
                                   kernels.stage_point_elementwise(theta, ks, cs, backend="torch"),
                                   rtol=1e-6, atol=1e-5)
        g = torch.randn(t, n, dtype=dtype)
        results = []
        for name in ("cpp", "torch"):
            grads = (torch.empty(n, dtype=dtype), [torch.empty(t, n, dtype=dtype) for _ in ks],
                     [torch.empty(n, dtype=dtype) for _ in cs])
            registry.backend_module(name).stage_point_elementwise_backward_(g, ks, cs, *grads)
            results.append([grads[0], *grads[1], *grads[2]])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
print("ok")
"""
    env = {**os.environ, "RKFAST_CPU_ISA": "baseline"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
