"""Learned inner rates (Meta-SGD, MAML++ per-layer per-step rates, ANIL): rkfast/learned.py and its use by
rk_meta_step, adapt and MetaOptimizer (docs/method.md, "Learned inner rates")."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, regression_batch, same_bits, smooth_mlp, snapshot

import rkfast
from rkfast import Rates, TaskBatch, TaskSet
from rkfast import functional as RF
from rkfast.learned import LearnedRates
from rkfast.optim import NonFiniteLossError
from rkfast.tableau import get_tableau

H = 0.1


def _opt(model, tableau="maml", **kw):
    kw.setdefault("inner_lr", H)
    kw.setdefault("outer", "sgd")
    kw.setdefault("lr", 0.05)
    return rkfast.MetaOptimizer(model, F.mse_loss, tableau=tableau, **kw)


def _rates(model, tableau, granularity, per_stage=False, frozen=None):
    layout, _ = RF.ParamLayout.from_module(model), None
    return LearnedRates(layout, H, granularity, per_stage=per_stage, stages=get_tableau(tableau).stages,
                        frozen=frozen, dtype=torch.float64)


def _perturb(rates: LearnedRates, scale: float = 0.03) -> None:
    """Rates away from inner_lr (so that per-element, per-stage differences matter)."""
    with torch.no_grad():
        for t in rates.tensors:
            t.add_(scale * torch.randn_like(t))


# -- 1. rates held at inner_lr: the plain step ---------------------------------------------------------


@pytest.mark.parametrize("tableau", ["maml", "rk4"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [True, False])
def test_rates_at_inner_lr_equal_plain_step(tableau, first_order, vectorize):
    base = smooth_mlp()
    batches = [regression_batch() for _ in range(3)]
    plain = copy.deepcopy(base)
    ref = _opt(plain, tableau, first_order=first_order, vectorize=vectorize)
    for b in batches:
        ref.step(b)
    for granularity, per_stage in [("scalar", False), ("tensor", True), ("element", False), ("element", True)]:
        model = copy.deepcopy(base)
        opt = _opt(model, tableau, first_order=first_order, vectorize=vectorize,
                   rates=Rates(granularity, per_stage=per_stage, lr=0.0))
        for b in batches:
            opt.step(b)
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        for t in opt.rates.tensors:
            assert torch.equal(t, torch.full_like(t, H))
            assert t.grad is not None and torch.isfinite(t.grad).all()


# -- 2. second-order rate gradient = finite differences -------------------------------------------------


def _meta_loss(model, rates, batch, tableau, first_order=False, vectorize=True):
    theta = RF.ParamLayout.from_module(model).flatten(list(model.parameters())).detach()
    return RF.meta_step(model, F.mse_loss, theta, batch, tableau, H, first_order=first_order,
                        vectorize=vectorize, rates=rates)


@pytest.mark.parametrize("tableau", ["maml", "rk4", "maml(2)"])
@pytest.mark.parametrize("granularity", ["scalar", "tensor", "element"])
@pytest.mark.parametrize("per_stage", [False, True])
def test_second_order_rate_gradient_matches_finite_differences(tableau, granularity, per_stage):
    model = smooth_mlp(hidden=6)
    batch = regression_batch()
    rates = _rates(model, tableau, granularity, per_stage)
    _perturb(rates)
    out = _meta_loss(model, rates, batch, tableau)
    (grad,) = out.rate_directions
    t = rates.tensors[0]
    flat = t.detach().view(-1)
    picks = torch.randperm(flat.numel())[:6].tolist()
    eps = 1e-6
    for i in picks:
        old = float(flat[i])
        with torch.no_grad():
            flat[i] = old + eps
        up = float(_meta_loss(model, rates, batch, tableau).loss)
        with torch.no_grad():
            flat[i] = old - eps
        down = float(_meta_loss(model, rates, batch, tableau).loss)
        with torch.no_grad():
            flat[i] = old
        fd = (up - down) / (2 * eps)
        assert math.isclose(float(grad.view(-1)[i]), fd, rel_tol=1e-5, abs_tol=1e-8), (i, float(grad.view(-1)[i]), fd)


# -- 3. first-order rate gradient = autograd with the slopes detached -------------------------------------


def _detached_slope_reference(model, rates, batch, tableau):
    """The meta-loss with every slope detached, differentiated by autograd w.r.t. theta and the rate tensors."""
    tab = get_tableau(tableau)
    layout = RF.ParamLayout.from_module(model)
    theta = layout.flatten(list(model.parameters())).detach().requires_grad_()
    loss = RF.module_task_loss(model, F.mse_loss, layout)
    vectors = [rates.vector(s) for s in range(rates.sets)]
    total = 0.0
    for i in range(batch.support[0].shape[0]):
        sup = (batch.support[0][i], batch.support[1][i])
        qry = (batch.query[0][i], batch.query[1][i])
        slopes = []
        for j in range(tab.stages):
            point = theta
            for l, a in tab.coefficients(j):
                point = point - a * vectors[min(l, rates.sets - 1)] * slopes[l]
            row = point.detach().requires_grad_()
            (k,) = torch.autograd.grad(loss(row, sup)[0], row)
            slopes.append(k.detach())
            if tab.b[j] != 0:
                total = total + tab.b[j] * loss(point, qry)[0] / batch.support[0].shape[0]
    return torch.autograd.grad(total, [theta, *rates.tensors])


@pytest.mark.parametrize("tableau", ["maml", "rk4", "maml(2)", "heun"])
@pytest.mark.parametrize("granularity", ["scalar", "tensor", "element"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_first_order_rate_gradient_is_autograd_with_detached_slopes(tableau, granularity, vectorize):
    model = smooth_mlp(hidden=6)
    batch = regression_batch()
    rates = _rates(model, tableau, granularity, per_stage=tableau == "maml(2)",
                   frozen={"2.bias": 0.02} if granularity != "scalar" else None)
    _perturb(rates)
    out = _meta_loss(model, rates, batch, tableau, first_order=True, vectorize=vectorize)
    d_theta, d_rates = _detached_slope_reference(model, rates, batch, tableau)
    torch.testing.assert_close(out.direction, d_theta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.rate_directions[0], d_rates, rtol=1e-10, atol=1e-12)


# -- vmap and task by task agree ---------------------------------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_and_loop_agree(first_order):
    model = smooth_mlp(hidden=6)
    batch = regression_batch(tasks=4)
    rates = _rates(model, "rk4", "element", per_stage=True, frozen={"0.weight": 0.0})
    _perturb(rates)
    a = _meta_loss(model, rates, batch, "rk4", first_order=first_order, vectorize=True)
    b = _meta_loss(model, rates, batch, "rk4", first_order=first_order, vectorize=False)
    torch.testing.assert_close(a.direction, b.direction, rtol=0, atol=1e-10)
    torch.testing.assert_close(a.rate_directions[0], b.rate_directions[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-10)


def test_task_set_goes_through_the_same_path():
    base = smooth_mlp(hidden=6)
    batch = regression_batch()
    outs = []
    for as_set in (False, True):
        model = copy.deepcopy(base)
        opt = _opt(model, "heun", rates=Rates("tensor"), lr=0.01)
        loss = RF.supervised_loss(F.mse_loss)
        tasks = TaskSet(loss, loss, batch.support, batch.query) if as_set else batch
        outs.append((opt.step(tasks), [p.detach().clone() for p in model.parameters()], opt.rates.tensors[0].clone()))
    (a, pa, ra), (b, pb, rb) = outs
    torch.testing.assert_close(a.rate_directions[0], b.rate_directions[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(ra, rb, rtol=0, atol=1e-12)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


# -- 4. ANIL -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", [None, "scalar", "tensor", "element"])
def test_anil_frozen_tensors_are_not_adapted_but_meta_learned(granularity):
    model = smooth_mlp()
    layout = RF.ParamLayout.from_module(model)
    opt = _opt(model, "maml(2)", rates=Rates(granularity, frozen={"0.*": 0.0}), outer="adam", lr=1e-2)
    assert set(opt.rates.frozen) == {"0.weight", "0.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        opt.step(regression_batch())
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} not meta-learned"
    theta = opt.meta_parameters()
    res = opt.evaluate(regression_batch(tasks=4), steps=(1, 3), keep_params=True)
    adapted = layout.unflatten(res.params)  # [steps, T, ...]
    ref = layout.unflatten(theta)
    for name in layout.names:
        moved = (adapted[name][1:] - ref[name]).abs().amax()
        if name.startswith("0."):
            assert moved == 0, f"frozen {name} was adapted"
        else:
            assert moved > 0, f"{name} was not adapted"
    values = opt.rates.values()
    assert torch.all(values["0.weight"] == 0) and torch.all(values["0.bias"] == 0)
    # the frozen tensors stay frozen with an explicit step size too
    res = opt.evaluate(regression_batch(tasks=4), steps=(2,), step_size=0.05, keep_params=True)
    adapted = layout.unflatten(res.params)
    assert (adapted["0.weight"][1] - ref["0.weight"]).abs().amax() == 0
    assert (adapted["4.weight"][1] - ref["4.weight"]).abs().amax() > 0


def test_frozen_rates_inner_step_leaves_tensor_at_theta():
    """Inside the meta-step too: a second-order step's direction for a frozen-at-0 tensor is the query
    gradient at a stage point where that tensor is theta's."""
    model = smooth_mlp(hidden=6)
    rates = _rates(model, "maml", "element", frozen={"0.weight": 0.0})
    batch = regression_batch()
    tab = get_tableau("maml")
    layout = RF.ParamLayout.from_module(model)
    theta = layout.flatten(list(model.parameters())).detach()
    tasks = rkfast.taskmap.TaskMap(3, True, "different")
    loss = RF.module_task_loss(model, F.mse_loss, layout)
    vec = rates.vector(0).detach()
    (stage,) = list(RF.stage_points(theta, tab, H, tasks, loss, batch.support, second_order=False, backend="torch",
                                    rates=lambda l: vec))
    pts = layout.unflatten(stage.point)
    assert torch.equal(pts["0.weight"], layout.unflatten(theta)["0.weight"].expand_as(pts["0.weight"]))
    assert not torch.equal(pts["2.weight"], layout.unflatten(theta)["2.weight"].expand_as(pts["2.weight"]))


# -- 5. Meta-SGD on the sinusoid ---------------------------------------------------------------------------


def test_meta_sgd_sinusoid_learns_rates():
    torch.manual_seed(0)
    model = rkfast.models.sinusoid_mlp()
    inner = 0.01
    opt = rkfast.MetaOptimizer(model, F.mse_loss, tableau="maml", inner_lr=inner, outer="adam", lr=1e-3,
                               rates=rkfast.Rates("element"))
    tasks = rkfast.tasks.SinusoidTasks(shots=10)
    for batch in tasks.batches(meta_batch=5, count=200, seed=1):
        out = opt.step(batch)
        assert math.isfinite(float(out.loss))
    (r,) = opt.rates.tensors
    assert torch.isfinite(r).all()
    assert float((r.detach() - inner).abs().max()) > 1e-3  # they learn (no claim about the result)
    scores = opt.evaluate(tasks.sample(10), steps=(1,))
    assert all(math.isfinite(m) for m, _ in scores.summary()["loss"].values())


# -- 6. state dict and failed steps -------------------------------------------------------------------------


def _save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_state_dict_round_trip_resumes_bit_for_bit():
    base = smooth_mlp()
    kw = dict(outer="adam", lr=1e-2, rates=Rates("element", per_stage=True, lr=3e-3, frozen={"0.bias": 0.0}))
    model = copy.deepcopy(base)
    opt = _opt(model, "maml(2)", **kw)
    for _ in range(3):
        opt.step(regression_batch())
    saved_model, saved_opt = _save(model.state_dict()), _save(opt.state_dict())
    assert saved_opt["rkfast"]["rates"]["granularity"] == "element"
    model2 = copy.deepcopy(base)
    opt2 = _opt(model2, "maml(2)", **kw)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert same_bits(opt2.rates.tensors[0], opt.rates.tensors[0])
    assert opt2.param_groups[-1]["lr"] == 3e-3
    for _ in range(2):
        b = regression_batch()
        opt.step(b)
        opt2.step(b)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert same_bits(p, q)
    assert same_bits(opt.rates.tensors[0], opt2.rates.tensors[0])
    s1, s2 = io.BytesIO(), io.BytesIO()
    torch.save(opt.state_dict(), s1)
    torch.save(opt2.state_dict(), s2)
    assert s1.getvalue() == s2.getvalue()
    # a state dict of another configuration is refused, before anything changes
    other = _opt(copy.deepcopy(base), "maml(2)", outer="adam", lr=1e-2, rates=Rates("tensor"))
    with pytest.raises(ValueError):
        other.load_state_dict(saved_opt)
    plain = _opt(copy.deepcopy(base), "maml(2)", outer="adam", lr=1e-2)
    with pytest.raises(ValueError, match="rates"):
        plain.load_state_dict(saved_opt)


@pytest.mark.parametrize("failure", ["nan_batch", "nan_rate_lr"])
def test_failed_step_changes_nothing(failure):
    model = smooth_mlp()
    opt = _opt(model, "maml(2)", outer="adam", lr=1e-2, rates=Rates("tensor", per_stage=True))
    opt.step(regression_batch())
    opt.step(regression_batch())
    rate_values = opt.rates.tensors[0].detach().clone()
    rate_grad = opt.rates.tensors[0].grad.clone()
    snap = snapshot(model, opt)
    batch = regression_batch()
    if failure == "nan_batch":
        batch.support[1][0, 0] = float("nan")
    else:
        opt.param_groups[-1]["lr"] = float("nan")
        snap = snapshot(model, opt)
    with pytest.raises(NonFiniteLossError):
        opt.step(batch)
    assert_unchanged(model, opt, snap)
    assert same_bits(opt.rates.tensors[0], rate_values)
    assert same_bits(opt.rates.tensors[0].grad, rate_grad)


def test_compute_apply_updates_rates():
    model = smooth_mlp()
    opt = _opt(model, "maml", rates=Rates("scalar"), lr=0.1)
    out = opt.compute(regression_batch())
    (r,) = opt.rates.tensors
    assert torch.equal(r.grad, out.rate_directions[0])
    before = r.detach().clone()
    opt.apply()
    torch.testing.assert_close(r.detach(), before - 0.1 * out.rate_directions[0], rtol=0, atol=1e-15)


# -- 7. meta-test uses the learned rates ----------------------------------------------------------------


@pytest.mark.parametrize("tableau", ["maml(2)", "midpoint"])
def test_evaluate_uses_learned_rates(tableau):
    model = smooth_mlp(hidden=6)
    opt = _opt(model, tableau, rates=Rates("element", per_stage=True))
    _perturb(opt.rates)
    batch = regression_batch(tasks=3)
    res = opt.evaluate(batch, steps=(1, 3), keep_params=True)
    tab = get_tableau(tableau)
    factor = tab.test_step(H) / H
    assert res.step_size == factor
    layout = opt.layout
    theta = opt.meta_parameters()
    loss = RF.module_task_loss(model, F.mse_loss, layout)
    vectors = [opt.rates.vector(s).detach() for s in range(opt.rates.sets)]
    for i in range(3):
        sup = (batch.support[0][i], batch.support[1][i])
        qry = (batch.query[0][i], batch.query[1][i])
        row = theta.clone()
        for n in range(3):
            r = row.requires_grad_()
            (g,) = torch.autograd.grad(loss(r, sup)[0], r)
            row = (row - factor * vectors[min(n, len(vectors) - 1)] * g).detach()
            if n + 1 in (1, 3):
                k = res.steps.index(n + 1)
                torch.testing.assert_close(res.params[k, i], row, rtol=0, atol=1e-12)
                torch.testing.assert_close(res.losses[k, i], loss(row, qry)[0].detach(), rtol=0, atol=1e-12)
    # an explicit step size: a scalar, as without learned rates
    explicit = opt.evaluate(batch, steps=(1, 3), step_size=0.07, keep_params=True)
    plain = RF.evaluate(model, F.mse_loss, theta, batch, 0.07, (1, 3), keep_params=True)
    assert torch.equal(explicit.params, plain.params) and torch.equal(explicit.losses, plain.losses)
    assert explicit.step_size == 0.07


# -- 8. bad arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(granularity="layer"), "Rates granularity"),
    (dict(granularity=True), "Rates granularity"),
    (dict(granularity="element", frozen={"nope.*": 0.0}), "nope"),
    (dict(frozen={"nope": 0.0}), "nope"),
    (dict(granularity="scalar", frozen={"0.*": float("nan")}), "Rates frozen"),
    (dict(granularity="scalar", frozen={"*": 0.0}), "Rates frozen"),
    (dict(granularity="scalar", frozen=[("0.*", 0.0)]), "Rates frozen"),
    (dict(granularity="scalar", lr=-1.0), "Rates lr"),
    (dict(granularity="scalar", lr=float("nan")), "Rates lr"),
    (dict(granularity="scalar", lr=float("inf")), "Rates lr"),
    (dict(granularity="scalar", lr=True), "Rates lr"),
    (dict(frozen={"0.*": 0.0}, lr=0.1), "Rates lr"),
    (dict(frozen={"0.*": 0.0}, per_stage=True), "per_stage"),
    (dict(), "learns and freezes nothing"),
])
def test_bad_arguments_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _opt(smooth_mlp(), "maml", rates=Rates(**kwargs))


def test_rates_spec_round_trips_through_json():
    spec = Rates("element", per_stage=True, frozen={"0.*": 0}, lr=3e-3)
    assert spec.frozen == {"0.*": 0.0} and isinstance(spec.frozen["0.*"], float)
    assert Rates.from_json(spec.to_json()) == spec
    assert Rates.from_json({"frozen": {"0.*": 0.0}}) == Rates(frozen={"0.*": 0.0})
    with pytest.raises(ValueError, match="unknown keys"):
        Rates.from_json({"granularity": "scalar", "rate_lr": 0.1})
    with pytest.raises(TypeError, match="rates must be a rkfast.Rates"):
        _opt(smooth_mlp(), rates="element")


def test_default_has_no_rates():
    model = smooth_mlp()
    opt = _opt(model)
    assert opt.rates is None and len(opt.param_groups) == 1
    assert "rates" not in opt.state_dict()["rkfast"]
    out = opt.step(regression_batch())
    assert not hasattr(out, "rate_directions")


def test_rates_follow_model_to():
    model = smooth_mlp(dtype=torch.float32)
    opt = _opt(model, "maml", rates=Rates("element"), outer="adam")
    opt.step(TaskBatch(*(t.float() for t in regression_batch())))
    model.to(torch.float64)
    opt.step(regression_batch())
    assert opt.rates.tensors[0].dtype == torch.float64
    assert opt.rates.tensors[0] is opt.param_groups[-1]["params"][0]
