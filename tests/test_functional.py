"""The batched RK meta-step against hand-written MAML variants, finite differences and the sequential path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from helpers import classification_batch, flat_theta, regression_batch, smooth_mlp
from rkfast import Tableau, TaskBatch, get_tableau, maml, maml_msl, models
from rkfast.functional import (
    AdaptationOutput,
    ParamLayout,
    adapt,
    combine,
    evaluate,
    mean_ci95,
    meta_step,
    module_task_loss,
    rk_meta_step,
    stage_point,
    use_batch_statistics,
)

H = 0.3  # a large inner step makes second-order terms matter


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-8) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.0e}"


# -- hand-written references: one task at a time, plain autograd --------------------------------------


def task_loss(model: nn.Module, layout: ParamLayout, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(functional_call(model, layout.unflatten(w), (x,)), y)


def hand_maml(model, batch, theta, steps=1, weights=None, second_order=True, h=H):
    """MAML with ``steps`` inner steps; the query loss after step ``j`` weighted by ``weights[j]``."""
    layout = ParamLayout.from_module(model)
    weights = weights if weights is not None else [0.0] * steps + [1.0]
    th = theta.clone().requires_grad_()
    total = 0.0
    for i in range(batch.num_tasks):
        w = th
        for j in range(steps + 1):
            if weights[j]:
                total = total + weights[j] * task_loss(model, layout, w, batch.query_x[i], batch.query_y[i])
            if j < steps:
                (g,) = torch.autograd.grad(
                    task_loss(model, layout, w, batch.support_x[i], batch.support_y[i]), w, create_graph=second_order
                )
                w = w - h * (g if second_order else g.detach())
    (d,) = torch.autograd.grad(total / batch.num_tasks, th)
    return d


def hand_first_order_rk(model, batch, theta, tableau: Tableau, h=H):
    """The stage-by-stage first-order formula: d = (1/T) sum_i sum_j b_j grad L_Q,i(theta_i^(j))."""
    layout = ParamLayout.from_module(model)
    d = torch.zeros_like(theta)
    for i in range(batch.num_tasks):
        slopes, points = [], []
        for j in range(tableau.stages):
            w = theta - h * sum((tableau.A[j][l] * slopes[l] for l in range(j)), torch.zeros_like(theta))
            points.append(w)
            wl = w.clone().requires_grad_()
            (k,) = torch.autograd.grad(task_loss(model, layout, wl, batch.support_x[i], batch.support_y[i]), wl)
            slopes.append(k)
        for j in range(tableau.stages):
            wl = points[j].clone().requires_grad_()
            (g,) = torch.autograd.grad(task_loss(model, layout, wl, batch.query_x[i], batch.query_y[i]), wl)
            d += tableau.b[j] * g / batch.num_tasks
    return d


# -- MAML family: equal to hand-written code ------------------------------------------------------------


@pytest.mark.parametrize("second_order", [True, False])
def test_maml_equals_hand_written(second_order):
    model, batch = smooth_mlp(), regression_batch()
    _, theta = flat_theta(model)
    out = meta_step(model, F.mse_loss, theta, batch, "maml", H, first_order=not second_order)
    assert_close(out.direction, hand_maml(model, batch, theta, second_order=second_order))


@pytest.mark.parametrize("second_order", [True, False])
def test_maml3_equals_three_step_maml(second_order):
    model, batch = smooth_mlp(), regression_batch()
    _, theta = flat_theta(model)
    out = meta_step(model, F.mse_loss, theta, batch, maml(3), H, first_order=not second_order)
    assert_close(out.direction, hand_maml(model, batch, theta, steps=3, second_order=second_order))


def test_maml_msl_equals_weighted_multistep_loss():
    model, batch = smooth_mlp(), regression_batch()
    _, theta = flat_theta(model)
    weights = torch.rand(4, dtype=torch.float64)
    weights = (weights / weights.sum()).tolist()
    out = meta_step(model, F.mse_loss, theta, batch, maml_msl(weights), H)
    assert_close(out.direction, hand_maml(model, batch, theta, steps=3, weights=weights))


def test_euler_equals_joint_training_gradient():
    model, batch = smooth_mlp(), regression_batch()
    layout, theta = flat_theta(model)
    th = theta.clone().requires_grad_()
    joint = sum(task_loss(model, layout, th, batch.query_x[i], batch.query_y[i]) for i in range(batch.num_tasks))
    (expected,) = torch.autograd.grad(joint / batch.num_tasks, th)
    for first_order in (False, True):
        out = meta_step(model, F.mse_loss, theta, batch, "euler", H, first_order=first_order)
        assert_close(out.direction, expected)
        assert set(out.stage_losses) == {1}


# -- general tableaus: gradient of the meta-loss (finite differences) and first-order formula ---------


def random_tableau(stages: int = 3) -> Tableau:
    A = torch.tril(torch.randn(stages, stages, dtype=torch.float64), diagonal=-1)
    b = torch.rand(stages, dtype=torch.float64) + 0.1
    return Tableau.from_arrays(A, b / b.sum(), name="random")


class _MetaLoss(torch.autograd.Function):
    """theta -> meta-loss, whose backward is rkfast's meta-direction: gradcheck compares it to finite
    differences of the meta-loss value."""

    @staticmethod
    def forward(ctx, theta, model, batch, tableau):
        out = meta_step(model, F.mse_loss, theta, batch, tableau, H)
        ctx.save_for_backward(out.direction)
        return out.loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        (direction,) = ctx.saved_tensors
        return grad_loss * direction, None, None, None


@pytest.mark.parametrize("name", ["rk4", "heun", "ralston", "kutta3", "random"])
def test_second_order_direction_is_gradient_of_meta_loss(name):
    tableau = random_tableau() if name == "random" else get_tableau(name)
    model, batch = smooth_mlp(hidden=5), regression_batch(tasks=2, shots=4, query=4)
    _, theta = flat_theta(model)
    theta.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: _MetaLoss.apply(t, model, batch, tableau), (theta,), eps=1e-6, atol=1e-7, rtol=1e-5
    )


def test_gradcheck_detects_a_first_order_direction():
    """The finite-difference check is sharp enough to tell first- from second-order directions."""
    model, batch = smooth_mlp(hidden=5), regression_batch(tasks=2, shots=4, query=4)
    _, theta = flat_theta(model)
    second = meta_step(model, F.mse_loss, theta, batch, "rk4", H).direction
    first = meta_step(model, F.mse_loss, theta, batch, "rk4", H, first_order=True).direction
    assert (second - first).abs().max() > 1e-4 * second.abs().max()


@pytest.mark.parametrize("name", ["rk4", "heun", "ralston", "rk38", "random"])
def test_first_order_direction_equals_stage_formula(name):
    tableau = random_tableau(4) if name == "random" else get_tableau(name)
    model, batch = smooth_mlp(), regression_batch()
    _, theta = flat_theta(model)
    out = meta_step(model, F.mse_loss, theta, batch, tableau, H, first_order=True)
    assert_close(out.direction, hand_first_order_rk(model, batch, theta, tableau))


def test_meta_loss_and_stage_losses_match_formula():
    model, batch = smooth_mlp(), regression_batch()
    layout, theta = flat_theta(model)
    tableau = get_tableau("heun")
    out = meta_step(model, F.mse_loss, theta, batch, tableau, H)
    stage1 = torch.stack([task_loss(model, layout, theta, batch.query_x[i], batch.query_y[i]) for i in range(3)])
    points = []
    for i in range(3):
        w = theta.clone().requires_grad_()
        (k,) = torch.autograd.grad(task_loss(model, layout, w, batch.support_x[i], batch.support_y[i]), w)
        points.append(theta - H * k)
    stage2 = torch.stack([task_loss(model, layout, points[i], batch.query_x[i], batch.query_y[i]) for i in range(3)])
    assert_close(out.stage_losses[1], stage1.mean())
    assert_close(out.stage_losses[2], stage2.mean())
    assert_close(out.loss, 0.5 * stage1.mean() + 0.5 * stage2.mean())


# -- skipped work -------------------------------------------------------------------------------------


class _CountingLoss:
    def __init__(self, loss):
        self.loss, self.calls = loss, 0

    def __call__(self, row, data):
        self.calls += 1
        return self.loss(row, data)


@pytest.mark.parametrize(
    "tableau, support_calls, query_calls",
    [("maml", 1, 1), ("euler", 0, 1), ("heun", 1, 2), ("rk4", 3, 4), (maml(3), 3, 1)],
)
def test_only_needed_support_gradients_and_query_losses(tableau, support_calls, query_calls):
    model, batch = smooth_mlp(), regression_batch(tasks=4)
    _, theta = flat_theta(model)
    support = _CountingLoss(module_task_loss(model, F.mse_loss))
    query = _CountingLoss(module_task_loss(model, F.mse_loss))
    for first_order in (False, True):
        support.calls = query.calls = 0
        rk_meta_step(theta, support, query, batch.support, batch.query, tableau, H, first_order=first_order)
        # under vmap a per-task function is traced once per stage, whatever the number of tasks
        assert (support.calls, query.calls) == (support_calls, query_calls)


def test_stage_without_any_use_is_skipped():
    # stage 2 has b_2 = 0 and no later stage reads k_2: neither its point nor its losses are computed
    tableau = Tableau.from_arrays([[0, 0, 0], [1, 0, 0], [1, 0, 0]], [0.5, 0, 0.5])
    model, batch = smooth_mlp(), regression_batch()
    _, theta = flat_theta(model)
    query = _CountingLoss(module_task_loss(model, F.mse_loss))
    out = rk_meta_step(theta, module_task_loss(model, F.mse_loss), query, batch.support, batch.query, tableau, H)
    assert query.calls == 2 and set(out.stage_losses) == {1, 3}
    assert_close(out.direction, meta_step(model, F.mse_loss, theta, batch, "heun", H).direction)


# -- batched == sequential ------------------------------------------------------------------------------


@pytest.mark.parametrize("tableau", ["maml", "heun", "rk4", "kutta3", "maml(2)"])
@pytest.mark.parametrize("first_order", [False, True])
def test_batched_equals_sequential(tableau, first_order):
    model, batch = smooth_mlp(), regression_batch(tasks=4)
    _, theta = flat_theta(model)
    vec = meta_step(model, F.mse_loss, theta, batch, tableau, H, first_order=first_order)
    seq = meta_step(model, F.mse_loss, theta, batch, tableau, H, first_order=first_order, vectorize=False)
    assert_close(vec.direction, seq.direction, rtol=1e-10)
    assert_close(vec.loss, seq.loss, rtol=1e-10)
    assert vec.stage_losses.keys() == seq.stage_losses.keys()


def small_conv4() -> nn.Module:
    model = models.conv4(in_channels=1, num_classes=3, hidden=6, image_size=16).double()
    # a user-built BatchNorm that tracks running statistics, as nn.BatchNorm2d does by default
    model[1] = nn.BatchNorm2d(6).double()
    return model


@pytest.mark.parametrize("first_order", [False, True])
def test_conv4_batchnorm_under_vmap_equals_sequential(first_order):
    model = use_batch_statistics(small_conv4())
    assert all(not getattr(m, "track_running_stats", False) for m in model.modules())
    batch = classification_batch()
    _, theta = flat_theta(model)
    vec = meta_step(model, F.cross_entropy, theta, batch, "rk4", 0.1, first_order=first_order)
    seq = meta_step(model, F.cross_entropy, theta, batch, "rk4", 0.1, first_order=first_order, vectorize=False)
    assert_close(vec.direction, seq.direction, rtol=1e-9)
    assert set(vec.stage_metrics) == {"accuracy"}
    for stage, acc in vec.stage_metrics["accuracy"].items():
        assert 0.0 <= acc.item() <= 1.0
        assert acc.item() == pytest.approx(seq.stage_metrics["accuracy"][stage].item())


def test_batchnorm_uses_each_tasks_own_statistics():
    # scaling one task's inputs must not change another task's loss: no statistics shared across tasks
    model = use_batch_statistics(small_conv4())
    batch = classification_batch()
    _, theta = flat_theta(model)
    base = evaluate(model, F.cross_entropy, theta, batch, 0.1, steps=(1,))
    x = batch.support_x.clone()
    x[0] *= 7.0
    xq = batch.query_x.clone()
    xq[0] += 3.0
    moved = evaluate(model, F.cross_entropy, theta, TaskBatch(x, batch.support_y, xq, batch.query_y), 0.1, steps=(1,))
    assert torch.allclose(base.losses[:, 1:], moved.losses[:, 1:], rtol=1e-12, atol=0)
    assert not torch.allclose(base.losses[:, 0], moved.losses[:, 0])


# -- the general core: callable (per-stage) data --------------------------------------------------------


def test_stage_callable_data_sees_each_stage_parameters():
    """Reinforcement-learning shape: each stage's data is generated from that stage's own parameters."""
    model, batch = smooth_mlp(), regression_batch(tasks=3)
    layout, theta = flat_theta(model)
    seen = []

    def rollout(stage, params):
        seen.append((stage, params.shape, params.requires_grad))
        # data that depends on the stage's parameters (like trajectories of that stage's policy)
        shift = params.sum(dim=1).view(-1, 1, 1)
        return batch.support_x + 0.01 * shift, batch.support_y

    loss = module_task_loss(model, F.mse_loss)
    kwargs = dict(num_tasks=3)
    vec = rk_meta_step(theta, loss, loss, rollout, rollout, "heun", H, **kwargs)
    assert [(s, tuple(shape), grad) for s, shape, grad in seen] == [(0, (3, theta.numel()), False)] * 2 + [
        (1, (3, theta.numel()), False)
    ]
    seq = rk_meta_step(theta, loss, loss, rollout, rollout, "heun", H, vectorize=False, **kwargs)
    assert_close(vec.direction, seq.direction, rtol=1e-10)
    # with data that ignores the parameters, callables and plain pytrees agree
    fixed = rk_meta_step(theta, loss, loss, lambda s, p: batch.support, lambda s, p: batch.query, "rk4", H, **kwargs)
    plain = rk_meta_step(theta, loss, loss, batch.support, batch.query, "rk4", H)
    assert_close(fixed.direction, plain.direction, rtol=1e-12)


def test_callable_data_needs_num_tasks():
    model = smooth_mlp()
    _, theta = flat_theta(model)
    loss = module_task_loss(model, F.mse_loss)
    with pytest.raises(ValueError, match="num_tasks"):
        rk_meta_step(theta, loss, loss, lambda s, p: None, lambda s, p: None, "maml", H)


def test_separate_support_and_query_losses():
    model, batch = smooth_mlp(), regression_batch()
    layout, theta = flat_theta(model)
    mse = module_task_loss(model, F.mse_loss)
    l1 = module_task_loss(model, F.l1_loss)
    out = rk_meta_step(theta, mse, l1, batch.support, batch.query, "maml", H)
    # hand: support MSE, query L1
    th = theta.clone().requires_grad_()
    total = 0.0
    for i in range(batch.num_tasks):
        (g,) = torch.autograd.grad(task_loss(model, layout, th, batch.support_x[i], batch.support_y[i]), th, create_graph=True)
        w = th - H * g
        total = total + F.l1_loss(functional_call(model, layout.unflatten(w), (batch.query_x[i],)), batch.query_y[i])
    (expected,) = torch.autograd.grad(total / batch.num_tasks, th)
    assert_close(out.direction, expected)


# -- adaptation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, False])
def test_adapt_equals_plain_gradient_steps(vectorize):
    model, batch = smooth_mlp(), regression_batch(tasks=3)
    layout, theta = flat_theta(model)
    out = evaluate(model, F.mse_loss, theta, batch, 0.05, steps=(3, 1), vectorize=vectorize)
    assert out.steps == (0, 1, 3) and out.step_size == 0.05
    assert out.losses.shape == (3, 3)
    for i in range(3):
        w = theta.clone()
        expected = [task_loss(model, layout, w, batch.query_x[i], batch.query_y[i])]
        for n in range(3):
            wl = w.clone().requires_grad_()
            (g,) = torch.autograd.grad(task_loss(model, layout, wl, batch.support_x[i], batch.support_y[i]), wl)
            w = w - 0.05 * g
            if n + 1 in (1, 3):
                expected.append(task_loss(model, layout, w, batch.query_x[i], batch.query_y[i]))
        assert_close(out.losses[:, i], torch.stack(expected).detach(), rtol=1e-10)


def test_adapt_reports_accuracy_and_summary():
    model = use_batch_statistics(small_conv4())
    batch = classification_batch(tasks=4)
    _, theta = flat_theta(model)
    out = evaluate(model, F.cross_entropy, theta, batch, 0.1, steps=(1, 2))
    assert out.metrics["accuracy"].shape == (3, 4)
    summary = out.summary()
    assert summary["steps"] == [0, 1, 2] and summary["step_size"] == 0.1
    mean, ci = summary["accuracy"][2]
    assert mean == pytest.approx(out.metrics["accuracy"][2].mean().item())
    both = AdaptationOutput.cat([out, out])
    assert both.losses.shape == (3, 8)


def test_adapt_rejects_bad_steps():
    model, batch = smooth_mlp(), regression_batch()
    _, theta = flat_theta(model)
    with pytest.raises(ValueError, match="steps"):
        evaluate(model, F.mse_loss, theta, batch, 0.1, steps=(0,))
    with pytest.raises(ValueError, match="step_size"):
        evaluate(model, F.mse_loss, theta, batch, float("nan"))


def test_meta_step_leaves_theta_alone():
    model, batch = smooth_mlp(), regression_batch()
    _, theta = flat_theta(model)
    before = theta.clone()
    meta_step(model, F.mse_loss, theta, batch, "rk4", H)
    assert torch.equal(theta, before) and not theta.requires_grad


def test_meta_step_rejects_non_flat_theta():
    model, batch = smooth_mlp(), regression_batch()
    _, theta = flat_theta(model)
    with pytest.raises(ValueError, match="flat"):
        meta_step(model, F.mse_loss, theta.view(1, -1), batch, "maml", H)


# -- small pieces ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stage_point_and_combine(dtype):
    T, N = 5, 1003
    theta = torch.randn(N, dtype=dtype)
    K = [torch.randn(T, N, dtype=dtype) for _ in range(3)]
    coefs = [0.5, -1.0, 2.0]
    expected = theta.unsqueeze(0).expand(T, N).clone()
    for c, k in zip(coefs, K):
        expected -= c * k
    torch.testing.assert_close(stage_point(theta, K, coefs), expected)
    torch.testing.assert_close(combine(K, coefs), sum(c * k.sum(0) for c, k in zip(coefs, K)))


def test_param_layout_round_trip():
    model = small_conv4()
    layout = ParamLayout.from_module(model)
    flat = layout.flatten(list(model.parameters()))
    assert flat.numel() == layout.numel == sum(p.numel() for p in model.parameters())
    for (name, p), (n2, view) in zip(model.named_parameters(), layout.unflatten(flat).items()):
        assert name == n2 and torch.equal(p, view)
    rows = torch.stack([flat, 2 * flat])
    assert torch.equal(layout.unflatten(rows)["0.weight"][1], 2 * model[0].weight)


def test_mean_ci95():
    values = torch.randn(1000, dtype=torch.float64) * 2 + 1
    mean, half = mean_ci95(values)
    assert mean == pytest.approx(values.mean().item())
    assert half == pytest.approx(1.96 * values.std().item() / math.sqrt(1000))
    with pytest.raises(ValueError):
        mean_ci95(torch.tensor([]))
