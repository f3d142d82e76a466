"""Property-based (hypothesis) tests: random tableaus, shapes, dtypes and backends; random malformed inputs.

1. Random valid inputs: explicit tableaus of 2-5 stages (random entries, zero rows and zero weights
   included, plus the named tableaus and the factories), 1-4 tasks, random shots and widths of a small tanh
   MLP, float32/float64:

   * batched == sequential: ``vectorize=True`` equals ``vectorize=False`` (first and second order; the
     meta-test adaptation too);
   * kernels == reference: every runnable fused backend (C++, Triton, the latter in Triton's interpreter on
     a CPU-only machine) computes ``stage_point`` / ``combine`` / ``axpy_`` as the pure-PyTorch reference
     does, for random sizes (1, primes, around the block sizes) and coefficients; the whole meta-step
     with ``backend=<fused>`` equals ``backend="torch"``;
   * ``MetaOptimizer(outer="sgd").step`` (and ``compute`` + ``apply``) applies ``theta <- theta - lr * d``
     with ``d`` the functional ``meta_step`` direction (models with a 0-d parameter included).

2. Random invalid inputs raise the documented exception type (``MetaOptimizer.step``'s "Raises:",
   :func:`rkfast.batch.check_task_batch`, :class:`rkfast.Tableau`, :func:`rkfast.get_tableau`, the
   factories) and leave the parameters, their ``.grad`` (``None``-ness included) and the serialized
   ``state_dict`` bit-identical: malformed batches to ``step`` / ``compute`` / ``evaluate``, NaN/inf data
   (NonFiniteLossError), a NaN/inf ``.grad`` to ``apply``, a NaN/inf learning rate, calls under
   ``torch.inference_mode()``, bad meta-test step sizes and counts, malformed tableaus and specs.

Only exception types are asserted (messages are not: their wording is not part of the contract).

Every random tensor comes from a ``torch.Generator`` seeded by a drawn integer, so a failing example that
hypothesis prints (seed included) replays exactly; fresh examples are drawn on every run (no
``derandomize``, no example database).
"""

from __future__ import annotations

import math
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from rkfast import (
    MetaOptimizer,
    NonFiniteLossError,
    Tableau,
    TaskBatch,
    get_tableau,
    kernels,
    maml,
    maml_msl,
    named_tableaus,
    rk2,
)
from rkfast.functional import ParamLayout, evaluate, meta_step, module_task_loss, rk_meta_step
from rkfast.tableau import InconsistentTableauWarning

from helpers import assert_unchanged, same_bits, snapshot


# RKFAST_FUZZ_SCALE=10 runs ten times the examples (a longer hunt); the default keeps the file well under a
# minute on a 2-core CPU
SCALE = float(os.environ.get("RKFAST_FUZZ_SCALE", "1"))


def _settings(examples: int) -> settings:
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        database=None,  # nothing to rely on between runs: every run draws fresh examples
        print_blob=True,  # a failure prints @reproduce_failure(...) besides the falsifying example
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.data_too_large],
    )


FUSED = kernels.runnable_targets()  # (backend, device) of every fused backend runnable here
FUSED_CPU = [name for name, device in FUSED if device == "cpu"]
DTYPES = (torch.float32, torch.float64)


# -- strategies --------------------------------------------------------------------------------------

# entries of A and b: exact simple values (zeros often, to exercise skipped slopes / stages and shared
# points) and bounded floats rounded to 4 decimals (no subnormal or huge magnitudes)
SIMPLE = (0.0, 0.0, 0.0, 0.5, 1.0, -1.0, 1 / 3, 2 / 3, 0.25, 1.5, -0.5)
coef = st.one_of(
    st.sampled_from(SIMPLE),
    st.floats(-1.5, 1.5, allow_nan=False, allow_infinity=False).map(lambda x: round(x, 4)),
)


def _quiet_tableau(A, b, name="fuzz") -> Tableau:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InconsistentTableauWarning)  # sum(b) != 1 is valid, only warned about
        return Tableau(A, b, name)


def _quiet_msl(weights) -> Tableau:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InconsistentTableauWarning)
        return maml_msl(weights)


@st.composite
def random_tableaus(draw, min_stages: int = 2, max_stages: int = 5) -> Tableau:
    """An explicit tableau: strictly lower-triangular ``A``, ``b`` with at least one non-zero weight."""
    s = draw(st.integers(min_stages, max_stages))
    A = [[draw(coef) if l < j else 0.0 for l in range(s)] for j in range(s)]
    b = [draw(coef) for _ in range(s)]
    if not any(b):
        b[draw(st.integers(0, s - 1))] = draw(st.sampled_from([1.0, 0.5, -1.0]))
    return _quiet_tableau(A, b)


named = st.sampled_from(sorted(named_tableaus()))
factories = st.one_of(
    st.integers(1, 3).map(maml),
    st.integers(1, 3).map(lambda k: f"maml({k})"),
    st.floats(0.2, 2.0, allow_nan=False).map(lambda c: rk2(round(c, 3))),
    st.sampled_from(["rk2(0.75)", "rk2(1.5)", "maml_msl(0.2, 0.3, 0.5)"]),
    st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]), min_size=2, max_size=4).filter(any).map(_quiet_msl),
)
any_tableau = st.one_of(random_tableaus(), named, factories)

seeds = st.integers(0, 2**31 - 1)
inner_lrs = st.sampled_from([0.01, 0.05, 0.1, 0.3, 0.5])


@st.composite
def problems(draw, dtypes=DTYPES):
    """``(model, batch, theta)``: a small tanh MLP of random width and depth (sometimes with a 0-d parameter)
    and a regression batch."""
    dtype = draw(st.sampled_from(dtypes))
    width = draw(st.integers(1, 6))
    depth = draw(st.integers(1, 2))
    fin, fout = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    tasks, shots, query = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    scalar = draw(st.booleans())  # a 0-d parameter too (a learnable output scale)
    seed = draw(seeds)
    gen = torch.Generator().manual_seed(seed)
    model = tanh_mlp(fin, width, depth, fout, dtype, gen)
    if scalar:
        model = Scaled(model, torch.rand((), generator=gen, dtype=torch.float64).to(dtype) + 0.5)
    batch = TaskBatch(*(torch.randn(tasks, k, f, generator=gen, dtype=torch.float64).to(dtype)
                        for k, f in ((shots, fin), (shots, fout), (query, fin), (query, fout))))
    layout = ParamLayout.from_module(model)
    theta = layout.flatten(list(model.parameters())).detach()
    return model, batch, theta


class Scaled(nn.Module):
    """``scale * body(x)`` with a learnable 0-d ``scale``."""

    def __init__(self, body: nn.Module, scale: torch.Tensor) -> None:
        super().__init__()
        self.body = body
        self.scale = nn.Parameter(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.body(x)


def tanh_mlp(fin: int, width: int, depth: int, fout: int, dtype: torch.dtype, gen: torch.Generator) -> nn.Module:
    """Smooth and deterministic in ``gen`` (not in torch's global generator)."""
    sizes = [fin] + [width] * depth + [fout]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < depth else [])
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1] if p.dim() == 2 else 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in))
    return model


# -- comparisons --------------------------------------------------------------------------------------

# relative error allowed between two computations of one meta-direction, by dtype (orders of summation
# differ between vmap and the loop / the kernels, and the stages amplify the rounding; observed: < 1e-15
# in float64 and < 1e-6 in float32 over hundreds of examples)
META_RTOL = {torch.float64: 1e-11, torch.float32: 2e-5}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, scale: float = 0.0, what=""):
    """``max |actual - expected| <= rtol * max(max |expected|, scale)`` (``scale``: the size of the terms that
    summed to ``expected``, so cancellation to ~0 does not demand a relative error below rounding)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), what
    ref = max(float(expected.abs().max()), scale, 1e-30) if expected.numel() else 1.0
    err = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    assert err <= rtol * ref, f"{what}: max error {err:.3e} > {rtol:.0e} * {ref:.3e}"


def weight_scale(tableau: Tableau | str) -> float:
    return math.fsum(abs(w) for w in get_tableau(tableau).b)


def finite(out) -> bool:
    return bool(torch.isfinite(out.direction).all() and torch.isfinite(out.loss))


# == 1a. batched == sequential ==========================================================================


@_settings(40)
@given(problem=problems(dtypes=(torch.float64,)), tableau=any_tableau, h=inner_lrs)
def test_second_order_batched_equals_sequential(problem, tableau, h):
    model, batch, theta = problem
    vec = meta_step(model, F.mse_loss, theta, batch, tableau, h)
    seq = meta_step(model, F.mse_loss, theta, batch, tableau, h, vectorize=False)
    assume(finite(seq))
    rtol = META_RTOL[theta.dtype]
    assert_close_scaled(vec.direction, seq.direction, rtol, weight_scale(tableau), "direction")
    assert_close_scaled(vec.loss, seq.loss, rtol, weight_scale(tableau), "loss")
    assert vec.stage_losses.keys() == seq.stage_losses.keys()
    for j in seq.stage_losses:
        assert_close_scaled(vec.stage_losses[j], seq.stage_losses[j], rtol, what=f"stage {j}")


@_settings(40)
@given(problem=problems(), tableau=any_tableau, h=inner_lrs)
def test_first_order_batched_equals_sequential(problem, tableau, h):
    model, batch, theta = problem
    vec = meta_step(model, F.mse_loss, theta, batch, tableau, h, first_order=True)
    seq = meta_step(model, F.mse_loss, theta, batch, tableau, h, first_order=True, vectorize=False)
    assume(finite(seq))
    rtol = META_RTOL[theta.dtype]
    assert_close_scaled(vec.direction, seq.direction, rtol, weight_scale(tableau), "direction")
    assert_close_scaled(vec.loss, seq.loss, rtol, weight_scale(tableau), "loss")
    assert vec.stage_losses.keys() == seq.stage_losses.keys()


@_settings(25)
@given(problem=problems(), tableau=any_tableau, h=inner_lrs, first_order=st.booleans())
def test_rk_meta_step_with_pytree_data_batched_equals_sequential(problem, tableau, h, first_order):
    """The core function with its own per-task loss and dict data (not the module/TaskBatch wrapper)."""
    model, batch, theta = problem
    if not first_order:
        theta = theta.double()
        model = model.double()
        batch = TaskBatch(*(t.double() for t in batch))
    layout = ParamLayout.from_module(model)
    inner = module_task_loss(model, F.mse_loss, layout)

    def loss(row, data):  # a per-task loss over dict data: (x, y) from the dict, plus a metric
        value, _ = inner(row, (data["x"], data["y"]))
        return value, {"rms": value.sqrt()}

    support = {"x": batch.support_x, "y": batch.support_y}
    query = {"x": batch.query_x, "y": batch.query_y}
    runs = [rk_meta_step(theta, loss, loss, support, query, tableau, h, first_order=first_order, vectorize=v)
            for v in (True, False)]
    assume(finite(runs[1]))
    rtol = META_RTOL[theta.dtype]
    assert_close_scaled(runs[0].direction, runs[1].direction, rtol, weight_scale(tableau), "direction")
    assert runs[0].stage_metrics.keys() == runs[1].stage_metrics.keys() == {"rms"}


@_settings(25)
@given(problem=problems(), step=st.sampled_from([0.01, 0.1, 0.3]),
       steps=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_adapt_batched_equals_sequential(problem, step, steps):
    model, batch, theta = problem
    vec = evaluate(model, F.mse_loss, theta, batch, step, steps, keep_params=True)
    seq = evaluate(model, F.mse_loss, theta, batch, step, steps, vectorize=False, keep_params=True)
    assert vec.steps == seq.steps == (0, *sorted(set(steps)))
    assume(bool(torch.isfinite(seq.losses).all()))
    # a diverging adaptation (seen: float32, 4 steps of 0.3 took the parameters from ~3 to 1.6e6) amplifies
    # the two paths' different roundings without bound: the comparison is only meaningful where it stays put
    assume(float(seq.params.abs().max()) <= 100 * max(1.0, float(theta.abs().max())))
    rtol = META_RTOL[theta.dtype]
    assert_close_scaled(vec.losses, seq.losses, rtol, what="losses")
    assert_close_scaled(vec.params, seq.params, rtol, float(theta.abs().max()), "params")


# == 1b. kernels == reference ============================================================================

# sizes: 1, primes, and around the blocks (C++ vector widths; Triton's interpreter block of 4096)
SPECIAL_SIZES = (1, 2, 3, 5, 7, 8, 13, 31, 33, 127, 257, 1021, 4093, 4095, 4096, 4097, 8191, 8193)
sizes = st.one_of(st.sampled_from(SPECIAL_SIZES), st.integers(1, 9000))
# coefficients of realistic size (h * A[j][l], b[j] / T, -lr): zero or 1e-6 <= |c| <= 1e3, random sign
# (see test_triton_float64_coefficients_outside_float32_range for magnitudes beyond float32's range)
kernel_coefs = st.one_of(
    st.just(0.0),
    st.builds(lambda m, neg: -m if neg else m, st.floats(1e-6, 1e3), st.booleans()),
)
KERNEL_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _assert_kernel_close(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype):
    """As tests/test_kernels.py: ``|out - ref| <= rtol |ref| + 8 eps * bound`` elementwise, ``bound`` the same
    sum over absolute values; NaN poison left in ``out`` fails."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any(), "an element was not written (NaN poison left)"
    err = (out.double() - ref.double()).abs()
    tol = KERNEL_RTOL[dtype] * ref.double().abs() + 8 * torch.finfo(dtype).eps * bound.double()
    worst = int((err - tol).argmax())
    assert bool((err <= tol).all()), f"at {worst}: {out.flatten()[worst]} vs reference {ref.flatten()[worst]}"


@st.composite
def kernel_inputs(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n, tasks, streams = draw(sizes), draw(st.integers(1, 9)), draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(seeds))
    theta = torch.randn(n, generator=gen, dtype=dtype)
    slopes = [torch.randn(tasks, n, generator=gen, dtype=dtype) for _ in range(streams)]
    coefs = draw(st.lists(kernel_coefs, min_size=streams, max_size=streams))
    return theta, slopes, coefs


def _nan(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)


@pytest.mark.parametrize("backend", FUSED_CPU)
@_settings(30)
@given(inputs=kernel_inputs())
def test_stage_point_kernel_equals_reference(backend, inputs):
    theta, slopes, coefs = inputs
    shape = tuple(slopes[0].shape)
    ref = kernels.stage_point(theta, slopes, coefs, out=_nan(shape, theta), backend="torch")
    out = kernels.stage_point(theta, slopes, coefs, out=_nan(shape, theta), backend=backend)
    bound = theta.abs().double() + sum(abs(c) * k.abs().double() for c, k in zip(coefs, slopes))
    _assert_kernel_close(out, ref, bound, theta.dtype)
    _assert_kernel_close(kernels.stage_point(theta, slopes, coefs, backend=backend), ref, bound, theta.dtype)


@pytest.mark.parametrize("backend", FUSED_CPU)
@_settings(20)
@given(inputs=kernel_inputs(), seed=seeds)
def test_stage_point_backward_kernel_equals_reference(backend, inputs, seed):
    """The differentiable form's backward (the fused ``stage_point_backward`` kernel) against the reference's."""
    theta, slopes, coefs = inputs
    weight = torch.randn(slopes[0].shape, generator=torch.Generator().manual_seed(seed), dtype=theta.dtype)
    grads = {}
    for name in ("torch", backend):
        leaves = [theta.clone().requires_grad_(), *(k.clone().requires_grad_() for k in slopes)]
        point = kernels.stage_point(leaves[0], leaves[1:], coefs, backend=name)
        grads[name] = torch.autograd.grad((point * weight).sum(), leaves)
    (ref_theta, *ref_slopes), (out_theta, *out_slopes) = grads["torch"], grads[backend]
    _assert_kernel_close(out_theta, ref_theta, weight.abs().double().sum(0), theta.dtype)
    for out, ref, c in zip(out_slopes, ref_slopes, coefs):
        _assert_kernel_close(out, ref, abs(c) * weight.abs().double(), theta.dtype)


@pytest.mark.parametrize("backend", FUSED_CPU)
@_settings(30)
@given(inputs=kernel_inputs())
def test_combine_kernel_equals_reference(backend, inputs):
    _, grads, weights = inputs
    n = grads[0].shape[1]
    ref = kernels.combine(grads, weights, out=_nan((n,), grads[0]), backend="torch")
    out = kernels.combine(grads, weights, out=_nan((n,), grads[0]), backend=backend)
    bound = sum(abs(w) * g.abs().double().sum(0) for w, g in zip(weights, grads))
    _assert_kernel_close(out, ref, bound, grads[0].dtype)
    _assert_kernel_close(kernels.combine(grads, weights, backend=backend), ref, bound, grads[0].dtype)


@pytest.mark.parametrize("backend", FUSED_CPU)
@_settings(30)
@given(inputs=kernel_inputs(), alpha=kernel_coefs)
def test_axpy_kernel_equals_reference(backend, inputs, alpha):
    theta, slopes, _ = inputs
    d = slopes[0][0].clone()
    fused, ref = theta.clone(), theta.clone()
    assert kernels.axpy_(fused, d, alpha, backend=backend) is fused
    kernels.axpy_(ref, d, alpha, backend="torch")
    _assert_kernel_close(fused, ref, theta.abs().double() + abs(alpha) * d.abs().double(), theta.dtype)


@pytest.mark.parametrize("backend", FUSED_CPU)
@_settings(20)
@given(problem=problems(), tableau=any_tableau, h=inner_lrs, first_order=st.booleans(), vectorize=st.booleans())
def test_meta_step_on_kernel_backend_equals_reference(backend, problem, tableau, h, first_order, vectorize):
    model, batch, theta = problem
    if not first_order:  # second order in float64
        model, theta = model.double(), theta.double()
        batch = TaskBatch(*(t.double() for t in batch))
    args = (model, F.mse_loss, theta, batch, tableau, h)
    ref = meta_step(*args, first_order=first_order, vectorize=vectorize, backend="torch")
    out = meta_step(*args, first_order=first_order, vectorize=vectorize, backend=backend)
    assume(finite(ref))
    rtol = META_RTOL[theta.dtype]
    assert_close_scaled(out.direction, ref.direction, rtol, weight_scale(tableau), "direction")
    assert_close_scaled(out.loss, ref.loss, rtol, weight_scale(tableau), "loss")


# == 1c. MetaOptimizer == functional meta_step + the plain SGD rule ========================================


@_settings(40)
@given(problem=problems(), tableau=any_tableau, h=inner_lrs, first_order=st.booleans(),
       lr=st.sampled_from([0.01, 0.1, 0.5, 1.0]), steps=st.integers(1, 2),
       backend=st.sampled_from(["auto", "torch", *FUSED_CPU]), split=st.booleans(), tasks2=st.integers(1, 8))
def test_optimizer_step_is_functional_direction_with_sgd(problem, tableau, h, first_order, lr, steps, backend,
                                                         split, tasks2):
    """``step`` (or ``compute`` then ``apply``: ``split``) with the plain SGD outer rule; a second step on a
    batch of another number of tasks (``tasks2``: the workspace's buffers change shape)."""
    model, batch, theta = problem
    if not first_order:
        model = model.double()
        batch = TaskBatch(*(t.double() for t in batch))
    opt = MetaOptimizer(model, F.mse_loss, tableau=tableau, inner_lr=h, outer="sgd", lr=lr,
                        first_order=first_order, backend=backend)
    rtol = {torch.float64: 1e-12, torch.float32: 1e-6}[opt.dtype]
    for k in range(steps):
        step_batch = batch if k == 0 else TaskBatch(*(torch.cat([t.flip(0), t, t])[:tasks2] for t in batch))
        before = opt.meta_parameters()
        expected = meta_step(model, F.mse_loss, before, step_batch, tableau, h, first_order=first_order,
                             vectorize=opt.vectorize, backend=backend)
        assume(finite(expected))
        if split:
            out = opt.compute(step_batch)
            opt.apply()
        else:
            out = opt.step(step_batch)
        d = expected.direction
        assert_close_scaled(out.direction, d, rtol, weight_scale(tableau), "direction")
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert_close_scaled(grads, d, rtol, weight_scale(tableau), ".grad")
        scale = float(before.abs().max()) + lr * float(d.abs().max())
        assert_close_scaled(opt.meta_parameters(), before - lr * d, rtol, scale, "parameters")


# == 2. invalid inputs: the documented exception, and nothing changed ====================================


NAMES = TaskBatch._fields
BATCH_ERRORS = (TypeError, ValueError, RuntimeError)  # MetaOptimizer.step "Raises:" for malformed tasks
# tableaus whose meta-loss reads an adapted stage that uses every task's support gradient: a non-finite
# support or query value then always makes the meta-loss non-finite
EVERY_SET_MATTERS = ("maml", "maml(2)", "heun", "midpoint", "ralston", "kutta3", "rk4", "rk38")


def _resized(t: torch.Tensor, dim: int, size: int, gen: torch.Generator) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(t.dtype)


@st.composite
def malformed(draw, batch: TaskBatch, dtype: torch.dtype):
    """``(kind, bad batch, expected exception type(s))``: one defect in an otherwise valid ``batch``."""
    parts = list(batch)
    T = batch.num_tasks
    gen = torch.Generator().manual_seed(draw(seeds))
    kind = draw(st.sampled_from([
        "task dimension", "examples per task", "float dtype", "bool or complex", "too few dims", "not a tensor",
        "not four parts", "no tasks", "no examples", "other device", "inference tensor", "non-finite",
        "target shape", "model rejects x",
    ]))
    i = draw(st.integers(0, 3))
    if kind == "task dimension":  # check_task_batch: ValueError
        parts[i] = _resized(parts[i], 0, draw(st.integers(0, 6).filter(lambda n: n != T)), gen)
        return kind, TaskBatch(*parts), ValueError
    if kind == "examples per task":
        k = parts[i].shape[1]
        parts[i] = _resized(parts[i], 1, draw(st.integers(0, 7).filter(lambda n: n != k)), gen)
        return kind, TaskBatch(*parts), ValueError
    if kind == "float dtype":  # TypeError: inputs of another dtype than the parameters
        other = draw(st.sampled_from([d for d in (torch.float16, torch.bfloat16, *DTYPES) if d != dtype]))
        parts[i] = parts[i].to(other)
        return kind, TaskBatch(*parts), TypeError
    if kind == "bool or complex":
        parts[i] = parts[i].to(draw(st.sampled_from([torch.bool, torch.complex64, torch.complex128])))
        return kind, TaskBatch(*parts), TypeError
    if kind == "too few dims":  # ValueError: needs [T, K, ...]
        parts[i] = draw(st.sampled_from([parts[i][:, 0, 0], parts[i].reshape(-1), parts[i].reshape(-1)[0]]))
        return kind, TaskBatch(*parts), ValueError
    if kind == "not a tensor":  # TypeError: not four tensors
        parts[i] = draw(st.sampled_from([parts[i].tolist(), parts[i].numpy(), None, "x", 1.0]))
        return kind, tuple(parts), TypeError
    if kind == "not four parts":
        return kind, draw(st.sampled_from([tuple(parts[:3]), tuple(parts[:1]), (), tuple(parts) + (parts[0],),
                                           None, 4, dict(zip(NAMES, parts))])), TypeError
    if kind == "no tasks":
        return kind, TaskBatch(*(t[:0] for t in parts)), ValueError
    if kind == "no examples":
        j = draw(st.sampled_from([0, 2]))
        parts[j], parts[j + 1] = parts[j][:, :0], parts[j + 1][:, :0]
        return kind, TaskBatch(*parts), ValueError
    if kind == "other device":  # RuntimeError: a tensor on another device
        parts[i] = parts[i].to("meta")
        return kind, TaskBatch(*parts), RuntimeError
    if kind == "inference tensor":  # RuntimeError (check_task_batch: an inference tensor)
        with torch.inference_mode():
            parts[i] = parts[i].clone()
        return kind, TaskBatch(*parts), RuntimeError
    if kind == "non-finite":  # NonFiniteLossError; x gets NaN, a target NaN or +-inf
        t = parts[i].clone()
        index = tuple(draw(st.integers(0, n - 1)) for n in t.shape)
        t[index] = draw(st.sampled_from([math.nan] if i % 2 == 0 else [math.nan, math.inf, -math.inf]))
        parts[i] = t
        return kind, TaskBatch(*parts), NonFiniteLossError
    if kind == "target shape":  # ValueError: outputs [K, fout] and targets of another shape (F.mse_loss would
        # broadcast them with only a warning; supervised_loss checks the built-in losses' shapes)
        j = draw(st.sampled_from([1, 3]))
        y = parts[j]
        parts[j] = draw(st.sampled_from([y[..., None], y[..., 0], torch.cat([y, y], -1), y[..., None, :]]))
        return kind, TaskBatch(*parts), ValueError
    # the batch checks pass; the model cannot take x (feature count, integer inputs): one of step's documented
    # types for malformed tasks
    j = draw(st.sampled_from([0, 2]))
    x = parts[j]
    if draw(st.booleans()):
        parts[j] = _resized(x, 2, draw(st.integers(1, 4).filter(lambda f: f != x.shape[2])), gen)
    else:
        parts[j] = x.round().long()
    return kind, TaskBatch(*parts), BATCH_ERRORS


outers = st.sampled_from(["sgd", "adam", "adamw", "sgd-momentum"])


def build_optimizer(model, outer, tableau, first_order, h, check_finite=True) -> MetaOptimizer:
    kwargs = {"momentum": 0.9} if outer == "sgd-momentum" else {}
    return MetaOptimizer(model, F.mse_loss, tableau=tableau, inner_lr=h, outer=outer.split("-")[0], lr=0.05,
                         first_order=first_order, check_finite=check_finite, **kwargs)


def warm_up(opt: MetaOptimizer, batch: TaskBatch, steps: int, grads: str) -> None:
    """Some optimizer state and ``.grad`` to protect: ``steps`` valid steps, then ``.grad`` kept, zeroed
    or set to ``None``.

    A drawn problem can diverge under plain SGD (a 0-d output scale and large targets took the
    parameters to 1e12 in two steps, and the next step's query loss to inf): such an example is rejected,
    since the tests below need an optimizer that still works on ``batch`` after the warm-up."""
    try:
        for k in range(steps):
            opt.step(batch if k % 2 == 0 else TaskBatch(*(t.flip(0) for t in batch)))
        if steps:
            opt.compute(batch)  # leaves .grad set, as the last step did
    except NonFiniteLossError:
        assume(False)
    if grads != "kept":
        opt.zero_grad(set_to_none=grads == "none")


@_settings(100)
@given(problem=problems(), tableau=st.sampled_from(EVERY_SET_MATTERS), first_order=st.booleans(),
       outer=outers, warm=st.integers(0, 2), grads=st.sampled_from(["kept", "zero", "none"]),
       method=st.sampled_from(["step", "compute", "evaluate"]), data=st.data())
def test_malformed_batch_raises_documented_type_and_changes_nothing(problem, tableau, first_order, outer, warm,
                                                                     grads, method, data):
    model, batch, _ = problem
    opt = build_optimizer(model, outer, tableau, first_order, 0.1)
    warm_up(opt, batch, warm, grads)
    kind, bad, expected = data.draw(malformed(batch, opt.dtype), label="defect")
    if kind == "non-finite" and method == "evaluate":
        method = "step"  # meta-test reports non-finite losses instead of raising
    snap = snapshot(model, opt)
    with pytest.raises(expected):
        getattr(opt, method)(bad)
    assert_unchanged(model, opt, snap)
    opt.compute(batch)  # and the optimizer still works


@_settings(20)
@given(problem=problems(), tableau=st.sampled_from(EVERY_SET_MATTERS), outer=outers, warm=st.integers(0, 2),
       data=st.data())
def test_non_finite_grad_is_refused_by_apply(problem, tableau, outer, warm, data):
    """``apply`` with a NaN/inf in an edited ``.grad``: NonFiniteLossError, parameters and state unchanged."""
    model, batch, _ = problem
    opt = build_optimizer(model, outer, tableau, False, 0.1)
    warm_up(opt, batch, warm, "kept")
    opt.compute(batch)
    params = [p for p in model.parameters()]
    p = params[data.draw(st.integers(0, len(params) - 1), label="parameter")]
    index = tuple(data.draw(st.integers(0, n - 1)) for n in p.shape)
    p.grad[index] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="value")
    snap = snapshot(model, opt)
    with pytest.raises(NonFiniteLossError):
        opt.apply()
    assert_unchanged(model, opt, snap)


@_settings(20)
@given(problem=problems(), tableau=st.sampled_from(EVERY_SET_MATTERS), outer=outers, warm=st.integers(0, 2),
       step_size=st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -0.1, -5.0]), data=st.data())
def test_invalid_meta_test_arguments_raise_value_error(problem, tableau, outer, warm, step_size, data):
    """``evaluate`` with a step size that is not a finite number > 0, or step counts that are not positive:
    ValueError (``check_step``, ``check_step_counts``), nothing changed."""
    model, batch, _ = problem
    opt = build_optimizer(model, outer, tableau, False, 0.1)
    warm_up(opt, batch, warm, "kept")
    snap = snapshot(model, opt)
    with pytest.raises(ValueError):
        opt.evaluate(batch, steps=(1,), step_size=step_size)
    bad_steps = data.draw(st.one_of(st.just(()), st.lists(st.integers(-3, 3), min_size=1, max_size=3)
                                    .filter(lambda s: min(s) < 1)), label="steps")
    with pytest.raises(ValueError):
        opt.evaluate(batch, steps=bad_steps)
    assert_unchanged(model, opt, snap)


@_settings(20)
@given(problem=problems(), tableau=st.sampled_from(EVERY_SET_MATTERS), first_order=st.booleans(), outer=outers,
       warm=st.integers(0, 2), grads=st.sampled_from(["kept", "zero", "none"]),
       lr=st.sampled_from([math.nan, math.inf, -math.inf]), split=st.booleans())
def test_non_finite_learning_rate_is_undone(problem, tableau, first_order, outer, warm, grads, lr, split):
    """A NaN/inf learning rate (e.g. set by a scheduler) makes the updated parameters non-finite:
    NonFiniteLossError (``check_finite``), and the parameters, ``.grad`` and state as before the call."""
    model, batch, _ = problem
    opt = build_optimizer(model, outer, tableau, first_order, 0.1)
    warm_up(opt, batch, warm, grads)
    if split:
        opt.compute(batch)
    for group in opt.param_groups:
        group["lr"] = lr
    snap = snapshot(model, opt)
    with pytest.raises(NonFiniteLossError):
        opt.apply() if split else opt.step(batch)
    assert_unchanged(model, opt, snap)


@_settings(15)
@given(problem=problems(), tableau=st.sampled_from(EVERY_SET_MATTERS), outer=outers, warm=st.integers(0, 2),
       grads=st.sampled_from(["kept", "zero", "none"]), method=st.sampled_from(["step", "compute", "apply"]))
def test_calls_under_inference_mode_raise_runtime_error(problem, tableau, outer, warm, grads, method):
    """Autograd cannot run under ``torch.inference_mode()``: RuntimeError, nothing changed."""
    model, batch, _ = problem
    opt = build_optimizer(model, outer, tableau, False, 0.1)
    warm_up(opt, batch, warm, grads)
    if method == "apply":
        opt.compute(batch)
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError), torch.inference_mode():
        opt.apply() if method == "apply" else getattr(opt, method)(batch)
    assert_unchanged(model, opt, snap)


# -- invalid tableau specs: Tableau(A, b) and get_tableau raise ValueError (TypeError for a spec that is no
#    name or Tableau at all) --------------------------------------------------------------------------------


@st.composite
def invalid_tableau_arrays(draw):
    """``(kind, A, b, expected)``: a tableau with one defect that :class:`Tableau` documents as a ValueError."""
    s = draw(st.integers(1, 5))
    A = [[draw(coef) if l < j else 0.0 for l in range(s)] for j in range(s)]
    b = [draw(coef) for _ in range(s)]
    kind = draw(st.sampled_from(["empty", "not square", "not strictly lower", "b length", "non-finite",
                                 "not numbers"]))
    if kind == "empty":
        return kind, draw(st.sampled_from([[], ()])), draw(st.sampled_from([[], [1.0]])), ValueError
    if kind == "not square":
        if draw(st.booleans()):  # one ragged row
            j = draw(st.integers(0, s - 1))
            n = draw(st.integers(0, s + 2).filter(lambda n: n != s))
            A[j] = (A[j] + [0.0] * 3)[:n]
        else:  # every row too long or too short (s x m, m != s)
            m = draw(st.integers(0, s + 2).filter(lambda m: m != s))
            A = [(row + [0.0] * 3)[:m] for row in A]
        return kind, A, b, ValueError
    if kind == "not strictly lower":  # a non-zero on or above the diagonal (an implicit method)
        j = draw(st.integers(0, s - 1))
        l = draw(st.integers(j, s - 1))
        A[j][l] = draw(st.sampled_from([1.0, -0.5, 0.25, 1e-9, 2.0]))
        return kind, A, b, ValueError
    if kind == "b length":
        n = draw(st.integers(0, s + 2).filter(lambda n: n != s))
        return kind, A, (b + [0.5] * 3)[:n], ValueError
    bad = draw(st.sampled_from([math.nan, math.inf, -math.inf] if kind == "non-finite"
                               else [None, "x", "", object(), [1.0], {}]))
    if draw(st.booleans()):
        j = draw(st.integers(0, s - 1))
        A[j][draw(st.integers(0, j))] = bad  # on or below the diagonal
    else:
        b[draw(st.integers(0, s - 1))] = bad
    return kind, A, b, ValueError if kind == "non-finite" else (ValueError, TypeError)


@_settings(100)
@given(case=invalid_tableau_arrays(), form=st.sampled_from(["lists", "tuples", "from_arrays", "tensor"]))
def test_invalid_tableau_raises_value_error(case, form):
    kind, A, b, expected = case
    if form == "tuples":
        A, b = tuple(tuple(row) for row in A), tuple(b)
    if form == "tensor" and kind in ("not strictly lower", "non-finite"):  # rectangular numbers only
        A, b = torch.tensor(A, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    with warnings.catch_warnings(), pytest.raises(expected):
        warnings.simplefilter("ignore", InconsistentTableauWarning)
        if form in ("from_arrays", "tensor"):
            Tableau.from_arrays(A, b)
        else:
            Tableau(A, b)


def _is_valid_name(spec: str) -> bool:
    """A name ``get_tableau`` accepts, or a call of one of its factories (valid or not: tested separately)."""
    key = spec.strip().lower()
    return key in named_tableaus() or bool(re.match(r"^\s*(maml|rk2|maml_msl)\s*\(", key))


@_settings(60)
@given(spec=st.one_of(
    st.text(max_size=12),
    st.text(alphabet="abcdeghiklmnprstuz_0123456789 ()", max_size=12),
    st.tuples(st.text(alphabet="x_ -", max_size=2), st.sampled_from(sorted(named_tableaus())),
              st.text(alphabet="x0 _-5()", max_size=3)).map("".join),  # near misses of the names
).filter(lambda s: not _is_valid_name(s)))
def test_unknown_tableau_name_raises_value_error(spec):
    with pytest.raises(ValueError):
        get_tableau(spec)


@_settings(30)
@given(spec=st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=5), st.lists(st.floats(), max_size=3),
                      st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(maml),
                      st.just(("maml",))))
def test_tableau_spec_of_another_type_raises_type_error(spec):
    with pytest.raises(TypeError):
        get_tableau(spec)
    with pytest.raises(TypeError):
        MetaOptimizer(nn.Linear(1, 1), F.mse_loss, tableau=spec)


def _fmt_args(values) -> str:
    return ", ".join(repr(v) if isinstance(v, float) else str(v) for v in values)


non_finite = st.sampled_from(["nan", "inf", "-inf"])


@st.composite
def bad_factory_specs(draw) -> str:
    """A factory call ``get_tableau`` parses but must refuse (ValueError): bad values or the wrong arity."""
    name = draw(st.sampled_from(["maml", "rk2", "maml_msl"]))
    if name == "maml":
        args = draw(st.one_of(
            st.tuples(st.integers(-5, 0)),  # not >= 1
            st.tuples(st.floats(0.01, 5.0).filter(lambda x: not x.is_integer()).map(lambda x: round(x, 3))
                      .filter(lambda x: not x.is_integer())),  # not whole
            st.tuples(non_finite),
            st.just(()),  # arity
            st.lists(st.integers(1, 3), min_size=2, max_size=3),
            st.tuples(st.sampled_from(["x", "1..2", "two"])),  # unparsable
        ))
    elif name == "rk2":
        args = draw(st.one_of(
            st.tuples(st.floats(-5.0, 0.0).map(lambda x: round(x, 3))),  # not > 0
            st.tuples(non_finite),
            st.just(()),
            st.lists(st.floats(0.1, 2.0).map(lambda x: round(x, 3)), min_size=2, max_size=3),
            st.tuples(st.sampled_from(["x", "c", "1..2", "1/0"])),
        ))
    else:
        finite_w = st.floats(-1.0, 1.0).map(lambda x: round(x, 3))
        args = draw(st.one_of(
            st.lists(finite_w, max_size=1),  # fewer than 2 weights
            st.lists(st.one_of(finite_w, non_finite), min_size=2, max_size=4)
            .filter(lambda w: any(isinstance(x, str) for x in w)),  # a non-finite weight
            st.lists(finite_w, min_size=1, max_size=3).map(lambda w: [*w, "w"]),  # unparsable
        ))
    space = draw(st.sampled_from(["", " "]))
    spec = f"{name}{space}({_fmt_args(args)})"
    return draw(st.sampled_from([spec, spec.upper(), f"  {spec} "]))


@_settings(60)
@given(spec=bad_factory_specs())
def test_bad_factory_arguments_raise_value_error(spec):
    with warnings.catch_warnings(), pytest.raises(ValueError):
        warnings.simplefilter("ignore", InconsistentTableauWarning)
        get_tableau(spec)


@_settings(40)
@given(call=st.one_of(
    st.tuples(st.just(maml), st.one_of(st.integers(-5, 0), st.booleans(), st.floats(allow_nan=True),
                                       st.sampled_from(["2", None, 2.0, [1]]))),
    st.tuples(st.just(rk2), st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf, -math.inf,
                                                                                  "x"]))),
    st.tuples(st.just(maml_msl), st.one_of(
        st.lists(st.floats(-2, 2), max_size=1),
        st.lists(st.one_of(st.floats(-2, 2), st.sampled_from([math.nan, math.inf, -math.inf])), min_size=2,
                 max_size=4).filter(lambda w: not all(map(math.isfinite, w))),
        st.sampled_from([None, 1.0, ["a", "b"], [None, 1.0]]),
    )),
))
def test_bad_python_factory_arguments_raise(call):
    """The factories called from Python: ValueError (TypeError accepted for a value that is no number)."""
    factory, arg = call

    def is_number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    numbers_only = is_number(arg) or (isinstance(arg, list) and all(map(is_number, arg)))
    expected = ValueError if numbers_only else (ValueError, TypeError)
    with warnings.catch_warnings(), pytest.raises(expected):
        warnings.simplefilter("ignore", InconsistentTableauWarning)
        factory(arg)


# -- text where numbers belong: refused, not read character by character ----------------------------------


@pytest.mark.parametrize("weights", ["01", "0110", b"01"], ids=["str", "str4", "bytes"])
def test_string_weights_are_refused_by_maml_msl(weights):
    """Not ``(0.0, 1.0)`` from the digits of ``"01"``, nor the byte values ``(48.0, 49.0)`` of ``b"01"``."""
    with warnings.catch_warnings(), pytest.raises((ValueError, TypeError)):
        warnings.simplefilter("ignore", InconsistentTableauWarning)
        maml_msl(weights)


@pytest.mark.parametrize("A,b", [([[0, 0], [1, 0]], "01"), (["00", "10"], [0.5, 0.5]), ([[0, 0], [1, 0]], b"\x00\x01")],
                         ids=["b-str", "A-rows-str", "b-bytes"])
def test_string_entries_are_refused_by_tableau(A, b):
    """Not ``b="01"`` -> ``(0.0, 1.0)`` or rows ``"00"``/``"10"`` -> ``[[0, 0], [1, 0]]``."""
    with warnings.catch_warnings(), pytest.raises((ValueError, TypeError)):
        warnings.simplefilter("ignore", InconsistentTableauWarning)
        Tableau(A, b)


# -- limits found by these tests ----------------------------------------------------------------------

# Found here: the Triton kernels pass each coefficient as a float32 (hi, lo) pair (``_pair`` in
# rkfast/kernels/triton.py), so a float64 coefficient outside float32's normal range used to be lost silently
# (|c| < ~1e-38 became 0, |c| > ~3.4e38 NaN) where the reference and C++ kernels compute it exactly. Such a
# coefficient is now refused with a ValueError that names the other backends. Realistic coefficients
# (h * A[j][l], b[j] / T, -lr) are far inside that range, hence the bounded kernel_coefs above.



@pytest.mark.skipif("triton" not in FUSED_CPU, reason="needs the Triton backend (its interpreter on a CPU)")
@pytest.mark.parametrize("coef", [1e-300, -1e-45, 1e39, -1e300])
@pytest.mark.parametrize("op", ["stage_point", "combine", "axpy_"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_triton_float64_coefficients_outside_float32_range(op, coef):
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=gen, dtype=torch.float64)
    slopes = [torch.randn(2, 5, generator=gen, dtype=torch.float64)]

    def run(backend):
        if op == "stage_point":  # at theta = 0, so that the coefficient's term is the whole result
            return kernels.stage_point(torch.zeros_like(theta), slopes, [coef], backend=backend)
        if op == "combine":
            return kernels.combine(slopes, [coef], backend=backend)
        return kernels.axpy_(torch.zeros(5, dtype=torch.float64), theta, coef, backend=backend)

    ref = run("torch")
    assert same_bits(run("cpp") if "cpp" in FUSED_CPU else ref, ref)  # the C++ kernels get it right
    with pytest.raises(ValueError, match="the Triton kernels take coefficients of magnitude"):
        run("triton")  # Triton's float32 scalar arguments cannot carry it: refused, not rounded
