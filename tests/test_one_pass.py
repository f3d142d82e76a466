"""The CPU's one-pass second-order step (``rkfast.taskmap.stage_query_losses``): every stage of a task in one
``vmap`` call. It runs with the pure-PyTorch kernels only, where it must give the stage-by-stage step's very
bits (direction, meta-loss, stage losses and metrics), raise the same errors, and run only where it applies;
the fused kernels (the CPU's default) keep the stage-by-stage step and its results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import classification_batch, flat_theta, regression_batch, smooth_mlp
from rkfast import MetaOptimizer, Rates, TaskBatch, taskmap
from rkfast import functional as RF
from rkfast.functional import meta_step, module_task_loss
from rkfast.kernels import resolve_backend
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


@pytest.mark.parametrize("tableau", ["maml", "heun", "rk4", "rk38", "maml(3)", "maml_msl(0.2, 0.3, 0.5)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pass_gives_the_stage_by_stage_bits(tableau, dtype, monkeypatch):
    model, batch = smooth_mlp().to(dtype), regression_batch(tasks=4, dtype=dtype)
    theta = flat_theta(model)[1]
    calls = counted(monkeypatch)
    one = meta_step(model, F.mse_loss, theta, batch, tableau, H, backend="torch")
    assert calls == [1]
    staged(monkeypatch)
    ref = meta_step(model, F.mse_loss, theta, batch, tableau, H, backend="torch")
    assert calls == [1]
    # a faster schedule of the same arithmetic: equal, not close
    assert torch.equal(one.direction, ref.direction) and torch.equal(one.loss, ref.loss)
    assert one.stage_losses.keys() == ref.stage_losses.keys()
    for j, value in ref.stage_losses.items():
        assert torch.equal(one.stage_losses[j], value)
    assert one.direction.abs().max() > 0


def test_one_pass_reports_the_metrics_of_every_stage(monkeypatch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 3)).double()
    batch = classification_batch()
    theta = flat_theta(model)[1]
    calls = counted(monkeypatch)
    one = meta_step(model, F.cross_entropy, theta, batch, "rk4", H, backend="torch")
    staged(monkeypatch)
    ref = meta_step(model, F.cross_entropy, theta, batch, "rk4", H, backend="torch")
    assert calls == [1]
    assert one.stage_metrics.keys() == ref.stage_metrics.keys() == {"accuracy"}
    for j, value in ref.stage_metrics["accuracy"].items():
        torch.testing.assert_close(one.stage_metrics["accuracy"][j], value, rtol=1e-14, atol=0)
    torch.testing.assert_close(one.direction, ref.direction, rtol=1e-12, atol=1e-14)


def test_meta_optimizer_steps_in_one_pass_with_the_pytorch_kernels(monkeypatch):
    model, batch = smooth_mlp(), regression_batch()
    calls = counted(monkeypatch)
    opt = MetaOptimizer(model, F.mse_loss, tableau="rk4", inner_lr=H, backend="torch")
    opt.step(batch)
    opt.step(batch)
    assert calls == [1, 1]


@pytest.mark.parametrize(
    "options",
    [dict(first_order=True, backend="torch"), dict(vectorize=False, backend="torch"), dict(backend="auto")],
    ids=["first-order", "task-by-task", "fused-kernels"],
)
def test_the_stage_by_stage_step_runs_where_one_pass_does_not_apply(options, monkeypatch):
    # the fused kernels round the stage points and sum over the tasks in their own order: one pass would
    # change the step's bits there (the CPU's default kernels, when the C++ extension is built)
    if options.get("backend") == "auto" and resolve_backend("auto", torch.device("cpu"), torch.float64) == "torch":
        pytest.skip("the C++ kernels are not built here: auto is the pure-PyTorch backend")
    model, batch = smooth_mlp(), regression_batch()
    calls = counted(monkeypatch)
    meta_step(model, F.mse_loss, flat_theta(model)[1], batch, "rk4", H, **options)
    assert calls == []
    learned = MetaOptimizer(model, F.mse_loss, tableau="heun", inner_lr=H, backend="torch", rates=Rates("tensor"))
    learned.step(batch)  # learned rates: their directions read the stages' terms
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
        RF.rk_meta_step(theta, support, detached, batch.support, batch.query, "heun", H, backend="torch")
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
        meta_step(model, F.mse_loss, flat_theta(model)[1], wrong, "rk4", H, backend="torch")
    assert seen == [None]
