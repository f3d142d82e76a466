"""Learned tableaus: the entries of A on a sparsity pattern as meta-parameters, b fixed or tied to A by the
order conditions (rkfast/learned.py: LearnedTableau, TableauCoefficients, order_weights; docs/method.md, "Learned tableaus")."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, regression_batch, same_bits, smooth_mlp, snapshot

import rkfast
from rkfast import TaskBatch
from rkfast import functional as RF
from rkfast.learned import (LearnedRates, LearnedTableau, OrderConditionsError, Rates, TableauCoefficients,
                            order_conditions_used, order_weights)
from rkfast.optim import NonFiniteLossError
from rkfast.tableau import get_tableau, rk2

H = 0.1


def _opt(model, tableau="heun", **kw):
    kw.setdefault("inner_lr", H)
    kw.setdefault("outer", "sgd")
    kw.setdefault("lr", 0.05)
    return rkfast.MetaOptimizer(model, F.mse_loss, tableau=tableau, **kw)


def _theta(model):
    return RF.ParamLayout.from_module(model).flatten(list(model.parameters())).detach()


def _step(model, coefs, batch, first_order=False, vectorize=True, rates=None):
    return RF.meta_step(model, F.mse_loss, _theta(model), batch, coefs, H, first_order=first_order,
                        vectorize=vectorize, rates=rates)


def _perturb(learned: TableauCoefficients, scale: float = 0.05) -> None:
    with torch.no_grad():
        learned.tensor.add_(scale * torch.randn_like(learned.tensor))


# -- the weights from the order conditions ------------------------------------------------------------


@pytest.mark.parametrize("name", ["heun", "midpoint", "ralston", "rk4", "rk38"])
def test_order_weights_of_named_tableaus_are_their_weights(name):
    tab = get_tableau(name)
    b = order_weights(torch.tensor(tab.A, dtype=torch.float64))
    torch.testing.assert_close(b, torch.tensor(tab.b, dtype=torch.float64), rtol=0, atol=1e-12)


def test_two_stage_order_weights_are_the_rk2_family():
    for c in torch.empty(5).uniform_(0.2, 2.0).tolist():
        A = torch.tensor([[0.0, 0.0], [c, 0.0]], dtype=torch.float64)
        torch.testing.assert_close(order_weights(A), torch.tensor(rk2(c).b, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("stages", [2, 3, 4, 6])
def test_order_weights_satisfy_the_conditions_for_random_matrices(stages):
    A = torch.tril(torch.rand(stages, stages, dtype=torch.float64) + 0.2, diagonal=-1)
    b = order_weights(A)
    order, count = order_conditions_used(stages)
    c = A.sum(1)
    checks = [(b.sum(), 1.0), (b @ c, 1 / 2), (b @ c**2, 1 / 3), (b @ (A @ c), 1 / 6)][:count]
    for value, target in checks:
        assert math.isclose(float(value), target, abs_tol=1e-9)
    assert get_tableau(rkfast.Tableau.from_arrays(A, b)).order >= order


def test_singular_order_conditions_are_refused_with_the_nodes():
    A = torch.zeros(2, 2, dtype=torch.float64)  # c2 = 0: b2 c2 = 1/2 has no solution
    with pytest.raises(OrderConditionsError, match="nodes c"):
        order_weights(A)


def test_order_weights_gradient_matches_finite_differences():
    A = torch.tril(torch.rand(4, 4, dtype=torch.float64) + 0.3, diagonal=-1).requires_grad_()
    w = torch.randn(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: order_weights(torch.tril(a, diagonal=-1)) @ w, (A,))


# -- the learned tableau at its starting values is the fixed tableau -----------------------------------


@pytest.mark.parametrize("name", ["maml", "heun", "rk4", "maml(2)"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [True, False])
def test_starting_values_give_the_fixed_tableau_step(name, first_order, vectorize):
    model = smooth_mlp(hidden=6)
    batch = regression_batch()
    learned = LearnedTableau(name).bind(torch.float64)
    a = _step(model, learned, batch, first_order, vectorize)
    b = _step(model, name, batch, first_order, vectorize)
    torch.testing.assert_close(a.direction, b.direction, rtol=0, atol=1e-13)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-13)
    assert len(a.tableau_directions) == 1 and a.tableau_directions[0].shape == learned.tensor.shape


def test_patterns_and_structure():
    rk4 = get_tableau("rk4")
    pattern = LearnedTableau(rk4).bind()
    assert pattern.entries == ((1, 0), (2, 1), (3, 2))
    assert pattern.structure.needs_support_grad == rk4.needs_support_grad
    full = LearnedTableau(rk4, "full").bind()
    assert len(full.entries) == 6 and full.structure.needs_support_grad == (True, True, True, False)
    assert torch.equal(full.matrix(), torch.tensor(rk4.A, dtype=torch.float32))
    order = LearnedTableau("midpoint", weights="order").bind()
    assert order.structure.needs_query_loss == (True, True)  # b1 may move off 0
    with pytest.raises(ValueError, match="no entry of A"):
        LearnedTableau(get_tableau("euler"))


# -- the directions of the coefficients -----------------------------------------------------------------


@pytest.mark.parametrize("name, pattern, weights", [
    ("heun", "pattern", "order"), ("heun", "full", "fixed"), ("rk4", "pattern", "fixed"),
    ("rk4", "pattern", "order"), ("rk4", "full", "order"), ("maml(2)", "pattern", "fixed"),
])
def test_second_order_tableau_direction_matches_finite_differences(name, pattern, weights):
    model = smooth_mlp(hidden=6)
    batch = regression_batch()
    learned = LearnedTableau(name, pattern, weights).bind(torch.float64)
    _perturb(learned)
    (grad,) = _step(model, learned, batch).tableau_directions
    flat = learned.tensor.detach()
    eps = 1e-6
    for i in range(flat.numel()):
        old = float(flat[i])
        values = []
        for x in (old + eps, old - eps):
            with torch.no_grad():
                flat[i] = x
            values.append(float(_step(model, learned, batch).loss))
        with torch.no_grad():
            flat[i] = old
        fd = (values[0] - values[1]) / (2 * eps)
        # finite differences of a float64 loss ~ 1: noise ~ 1e-10 absolute, so entries far below the largest
        # are compared on the largest's scale
        tol = 1e-5 * float(grad.abs().max())
        assert math.isclose(float(grad[i]), fd, rel_tol=1e-5, abs_tol=tol), (i, float(grad[i]), fd)


def _detached_slope_reference(model, learned, batch, rates=None):
    """The meta-loss with every slope detached, differentiated by autograd w.r.t. theta, the rates and A."""
    layout = RF.ParamLayout.from_module(model)
    theta = _theta(model).requires_grad_()
    loss = RF.module_task_loss(model, F.mse_loss, layout)
    A = learned.matrix()
    b = learned.weights(A)
    rate = (lambda l: rates.vector(l)) if rates is not None else (lambda l: torch.full_like(theta, H))
    tasks = batch.support[0].shape[0]
    total = 0.0
    for i in range(tasks):
        sup = (batch.support[0][i], batch.support[1][i])
        qry = (batch.query[0][i], batch.query[1][i])
        slopes = []
        for j in range(learned.stages):
            point = theta
            for l in range(j):
                if (j, l) in learned.entries:
                    point = point - A[j, l] * rate(l) * slopes[l]
            row = point.detach().requires_grad_()
            (k,) = torch.autograd.grad(loss(row, sup)[0], row)
            slopes.append(k.detach())
            if learned.structure.b[j] != 0:
                total = total + b[j] * loss(point, qry)[0] / tasks
    leaves = [theta, *(rates.tensors if rates is not None else []), learned.tensor]
    return torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("name, pattern, weights", [
    ("heun", "pattern", "order"), ("rk4", "pattern", "fixed"), ("rk4", "full", "order"), ("maml(2)", "pattern", "fixed"),
])
@pytest.mark.parametrize("vectorize", [True, False])
def test_first_order_tableau_direction_is_autograd_with_detached_slopes(name, pattern, weights, vectorize):
    model = smooth_mlp(hidden=6)
    batch = regression_batch()
    learned = LearnedTableau(name, pattern, weights).bind(torch.float64)
    _perturb(learned)
    out = _step(model, learned, batch, first_order=True, vectorize=vectorize)
    d_theta, d_tableau = _detached_slope_reference(model, learned, batch)
    torch.testing.assert_close(out.direction, d_theta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.tableau_directions[0], d_tableau, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_learned_rates_and_tableau_together(first_order):
    model = smooth_mlp(hidden=6)
    batch = regression_batch()
    learned = LearnedTableau("rk4", "pattern", "order").bind(torch.float64)
    rates = LearnedRates(RF.ParamLayout.from_module(model), H, "element", per_stage=True, stages=4,
                         dtype=torch.float64)
    _perturb(learned)
    with torch.no_grad():
        rates.tensors[0].add_(0.02 * torch.randn_like(rates.tensors[0]))
    out = _step(model, learned, batch, first_order=first_order, rates=rates)
    if first_order:
        d_theta, d_rates, d_tableau = _detached_slope_reference(model, learned, batch, rates)
        torch.testing.assert_close(out.direction, d_theta, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.rate_directions[0], d_rates, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.tableau_directions[0], d_tableau, rtol=1e-10, atol=1e-12)
    else:  # vmap against the task-by-task loop, every direction
        loop = _step(model, learned, batch, first_order=False, vectorize=False, rates=rates)
        for a, b in zip([out.direction, *out.coefficient_directions], [loop.direction, *loop.coefficient_directions]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# -- MetaOptimizer -------------------------------------------------------------------------------------


def test_optimizer_updates_the_entries_in_their_own_group():
    model = smooth_mlp()
    opt = _opt(model, LearnedTableau("rk4", "pattern", "order", lr=0.3))
    learned = opt.learned_tableau
    assert opt.param_groups[-1]["params"] == [learned.tensor] and opt.param_groups[-1]["lr"] == 0.3
    before = learned.tensor.detach().clone()
    out = opt.step(regression_batch())
    assert torch.equal(learned.tensor.grad, out.tableau_directions[0])
    torch.testing.assert_close(learned.tensor.detach(), before - 0.3 * out.tableau_directions[0], rtol=0, atol=1e-15)
    current = opt.current_tableau()
    assert current.name == "learned-rk4" and current.A[1][0] == float(learned.tensor.detach()[0])
    assert math.isclose(math.fsum(current.b), 1.0, abs_tol=1e-12)  # b follows A: still consistent
    assert current.b != get_tableau("rk4").b


def test_compute_apply_and_learned_rates_beside():
    model = smooth_mlp()
    opt = _opt(model, LearnedTableau("heun", "full"), rates=Rates("tensor"), lr=0.1)
    out = opt.compute(regression_batch())
    (a,) = opt.learned_tableau.tensors
    (r,) = opt.rates.tensors
    assert torch.equal(a.grad, out.tableau_directions[0]) and torch.equal(r.grad, out.rate_directions[0])
    before = a.detach().clone()
    opt.apply()
    torch.testing.assert_close(a.detach(), before - 0.1 * out.tableau_directions[0], rtol=0, atol=1e-15)


def _save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_state_dict_round_trip_resumes_bit_for_bit():
    base = smooth_mlp()
    kw = dict(outer="adam", lr=1e-2)
    spec = LearnedTableau("rk4", "pattern", "order", lr=3e-3)
    model = copy.deepcopy(base)
    opt = _opt(model, spec, **kw)
    for _ in range(3):
        opt.step(regression_batch())
    saved_model, saved_opt = _save(model.state_dict()), _save(opt.state_dict())
    assert saved_opt["rkfast"]["learned_tableau"]["weights"] == "order"
    model2 = copy.deepcopy(base)
    opt2 = _opt(model2, spec, **kw)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert same_bits(opt2.learned_tableau.tensor, opt.learned_tableau.tensor)
    for _ in range(2):
        b = regression_batch()
        opt.step(b)
        opt2.step(b)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert same_bits(p, q)
    assert same_bits(opt.learned_tableau.tensor, opt2.learned_tableau.tensor)
    other = _opt(copy.deepcopy(base), LearnedTableau("rk4", "full", "order"), outer="adam", lr=1e-2)
    with pytest.raises(ValueError, match="learned tableau"):
        other.load_state_dict(saved_opt)
    plain = _opt(copy.deepcopy(base), "rk4", outer="adam", lr=1e-2)
    with pytest.raises(ValueError, match="learned tableau"):
        plain.load_state_dict(saved_opt)


@pytest.mark.parametrize("failure", ["nan_batch", "nan_tableau_lr", "singular", "negative_weight"])
def test_failed_step_changes_nothing(failure):
    model = smooth_mlp()
    opt = _opt(model, LearnedTableau("heun", "pattern", "order"), outer="adam", lr=1e-2)
    opt.step(regression_batch())
    opt.step(regression_batch())
    batch = regression_batch()
    error = NonFiniteLossError
    if failure == "nan_batch":
        batch.support[1][0, 0] = float("nan")
    elif failure == "nan_tableau_lr":
        opt.param_groups[-1]["lr"] = float("nan")
    elif failure == "singular":
        with torch.no_grad():
            opt.learned_tableau.tensor.zero_()  # c2 = 0: no b satisfies b2 c2 = 1/2
        error = OrderConditionsError
    else:
        with torch.no_grad():
            opt.learned_tableau.tensor.fill_(0.4)  # c2 = 0.4 < 1/2: b1 = 1 - 1/(2 c2) < 0, unbounded meta-loss
        error = OrderConditionsError
    values = opt.learned_tableau.tensor.detach().clone()
    grad = opt.learned_tableau.tensor.grad.clone()
    snap = snapshot(model, opt)
    with pytest.raises(error):
        opt.step(batch)
    assert_unchanged(model, opt, snap)
    assert same_bits(opt.learned_tableau.tensor, values) and same_bits(opt.learned_tableau.tensor.grad, grad)


def test_evaluate_adapts_with_the_current_tableau_step():
    model = smooth_mlp(hidden=6)
    opt = _opt(model, LearnedTableau("midpoint"))
    with torch.no_grad():
        opt.learned_tableau.tensor.fill_(0.8)  # c2 = 0.8: the test step h c_s / m becomes 0.8 h
    batch = regression_batch()
    res = opt.evaluate(batch, steps=(1, 2))
    assert math.isclose(res.step_size, 0.8 * H, rel_tol=1e-7)
    ref = RF.evaluate(model, F.mse_loss, opt.meta_parameters(), batch, res.step_size, (1, 2))
    assert torch.equal(res.losses, ref.losses)


def test_follows_model_to():
    model = smooth_mlp(dtype=torch.float32)
    opt = _opt(model, LearnedTableau("heun"), outer="adam")
    opt.step(TaskBatch(*(t.float() for t in regression_batch())))
    model.to(torch.float64)
    opt.step(regression_batch())
    assert opt.learned_tableau.tensor.dtype == torch.float64
    assert opt.learned_tableau.tensor is opt.param_groups[-1]["params"][0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(pattern="all"), "LearnedTableau pattern"),
    (dict(pattern=True), "LearnedTableau pattern"),
    (dict(weights="softmax"), "LearnedTableau weights"),
    (dict(lr=-1.0), "LearnedTableau lr"),
    (dict(lr=float("nan")), "LearnedTableau lr"),
    (dict(lr=True), "LearnedTableau lr"),
])
def test_bad_arguments_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearnedTableau("heun", **kwargs)


def test_capture_with_first_order_refused():
    with pytest.raises(ValueError, match="capture"):
        _opt(smooth_mlp(), LearnedTableau("heun"), capture=True, first_order=True)


def test_spec_round_trips_through_json():
    for spec in (LearnedTableau("rk4", "full", "order", lr=0.3), LearnedTableau(rk2(0.75)),
                 LearnedTableau(rkfast.Tableau.from_arrays([[0, 0], [0.8, 0]], [0.25, 0.75], "mine"))):
        assert LearnedTableau.from_json(spec.to_json()) == spec
    assert LearnedTableau("rk4").to_json() == {"tableau": "rk4", "pattern": "pattern", "weights": "fixed", "lr": None}
    assert LearnedTableau("heun").name == "learned-heun"
    with pytest.raises(ValueError, match="unknown keys"):
        LearnedTableau.from_json({"tableau": "heun", "tableau_lr": 0.1})


def test_euler_has_nothing_to_learn_on_its_pattern_but_full_works():
    with pytest.raises(ValueError, match="no entry of A"):
        LearnedTableau("euler", "pattern")
    with pytest.raises(ValueError, match="no entry of A"):
        LearnedTableau("euler", "full")  # one stage: nothing below the diagonal


def test_default_has_no_learned_tableau():
    opt = _opt(smooth_mlp())
    assert opt.learned_tableau is None and opt.current_tableau() is opt.tableau
    assert "learned_tableau" not in opt.state_dict()["rkfast"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_check.sh learned)")
@pytest.mark.parametrize("first_order", [False, True])
def test_cuda_steps_match_the_cpu_reference(first_order):
    """Learned tableau and rates on CUDA (the Triton per-element stage point) against float64 on the CPU."""
    kw = dict(rates=Rates("element"), first_order=first_order,
              outer="sgd", lr=0.05)  # (Adam would amplify float32 rounding of near-zero gradients)
    cpu = smooth_mlp(hidden=16)
    gpu = copy.deepcopy(cpu).float().cuda()
    spec = LearnedTableau("rk4", "pattern", "order")
    opt_cpu, opt_gpu = _opt(cpu, spec, **kw), _opt(gpu, spec, **kw)
    assert opt_gpu.backend == "triton"
    for _ in range(3):
        b = regression_batch(tasks=8)
        c = opt_cpu.step(b)
        g = opt_gpu.step(TaskBatch(*(t.float().cuda() for t in b)))
        torch.testing.assert_close(g.loss.double().cpu(), c.loss, rtol=1e-4, atol=1e-5)
    for p, q in zip(gpu.parameters(), cpu.parameters()):
        torch.testing.assert_close(p.double().cpu(), q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(opt_gpu.learned_tableau.tensor.double().cpu(), opt_cpu.learned_tableau.tensor,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(opt_gpu.rates.tensors[0].double().cpu(), opt_cpu.rates.tensors[0], rtol=1e-4, atol=1e-5)


def test_a_negative_weight_is_refused_naming_it_and_is_a_non_finite_loss_error():
    learned = LearnedTableau("heun", weights="order").bind(torch.float64)
    with torch.no_grad():
        learned.tensor.fill_(0.45)
    with pytest.raises(OrderConditionsError, match="negative entry") as caught:
        learned.weights()
    assert isinstance(caught.value, NonFiniteLossError) and isinstance(caught.value, ValueError)
    b = learned.weights(check=False)  # what a captured step computes: non-finite, so the step is skipped
    assert torch.isnan(b).all()
    with pytest.raises(OrderConditionsError, match="negative entry"):
        LearnedTableau(rkfast.Tableau.from_arrays([[0, 0], [0.3, 0]], [0.5, 0.5]), weights="order")
    with torch.no_grad():
        learned.tensor.fill_(0.5)  # midpoint: b1 = 0 exactly, allowed
    torch.testing.assert_close(learned.weights(), torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_an_update_that_makes_a_weight_negative_is_undone():
    """The entries after an update must still give usable weights: else the update is undone and raises."""
    model = smooth_mlp()
    opt = _opt(model, LearnedTableau("heun", "pattern", "order", lr=1.0), lr=0.05)
    with torch.no_grad():
        opt.learned_tableau.tensor.fill_(0.5 + 1e-3)  # just above midpoint, where b1 = 0
    opt.compute(regression_batch())
    opt.learned_tableau.tensor.grad.fill_(1.0)  # an edited .grad that moves A21 to -0.499: b1 < 0
    values, snap = opt.learned_tableau.tensor.detach().clone(), snapshot(model, opt)
    with pytest.raises(OrderConditionsError, match="negative entry"):
        opt.apply()
    assert_unchanged(model, opt, snap)
    assert same_bits(opt.learned_tableau.tensor, values)


def test_coefficient_summaries_report_each_kind_with_its_group_lr():
    opt = _opt(smooth_mlp(), LearnedTableau("heun", "pattern", "order", lr=0.3),
               rates=Rates("tensor", frozen={"0.bias": 0.0}, lr=0.2))
    assert [c.key for c in opt.coefficients] == ["rates", "learned_tableau"]
    assert all(isinstance(c, rkfast.Coefficients) for c in opt.coefficients)
    summaries = opt.coefficient_summaries()
    assert summaries["rates"] == {
        "granularity": "tensor", "per_stage": False, "sets": 1, "inner_lr": H, "frozen": {"0.bias": 0.0},
        "values": {n: [0.0 if n == "0.bias" else H] for n in opt.layout.names}, "rate_lr": 0.2}
    assert summaries["learned_tableau"] == {
        "pattern": "pattern", "weights": "order", "base": "heun", "entries": [[1, 0]], "A": [[0.0, 0.0], [1.0, 0.0]],
        "b": [0.5, 0.5], "order": 2, "test_step": H, "tableau_lr": 0.3}
    fixed = _opt(smooth_mlp(), rates=Rates(frozen={"0.*": 0.0}))
    fixed.inner_lr = 0.05  # the rates of tensors neither learned nor frozen follow inner_lr
    summary = fixed.coefficient_summaries()["rates"]
    assert summary["rate_lr"] is None and summary["inner_lr"] == 0.05 and summary["values"]["2.weight"] == [0.05]
    assert _opt(smooth_mlp()).coefficient_summaries() == {}
