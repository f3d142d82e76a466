"""The fused kernels (C++, Triton) against the pure-PyTorch reference, and the reference against the math.

Inputs are random and fresh each run (seed in the pytest header); sizes include ones that are not
multiples of any block size; outputs are poisoned with NaN before each call so an element a kernel
forgets to write fails the test. Without a GPU the Triton kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py).
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import subprocess
import sys
import sysconfig
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rkfast
from rkfast import TaskBatch, kernels
from rkfast.functional import rk_meta_step
from rkfast.kernels import cpp, reference, registry
from rkfast.kernels.backend import KernelBackend

from helpers import KERNEL_RTOL, assert_kernel_close, flat_theta, nan_filled, regression_batch, smooth_mlp

SIZES = (1, 7, 1000, 2**16 + 3)
TASKS = (1, 5, 9)  # 9: the C++ reduction's four-row passes plus a remainder
STREAMS = (1, 2, 4, 5)  # 5: more inputs than one Triton launch takes (chunked)
DTYPES = (torch.float32, torch.float64)
RTOL = KERNEL_RTOL


FUSED = kernels.runnable_targets()  # (backend, device) of every fused backend this machine can run
ALL = kernels.runnable_targets(fused_only=False)  # ... and the pure-PyTorch reference on every device here


def _ids(targets):
    return [f"{b}-{d}" for b, d in targets]




def _inputs(n: int, tasks: int, streams: int, dtype: torch.dtype, device: str):
    theta = torch.randn(n, dtype=dtype, device=device)
    slopes = [torch.randn(tasks, n, dtype=dtype, device=device) for _ in range(streams)]
    coefs = (torch.randn(streams, dtype=torch.float64) * 0.7).tolist()
    return theta, slopes, coefs


# -- the build ----------------------------------------------------------------------------------------


def _has_compiler() -> bool:
    cxx = (sysconfig.get_config_var("CXX") or "c++").split()[0]
    return shutil.which(cxx) is not None or shutil.which("c++") is not None


def test_cpp_extension_is_built_where_a_compiler_exists():
    # the CI machine has g++, so this asserts the extension was really compiled by `pip install` there
    if _has_compiler():
        assert kernels.available()["cpp"], f"rkfast._C did not import: {cpp.IMPORT_ERROR}"
    assert kernels.available()["torch"]


@pytest.mark.skipif(sys.platform != "linux", reason="Triton ships Linux wheels only")
def test_triton_backend_is_exercised_here():
    # the test extra installs Triton; without a GPU the interpreter runs its kernels on CPU tensors
    assert kernels.available()["triton"], registry.backend_status("triton")[1]


# -- forward ops against the reference -------------------------------------------------------------------


def every_case(test):
    """Every fused backend x dtype x number of input streams x tasks x size."""
    for name, values, ids in [("backend,device", FUSED, _ids(FUSED)), ("dtype", DTYPES, str),
                              ("streams", STREAMS, None), ("tasks", TASKS, None), ("n", SIZES, None)]:
        test = pytest.mark.parametrize(name, values, ids=ids)(test)
    return test


@every_case
def test_stage_point_matches_reference(backend, device, dtype, streams, tasks, n):
    theta, slopes, coefs = _inputs(n, tasks, streams, dtype, device)
    out = kernels.stage_point(theta, slopes, coefs, out=nan_filled((tasks, n), dtype, device), backend=backend)
    ref = kernels.stage_point(theta, slopes, coefs, out=nan_filled((tasks, n), dtype, device), backend="torch")
    bound = theta.abs().double() + sum(abs(c) * k.abs().double() for c, k in zip(coefs, slopes))
    assert_kernel_close(out, ref, bound, dtype)
    # the allocating (differentiable) form computes the same
    assert_kernel_close(kernels.stage_point(theta, slopes, coefs, backend=backend), ref, bound, dtype)


@every_case
def test_combine_matches_reference(backend, device, dtype, streams, tasks, n):
    _, grads, weights = _inputs(n, tasks, streams, dtype, device)
    out = kernels.combine(grads, weights, out=nan_filled((n,), dtype, device), backend=backend)
    ref = kernels.combine(grads, weights, out=nan_filled((n,), dtype, device), backend="torch")
    bound = sum(abs(w) * g.abs().double().sum(0) for w, g in zip(weights, grads))
    assert_kernel_close(out, ref, bound, dtype)
    assert_kernel_close(kernels.combine(grads, weights, backend=backend), ref, bound, dtype)


@every_case
def test_stage_point_backward_matches_reference(backend, device, dtype, streams, tasks, n):
    _, (grad_out,), _ = _inputs(n, tasks, 1, dtype, device)
    coefs = (torch.randn(streams, dtype=torch.float64) * 0.7).tolist()
    results = {}
    for name in (backend, "torch"):
        grad_theta = nan_filled((n,), dtype, device)
        grad_slopes = [nan_filled((tasks, n), dtype, device) for _ in range(streams)]
        registry.backend_module(name).stage_point_backward_(grad_out, coefs, grad_theta, grad_slopes)
        results[name] = (grad_theta, grad_slopes)
    (gt, gs), (rt, rs) = results[backend], results["torch"]
    assert_kernel_close(gt, rt, grad_out.abs().double().sum(0), dtype)
    for g, r in zip(gs, rs):
        assert_kernel_close(g, r, grad_out.abs().double(), dtype)


@pytest.mark.parametrize("backend,device", FUSED, ids=_ids(FUSED))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_axpy_matches_reference(backend, device, dtype, n):
    theta, (d,), (alpha,) = _inputs(n, 1, 1, dtype, device)
    d = d[0]
    fused, ref = theta.clone(), theta.clone()
    assert kernels.axpy_(fused, d, alpha, backend=backend) is fused
    kernels.axpy_(ref, d, alpha, backend="torch")
    assert_kernel_close(fused, ref, theta.abs().double() + abs(alpha) * d.abs().double(), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half-precision storage is a GPU (Triton) feature")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_triton_half_storage_accumulates_in_float32(dtype, n):
    theta, slopes, coefs = _inputs(n, 5, 4, dtype, "cuda")
    eps = torch.finfo(dtype).eps
    out = kernels.stage_point(theta, slopes, coefs, out=nan_filled((5, n), dtype, "cuda"), backend="triton")
    exact = kernels.stage_point(theta.float(), [k.float() for k in slopes], coefs, backend="torch")
    torch.testing.assert_close(out.float(), exact, rtol=eps, atol=eps * exact.abs().max().item())
    comb = kernels.combine(slopes, coefs, out=nan_filled((n,), dtype, "cuda"), backend="triton")
    exact = kernels.combine([k.float() for k in slopes], coefs, backend="torch")
    torch.testing.assert_close(comb.float(), exact, rtol=eps, atol=eps * exact.abs().max().item())


# -- the reference against the math ----------------------------------------------------------------------


def test_reference_is_the_formula():
    theta, slopes, coefs = _inputs(9, 3, 3, torch.float64, "cpu")
    expected = torch.stack([theta - sum(c * k[t] for c, k in zip(coefs, slopes)) for t in range(3)])
    torch.testing.assert_close(kernels.stage_point(theta, slopes, coefs, backend="torch"), expected)
    expected = sum(w * g[t] for w, g in zip(coefs, slopes) for t in range(3))
    torch.testing.assert_close(kernels.combine(slopes, coefs, backend="torch"), expected)


@pytest.mark.parametrize("backend,device", ALL, ids=_ids(ALL))
@pytest.mark.parametrize("streams", (1, 5))
def test_stage_point_gradcheck(backend, device, streams):
    theta, slopes, coefs = _inputs(7, 3, streams, torch.float64, device)
    inputs = (theta.requires_grad_(), *(k.requires_grad_() for k in slopes))

    def fn(theta, *slopes):
        return kernels.stage_point(theta, list(slopes), coefs, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)  # its backward is differentiable too (create_graph)


@pytest.mark.parametrize("backend,device", ALL, ids=_ids(ALL))
def test_combine_gradcheck(backend, device):
    _, grads, weights = _inputs(6, 4, 3, torch.float64, device)
    inputs = tuple(g.requires_grad_() for g in grads)
    assert torch.autograd.gradcheck(lambda *g: kernels.combine(list(g), weights, backend=backend), inputs)


@pytest.mark.parametrize("backend,device", FUSED, ids=_ids(FUSED))
@pytest.mark.parametrize("tableau", ["maml", "rk4", "ralston", "maml(3)"])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_direction_through_fused_kernels_matches_reference(backend, device, tableau, first_order):
    model = smooth_mlp().to(device)
    batch = TaskBatch(*(t.to(device) for t in regression_batch(tasks=4)))
    layout, theta = flat_theta(model)
    loss = rkfast.functional.module_task_loss(model, F.mse_loss, layout)
    args = (theta, loss, loss, batch.support, batch.query, tableau, 0.2)
    fused = rk_meta_step(*args, first_order=first_order, backend=backend)
    ref = rk_meta_step(*args, first_order=first_order, backend="torch")
    torch.testing.assert_close(fused.direction, ref.direction, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-12, atol=1e-14)


def test_ops_compose_with_torch_compile():
    theta, slopes, coefs = _inputs(11, 3, 2, torch.float64, "cpu")

    def loss(theta, k0, k1):
        point = kernels.stage_point(theta, [k0, k1], coefs)
        return (kernels.combine([point.sin()], [0.5]) ** 2).sum()

    inputs = [t.clone().requires_grad_() for t in (theta, *slopes)]
    compiled_inputs = [t.clone().requires_grad_() for t in (theta, *slopes)]
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_grads = torch.autograd.grad(loss(*inputs), inputs)
    compiled_grads = torch.autograd.grad(compiled(*compiled_inputs), compiled_inputs)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)


# -- clear errors, raised before anything is written -----------------------------------------------------


def test_bad_arguments_are_named():
    theta, slopes, coefs = _inputs(8, 2, 2, torch.float64, "cpu")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.stage_point(theta, slopes, coefs, backend="cuda")
    with pytest.raises(ValueError, match="2 slopes but 1 coefs"):
        kernels.stage_point(theta, slopes, coefs[:1])
    with pytest.raises(ValueError, match=r"theta must be \[N\] with N = 8"):
        kernels.stage_point(theta[:5], slopes, coefs)
    with pytest.raises(ValueError, match=r"slopes\[1\] has shape \(3, 8\)"):
        kernels.stage_point(theta, [slopes[0], torch.zeros(3, 8, dtype=torch.float64)], coefs)
    with pytest.raises(TypeError, match=r"slopes\[1\] has dtype torch.float32"):
        kernels.stage_point(theta, [slopes[0], slopes[1].float()], coefs)
    with pytest.raises(TypeError, match="grads\\[0\\] must be floating point"):
        kernels.combine([torch.ones(2, 3, dtype=torch.long)], [1.0])
    with pytest.raises(ValueError, match="non-empty list"):
        kernels.combine([], [])
    with pytest.raises(ValueError, match=r"out must have shape \(8,\)"):
        kernels.combine(slopes, coefs, out=torch.empty(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be contiguous"):
        kernels.stage_point(theta, slopes, coefs, out=torch.empty(8, 2, dtype=torch.float64).t())
    with pytest.raises(TypeError, match="backend 'cpp' supports float32 and float64"):
        kernels.stage_point(theta.half(), [k.half() for k in slopes], coefs, backend="cpp")
    with pytest.raises(RuntimeError, match="not differentiable"):
        kernels.stage_point(theta.requires_grad_(), slopes, coefs, out=torch.empty(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="theta and d must both be"):
        kernels.axpy_(torch.zeros(3), torch.zeros(4), 1.0)


def test_triton_on_cpu_needs_the_interpreter():
    # Triton fixes interpretation when its kernels are defined, so this needs a process that imports rkfast
    # without TRITON_INTERPRET
    code = """
import pytest, torch
from rkfast import kernels
with pytest.raises(RuntimeError, match="backend 'triton' runs on CUDA tensors|backend 'triton' is not available"):
    kernels.resolve_backend("triton", torch.device("cpu"), torch.float32)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_auto_backend_choice():
    cpu = torch.device("cpu")
    expected = "cpp" if kernels.available()["cpp"] else "torch"
    assert kernels.resolve_backend("auto", cpu, torch.float32) == expected
    assert kernels.resolve_backend("auto", cpu, torch.bfloat16) == "torch"  # the C++ kernels are f32/f64


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpp, "_C", None)
    monkeypatch.setattr(cpp, "IMPORT_ERROR", ImportError("no compiler"))
    monkeypatch.setattr(registry, "_warned_fallbacks", set())
    assert kernels.available()["cpp"] is False
    with pytest.warns(RuntimeWarning, match="C\\+\\+ kernels are not available \\(no compiler\\)"):
        assert kernels.resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        kernels.resolve_backend("auto", torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available.*no compiler"):
        kernels.resolve_backend("cpp", torch.device("cpu"), torch.float32)
    # and the whole meta-step still runs on the reference kernels
    model, batch = smooth_mlp(), regression_batch()
    opt = rkfast.MetaOptimizer(model, F.mse_loss, tableau="heun", inner_lr=0.1)
    assert opt.backend == "torch"
    assert torch.isfinite(opt.step(batch).loss)


@pytest.mark.skipif(sys.platform != "linux", reason="Triton ships Linux wheels only")
def test_triton_kernels_compile_for_a_real_gpu(tmp_path):
    # the interpreter checks the kernels' logic; this lowers every variant through Triton's compiler to sm_90
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = Path(__file__).with_name("triton_aot.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 84 kernel variants" in done.stdout


def test_out_variants_and_axpy_compose_with_torch_compile():
    theta, slopes, coefs = _inputs(13, 4, 3, torch.float64, "cpu")
    d = torch.randn(13, dtype=torch.float64)

    def step(theta, point, direction):
        kernels.stage_point(theta, slopes, coefs, out=point)
        kernels.combine([point, slopes[0]], [0.25, -0.5], out=direction)
        kernels.axpy_(theta, direction, -0.1)
        kernels.axpy_(theta, d, 0.5)

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        buffers = (theta.clone(), torch.empty(4, 13, dtype=torch.float64), torch.empty(13, dtype=torch.float64))
        with torch.no_grad():
            fn(*buffers)
        results.append(buffers)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
    expected_point = theta - sum(c * k for c, k in zip(coefs, slopes))
    torch.testing.assert_close(results[0][1], expected_point)


@pytest.mark.skipif(not kernels.available()["cpp"], reason="needs the C++ extension (asserted built above)")
def test_cpp_baseline_instruction_set_copy_matches_reference():
    # the extension holds a baseline and an AVX2 copy of every kernel; the tests above run the one this CPU
    # picks, this runs the baseline copy in a fresh process
    code = """
import torch, rkfast._C as C
from rkfast import kernels
assert C.isa() == "baseline", C.isa()
for dtype in (torch.float32, torch.float64):
    for n, t in ((1, 1), (1000, 5), (70003, 9)):
        theta, ks = torch.randn(n, dtype=dtype), [torch.randn(t, n, dtype=dtype) for _ in range(5)]
        c = [0.3, -0.2, 0.7, 0.1, -0.4]
        for f in (lambda b: kernels.stage_point(theta, ks, c, backend=b), lambda b: kernels.combine(ks, c, backend=b)):
            torch.testing.assert_close(f("cpp"), f("torch"), rtol=1e-6, atol=1e-5)
print("ok")
"""
    env = {**os.environ, "RKFAST_CPU_ISA": "baseline"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


# -- the backend registry ------------------------------------------------------------------------------

KERNEL_NAMES = [name for name, member in vars(KernelBackend).items()
                if inspect.isfunction(member) and not name.startswith("_") and name != "status"]


def _parameters(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("name", kernels.BACKENDS)
def test_registered_backends_satisfy_the_protocol(name):
    usable, why = registry.backend_status(name)
    try:
        module = registry.backend_module(name)
    except RuntimeError:
        assert not usable and why  # its module did not import: unavailable, with the import error as reason
        pytest.skip(f"backend {name!r} does not import here: {why}")
    assert isinstance(module, KernelBackend)
    assert module.NAME == name
    assert isinstance(module.status(), tuple) and module.status() == (usable, why)
    for member, declared in vars(KernelBackend).items():
        if inspect.isfunction(declared) and not member.startswith("_"):
            assert _parameters(getattr(module, member)) == _parameters(declared), member
    if module.DEVICE_TYPES is not None:  # "auto" prefers a backend only where it runs
        assert set(module.AUTO_FOR) <= set(module.DEVICE_TYPES)
    assert module.DTYPES is None or all(d.is_floating_point for d in module.DTYPES)


def _toy_backend(usable: bool = True) -> types.ModuleType:
    """A backend module made on the fly: the reference kernels, recording their calls, on float64 CPU tensors,
    preferred by "auto" on CPU."""
    toy = types.ModuleType("rkfast_test_toy_kernels")
    toy.NAME, toy.LABEL, toy.HINT = "toy", "toy", "build the toy"
    toy.DEVICE_TYPES, toy.DTYPES, toy.AUTO_FOR = ("cpu",), (torch.float64,), ("cpu",)
    toy.status = lambda: (True, "") if usable else (False, "the toy is broken")
    toy.calls = []

    def recorded(kernel):
        @functools.wraps(kernel)
        def call(*args):
            toy.calls.append(kernel.__name__)
            kernel(*args)

        return call

    for name in KERNEL_NAMES:
        setattr(toy, name, recorded(getattr(reference, name)))
    return toy


def _register(monkeypatch, toy: types.ModuleType) -> None:
    """``toy``'s registry line, for this test only: first, so "auto" prefers it over the C++ kernels on CPU."""
    monkeypatch.setitem(sys.modules, toy.__name__, toy)  # stands in for the module's file
    monkeypatch.setattr(registry, "REGISTRY", {toy.NAME: toy.__name__, **registry.REGISTRY})


def test_a_backend_is_one_module_and_one_registry_line(monkeypatch):
    toy = _toy_backend()
    _register(monkeypatch, toy)
    cpu = torch.device("cpu")
    assert isinstance(toy, KernelBackend)
    assert kernels.available()["toy"] is True
    assert "toy" in kernels.backend_choices()
    assert ("toy", "cpu") in kernels.runnable_targets()
    assert kernels.resolve_backend("toy", cpu, torch.float64) == "toy"
    assert kernels.resolve_backend("auto", cpu, torch.float64) == "toy"
    assert kernels.resolve_backend("auto", cpu, torch.float32) == "torch"  # a dtype the toy does not run
    with pytest.raises(TypeError, match="backend 'toy' supports float64, got torch.float32"):
        kernels.resolve_backend("toy", cpu, torch.float32)
    with pytest.raises(RuntimeError, match="backend 'toy' runs on CPU tensors, got tensors on meta"):
        kernels.resolve_backend("toy", torch.device("meta"), torch.float64)

    theta, slopes, coefs = _inputs(10, 3, 2, torch.float64, "cpu")
    for backend in ("toy", "auto"):
        toy.calls.clear()
        point = kernels.stage_point(theta, slopes, coefs, backend=backend)
        torch.testing.assert_close(point, kernels.stage_point(theta, slopes, coefs, backend="torch"))
        torch.testing.assert_close(kernels.combine(slopes, coefs, backend=backend),
                                   kernels.combine(slopes, coefs, backend="torch"))
        torch.testing.assert_close(kernels.axpy_(theta.clone(), slopes[0][0], 0.5, backend=backend),
                                   theta + 0.5 * slopes[0][0])
        # and the autograd path: the backward is the backend's fused kernel
        leaf = theta.clone().requires_grad_()
        kernels.stage_point(leaf, slopes, coefs, backend=backend).sum().backward()
        torch.testing.assert_close(leaf.grad, torch.full_like(theta, 3.0))
        # the per-element coefficients' op, forward and fused backward
        vectors = [torch.full_like(theta, c).requires_grad_() for c in coefs]
        point = kernels.stage_point_elementwise(theta, slopes, vectors, backend=backend)
        torch.testing.assert_close(point, kernels.stage_point(theta, slopes, coefs, backend="torch"))
        point.sum().backward()
        torch.testing.assert_close(vectors[1].grad, -slopes[1].sum(0))
        assert set(toy.calls) == set(KERNEL_NAMES), toy.calls


def test_auto_warns_once_when_its_preferred_backend_is_unusable(monkeypatch):
    _register(monkeypatch, _toy_backend(usable=False))
    monkeypatch.setattr(registry, "_warned_fallbacks", set())
    cpu = torch.device("cpu")
    assert kernels.available()["toy"] is False
    assert all(name != "toy" for name, _ in kernels.runnable_targets())
    warning = (r"rkfast's toy kernels are not available \(the toy is broken\); CPU tensors use the pure-PyTorch "
               r"kernels. To use them, build the toy.")
    with pytest.warns(RuntimeWarning, match=warning):
        assert kernels.resolve_backend("auto", cpu, torch.float64) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        assert kernels.resolve_backend("auto", cpu, torch.float64) == "torch"
    with pytest.raises(RuntimeError, match=r"backend 'toy' is not available \(the toy is broken\); build the toy"):
        kernels.resolve_backend("toy", cpu, torch.float64)


def test_a_backend_whose_module_fails_to_import_is_unavailable(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "missing", "rkfast_test_no_such_module")
    monkeypatch.setattr(registry, "_import_failures", {})
    usable, why = registry.backend_status("missing")
    assert not usable and "ModuleNotFoundError" in why
    assert kernels.available()["missing"] is False
    assert all(name != "missing" for name, _ in kernels.runnable_targets(fused_only=False))
    with pytest.raises(RuntimeError, match=r"backend 'missing' is not available \(ModuleNotFoundError"):
        kernels.resolve_backend("missing", torch.device("cpu"), torch.float32)
    assert kernels.resolve_backend("auto", torch.device("cpu"), torch.float32) in kernels.BACKENDS
