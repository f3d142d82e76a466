"""The CPU's one-pass second-order step (``rkfast.taskmap.stage_query_losses``): every stage of a task in one
``vmap`` call. It must give the stage-by-stage step's meta-loss, stage losses and metrics, and its direction
to rounding, raise the same errors, and run only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import classification_batch, flat_theta, regression_batch, smooth_mlp
from rkfast import MetaOptimizer, Rates, TaskBatch, taskmap
from rkfast import functional as RF
from rkfast.functional import meta_step, module_task_loss
from rkfast.taskmap import DETACHED_LOSS, TaskMap, one_pass_applies

H = 0.05


def staged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make rk_meta_step take the stage-by-stage path everywhere."""
    monkeypatch.setattr(RF, "one_pass_applies", lambda *args, **kwargs: False)


def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the one-pass computations that rk_meta_step runs."""
    calls: list[int] = []
    original = RF.stage_query_losses

    def run(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(RF, "stage_query_losses", run)
    return calls


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("tableau", ["maml", "heun", "rk4", "rk38", "maml(3)", "maml_msl(0.2, 0.3, 0.5)"])
def test_one_pass_agrees_with_the_stage_by_stage_step(tableau, first_order, monkeypatch):
    model, batch = smooth_mlp(), regression_batch(tasks=4)
    theta = flat_theta(model)[1]
    calls = counted(monkeypatch)
    one = meta_step(model, F.mse_loss, theta, batch, tableau, H, first_order=first_order)
    assert calls == [1]
    staged(monkeypatch)
    ref = meta_step(model, F.mse_loss, theta, batch, tableau, H, first_order=first_order)
    assert calls == [1]
    # the stage points are computed by other kernels (the pure-PyTorch order of operations): equal to rounding
    torch.testing.assert_close(one.direction, ref.direction, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(one.loss, ref.loss, rtol=1e-14, atol=0)
    assert one.stage_losses.keys() == ref.stage_losses.keys()
    for j, value in ref.stage_losses.items():
        torch.testing.assert_close(one.stage_losses[j], value, rtol=1e-14, atol=0)


def test_one_pass_reports_the_metrics_of_every_stage(monkeypatch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 3)).double()
    batch = classification_batch()
    theta = flat_theta(model)[1]
    calls = counted(monkeypatch)
    one = meta_step(model, F.cross_entropy, theta, batch, "rk4", H)
    staged(monkeypatch)
    ref = meta_step(model, F.cross_entropy, theta, batch, "rk4", H)
    assert calls == [1]
    assert one.stage_metrics.keys() == ref.stage_metrics.keys() == {"accuracy"}
    for j, value in ref.stage_metrics["accuracy"].items():
        torch.testing.assert_close(one.stage_metrics["accuracy"][j], value, rtol=1e-14, atol=0)
    torch.testing.assert_close(one.direction, ref.direction, rtol=1e-12, atol=1e-14)


def test_meta_optimizer_steps_in_one_pass_on_the_cpu(monkeypatch):
    model, batch = smooth_mlp(), regression_batch()
    calls = counted(monkeypatch)
    opt = MetaOptimizer(model, F.mse_loss, tableau="rk4", inner_lr=H)
    opt.step(batch)
    opt.step(batch)
    assert calls == [1, 1]


def test_first_order_in_one_pass_holds_the_slopes_constant(monkeypatch):
    # the second-order direction differs from the first-order one by the slopes' Hessian terms: one pass
    # must give the first-order one, not differentiate through the slopes
    model, batch = smooth_mlp(), regression_batch(tasks=4)
    theta = flat_theta(model)[1]
    calls = counted(monkeypatch)
    first = meta_step(model, F.mse_loss, theta, batch, "rk4", 0.3, first_order=True)
    second = meta_step(model, F.mse_loss, theta, batch, "rk4", 0.3)
    assert calls == [1, 1]
    assert (first.direction - second.direction).norm() > 1e-3 * second.direction.norm()
    staged(monkeypatch)
    ref = meta_step(model, F.mse_loss, theta, batch, "rk4", 0.3, first_order=True)
    torch.testing.assert_close(first.direction, ref.direction, rtol=1e-12, atol=1e-14)


def test_meta_optimizer_first_order_and_learned_rates(monkeypatch):
    # first order in one pass; learned rates (whose directions read the slopes) stage by stage
    model, batch = smooth_mlp(), regression_batch()
    calls = counted(monkeypatch)
    MetaOptimizer(model, F.mse_loss, tableau="heun", inner_lr=H, first_order=True).step(batch)
    assert calls == [1]
    MetaOptimizer(model, F.mse_loss, tableau="heun", inner_lr=H, first_order=True, rates=Rates("tensor")).step(batch)
    assert calls == [1]


@pytest.mark.parametrize("options", [dict(vectorize=False)], ids=["task-by-task"])
def test_the_stage_by_stage_step_runs_where_one_pass_does_not_apply(options, monkeypatch):
    model, batch = smooth_mlp(), regression_batch()
    calls = counted(monkeypatch)
    meta_step(model, F.mse_loss, flat_theta(model)[1], batch, "rk4", H, **options)
    assert calls == []


def test_one_pass_applies_to_tensor_data_of_models_without_norm_layers():
    theta = torch.zeros(3)
    plain = module_task_loss(smooth_mlp(), F.mse_loss)
    normed = module_task_loss(nn.Sequential(nn.Linear(1, 4), nn.LayerNorm(4), nn.Linear(4, 1)), F.mse_loss)
    data = (torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))
    vectorized, looped = TaskMap(2, True, "different"), TaskMap(2, False, "different")
    assert one_pass_applies(vectorized, theta, plain, data, data)
    assert not one_pass_applies(looped, theta, plain, data, data)
    assert not one_pass_applies(vectorized, theta, normed, data, data)  # exact norms around the slopes only
    assert not one_pass_applies(vectorized, theta, plain, lambda stage, params: data, data)
    assert not one_pass_applies(vectorized, theta, lambda row, d: row.sum(), data, data)  # may normalize


def test_a_detached_query_loss_is_refused_in_one_pass(monkeypatch):
    model, batch = smooth_mlp(), regression_batch()
    theta = flat_theta(model)[1]
    support = module_task_loss(model, F.mse_loss)

    def detached(row, data):
        return support(row, data)[0].detach()

    detached.has_norm_layers = False
    calls = counted(monkeypatch)
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        RF.rk_meta_step(theta, support, detached, batch.support, batch.query, "heun", H)
    assert calls == [1] and "does not depend" in DETACHED_LOSS


def test_a_runtime_error_in_one_pass_leaves_it_to_the_stage_by_stage_step(monkeypatch):
    # the stage-by-stage path then raises (or not) as it always did, with its own vmap probes
    model = smooth_mlp()
    batch = regression_batch()
    wrong = TaskBatch(torch.randn(3, 5, 2, dtype=torch.float64), batch.support_y, batch.query_x, batch.query_y)
    seen: list[object] = []
    original = taskmap.stage_query_losses

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(RF, "stage_query_losses", spy)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        meta_step(model, F.mse_loss, flat_theta(model)[1], wrong, "rk4", H)
    assert seen == [None]
