"""Normalization: per-task batch statistics that leave the model's running statistics alone, and MAML++'s
per-step batch norm (``rkfast.norms``) under vmap and task by task, against finite differences."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import classification_batch, flat_theta, same_bits
from rkfast import MetaOptimizer, TaskBatch, TaskSet, models
from rkfast.functional import ParamLayout, evaluate, meta_step, use_batch_statistics
from rkfast.norms import (PerStepBatchNorm1d, PerStepBatchNorm2d, at_step, batch_statistics, current_step,
                          statistics_layers)

H = 0.3


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.0e}"


# -- task 1: running statistics are the user's ----------------------------------------------------------


def tracked_conv4() -> nn.Module:
    """A small conv4 whose BatchNorm layers track running statistics (nn.BatchNorm2d's default), with
    non-trivial statistics, as a checkpoint of a conventionally trained model would have."""
    model = models.conv4(in_channels=1, num_classes=3, hidden=6, image_size=16).double()
    for i, layer in enumerate(model):
        if isinstance(layer, nn.BatchNorm2d):
            model[i] = bn = nn.BatchNorm2d(6).double()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(7)
    return model


def buffers_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffer tensors themselves (not copies): identity and contents are both checked."""
    return dict(model.named_buffers())


def assert_buffers_unchanged(model: nn.Module, objects: dict[str, torch.Tensor], values: dict[str, torch.Tensor]):
    now = buffers_of(model)
    assert now.keys() == objects.keys()
    for name, t in now.items():
        assert t is objects[name], f"buffer {name} was replaced"
        assert same_bits(t, values[name]), f"buffer {name} changed"
    assert all(layer.track_running_stats for layer in statistics_layers(model))


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("first_order", [False, True])
def test_steps_and_evaluate_leave_running_statistics_alone(vectorize, first_order):
    model = tracked_conv4()
    objects = buffers_of(model)
    values = {name: t.clone() for name, t in objects.items()}
    keys = list(model.state_dict())
    opt = MetaOptimizer(model, F.cross_entropy, tableau="heun", inner_lr=0.1, vectorize=vectorize,
                        first_order=first_order)
    assert opt.batch_statistics and opt.vectorize == vectorize
    assert_buffers_unchanged(model, objects, values)
    opt.step(classification_batch())
    opt.compute(classification_batch())
    opt.apply()
    opt.evaluate(classification_batch(), steps=(1, 2))
    model.eval()  # a model in eval mode: rkfast's calls still use batch statistics and change nothing
    opt.step(classification_batch())
    assert_buffers_unchanged(model, objects, values)
    assert list(model.state_dict()) == keys


def test_an_old_checkpoint_still_loads():
    model = tracked_conv4()
    checkpoint = copy.deepcopy(model.state_dict())
    opt = MetaOptimizer(model, F.cross_entropy, tableau="maml", inner_lr=0.1)
    opt.step(classification_batch())
    model.load_state_dict(checkpoint)  # strict: every running buffer is still there
    for name, t in model.state_dict().items():
        assert torch.equal(t, checkpoint[name])
    opt.step(classification_batch())  # the optimizer keeps working on the loaded values


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("first_order", [False, True])
def test_direction_equals_the_old_switched_models(vectorize, first_order):
    """The meta-direction is the one the old, destructive switch (use_batch_statistics) gave."""
    model, batch = tracked_conv4(), classification_batch()
    old_model = use_batch_statistics(copy.deepcopy(model))
    _, theta = flat_theta(old_model)
    old = meta_step(old_model, F.cross_entropy, theta, batch, "rk4", 0.1, first_order=first_order,
                    vectorize=vectorize)
    new = MetaOptimizer(model, F.cross_entropy, tableau="rk4", inner_lr=0.1, first_order=first_order,
                        vectorize=vectorize).compute(batch)
    assert_close(new.direction, old.direction, rtol=1e-12)
    assert_close(new.loss, old.loss, rtol=1e-12)
    old_scores = evaluate(old_model, F.cross_entropy, theta, batch, 0.1, steps=(1, 2), vectorize=vectorize)
    new_scores = evaluate(model, F.cross_entropy, theta, batch, 0.1, steps=(1, 2), vectorize=vectorize)
    assert_close(new_scores.losses, old_scores.losses, rtol=1e-12)


def eval_forward(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """conv4 in eval mode written out: BatchNorm with its running statistics."""
    for layer in model:
        if isinstance(layer, nn.BatchNorm2d):
            shape = (1, -1, 1, 1)
            x = (x - layer.running_mean.view(shape)) / torch.sqrt(layer.running_var.view(shape) + layer.eps)
            x = x * layer.weight.view(shape) + layer.bias.view(shape)
        else:
            x = layer(x)
    return x


def test_eval_mode_uses_the_running_statistics_afterwards():
    model = tracked_conv4()
    opt = MetaOptimizer(model, F.cross_entropy, tableau="maml", inner_lr=0.1)
    opt.step(classification_batch())
    x = classification_batch().support_x[0]
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert_close(out, eval_forward(model, x), rtol=1e-12)
        with batch_statistics(model):
            assert not torch.allclose(model(x), out)  # the running statistics did matter


def test_task_models_use_batch_statistics_under_vmap():
    model = tracked_conv4()
    values = {name: t.clone() for name, t in model.named_buffers()}
    opt = MetaOptimizer(model, F.cross_entropy, vectorize=True)
    batch = classification_batch()
    rows = opt.meta_parameters().expand(batch.num_tasks, -1)
    with torch.no_grad():
        out = opt.task_models(rows)(batch.support_x)
        with batch_statistics(model):
            expected = torch.stack([model(x) for x in batch.support_x])
    assert_close(out, expected, rtol=1e-12)
    assert all(same_bits(t, values[name]) for name, t in model.named_buffers())


def test_batch_statistics_context_is_exception_safe_and_mode_independent():
    model = tracked_conv4()
    objects = buffers_of(model)
    values = {name: t.clone() for name, t in objects.items()}
    x = classification_batch().support_x[0]
    with torch.no_grad(), batch_statistics(model):
        training = model(x)
        model.eval()
        assert torch.equal(model(x), training)  # batch statistics in eval mode too
        model.train()
    with pytest.raises(ZeroDivisionError), batch_statistics(model):
        1 / 0
    assert_buffers_unchanged(model, objects, values)


def test_batch_statistics_false_runs_the_layers_as_configured():
    model = tracked_conv4()
    before = model[1].num_batches_tracked.clone()
    opt = MetaOptimizer(model, F.cross_entropy, tableau="maml", inner_lr=0.1, vectorize=False, batch_statistics=False)
    opt.step(classification_batch())
    assert model[1].num_batches_tracked > before  # train mode: every task's forward updated them


# -- task 2: per-step batch norm (MAML++) ------------------------------------------------------------------


def per_step_mlp(steps: int) -> nn.Sequential:
    """A small smooth model with per-step batch norm, its per-step rows made distinct."""
    model = nn.Sequential(nn.Linear(3, 5), PerStepBatchNorm1d(5, steps), nn.Tanh(), nn.Linear(5, 1)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    return model


def vector_batch(tasks: int = 3, shots: int = 6, query: int = 7) -> TaskBatch:
    f64 = torch.float64
    return TaskBatch(torch.randn(tasks, shots, 3, dtype=f64), torch.randn(tasks, shots, 1, dtype=f64),
                     torch.randn(tasks, query, 3, dtype=f64), torch.randn(tasks, query, 1, dtype=f64))


def norm_grads(model: nn.Module, direction: torch.Tensor) -> torch.Tensor:
    """The per-step weight rows' part of a flat meta-direction, ``[steps, C]``."""
    return ParamLayout.from_module(model).unflatten(direction)["1.weight"]


@pytest.mark.parametrize("tableau", ["rk4", "maml(2)", "heun"])
@pytest.mark.parametrize("first_order", [False, True])
def test_per_step_norm_vmap_equals_loop(tableau, first_order):
    model, batch = per_step_mlp(steps=3), vector_batch()
    _, theta = flat_theta(model)
    vec = meta_step(model, F.mse_loss, theta, batch, tableau, H, first_order=first_order)
    seq = meta_step(model, F.mse_loss, theta, batch, tableau, H, first_order=first_order, vectorize=False)
    assert_close(vec.direction, seq.direction, rtol=1e-10)
    assert_close(vec.loss, seq.loss, rtol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_per_step_norm_second_order_against_finite_differences(vectorize):
    model, batch = per_step_mlp(steps=3), vector_batch()  # rk4 has 4 stages: the last shares row 2
    _, theta = flat_theta(model)

    def meta_loss(t: torch.Tensor) -> float:
        return meta_step(model, F.mse_loss, t, batch, "rk4", H, vectorize=vectorize).loss.item()

    direction = meta_step(model, F.mse_loss, theta, batch, "rk4", H, vectorize=vectorize).direction
    eps = 1e-6
    for _ in range(3):
        v = torch.randn_like(theta)
        fd = (meta_loss(theta + eps * v) - meta_loss(theta - eps * v)) / (2 * eps)
        assert fd == pytest.approx(float(direction @ v), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize(("tableau", "first_order", "used_rows"), [
    ("maml(2)", False, {0, 1, 2}),  # support gradients at stages 0, 1 and the query loss at stage 2
    ("maml(2)", True, {2}),         # first order: only the query loss at stage 2 is differentiated
    ("heun", True, {0, 1}),         # b = (1/2, 1/2): query losses at stages 0 and 1
])
def test_each_stage_uses_its_own_affine_row(vectorize, tableau, first_order, used_rows):
    model, batch = per_step_mlp(steps=5), vector_batch()
    _, theta = flat_theta(model)
    out = meta_step(model, F.mse_loss, theta, batch, tableau, H, first_order=first_order, vectorize=vectorize)
    per_row = norm_grads(model, out.direction).abs().sum(dim=1)
    assert {j for j in range(5) if per_row[j] > 0} == used_rows  # rows beyond the tableau get zero gradient


class StepProbe(nn.Module):
    """Records :func:`current_step` at every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(current_step())
        return x


def test_the_step_published_to_layers():
    probe = StepProbe()
    model = nn.Sequential(nn.Linear(3, 4), probe, nn.Tanh(), nn.Linear(4, 1)).double()
    batch = vector_batch()
    _, theta = flat_theta(model)
    meta_step(model, F.mse_loss, theta, batch, "rk4", H)
    # stage j's support gradient (stages 0-2: the last one's is never needed), then its query loss
    assert probe.seen == [0, 0, 1, 1, 2, 2, 3]
    probe.seen.clear()
    evaluate(model, F.mse_loss, theta, batch, H, steps=(1, 3))
    # after n steps: the query loss (n in 0, 1, 3), then the support gradient of step n + 1
    assert probe.seen == [0, 0, 1, 1, 2, 3]
    assert current_step() == 0


def test_stage_data_callables_run_at_their_step():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    batch = vector_batch()
    seen = []

    def data(split):
        def at(stage, params):
            seen.append((stage, current_step()))
            return split
        return at

    loss = lambda m, d: F.mse_loss(m(d[0]), d[1])  # noqa: E731
    opt = MetaOptimizer(model, None, tableau="maml(2)", inner_lr=H)
    opt.step(TaskSet(loss, loss, data(batch.support), data(batch.query), num_tasks=batch.num_tasks))
    assert seen and all(stage == step for stage, step in seen)


def test_at_step_nests_and_refuses_negative_steps():
    assert current_step() == 0
    with at_step(2):
        with at_step(5):
            assert current_step() == 5
        assert current_step() == 2
    assert current_step() == 0
    with pytest.raises(ValueError, match="non-negative"):
        with at_step(-1):
            pass
    with pytest.raises(TypeError):
        with at_step(1.5):  # type: ignore[arg-type]
            pass


def test_per_step_rows_are_capped_and_input_checked():
    norm = PerStepBatchNorm2d(2, steps=3).double()
    with torch.no_grad():
        norm.bias.copy_(torch.arange(3.0).unsqueeze(1).expand(3, 2))
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    for step, row in ((0, 0), (2, 2), (7, 2)):
        with at_step(step):
            assert norm(x).mean().item() == pytest.approx(row, abs=1e-12)  # normalized mean 0, plus bias row
    with pytest.raises(ValueError, match="4-d"):
        norm(torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        PerStepBatchNorm2d(2, steps=0)


@pytest.mark.parametrize("first_order", [False, True])
def test_conv4_with_per_step_norm(first_order):
    model = models.conv4(in_channels=1, num_classes=3, hidden=4, image_size=16, per_step_norm=3).double()
    assert sum(isinstance(m, PerStepBatchNorm2d) for m in model.modules()) == 4
    assert model[1].weight.shape == (3, 4)
    batch = classification_batch()
    outs = {}
    for vectorize in (True, False):
        opt = MetaOptimizer(copy.deepcopy(model), F.cross_entropy, tableau="maml(2)", inner_lr=0.1,
                            first_order=first_order, vectorize=vectorize)
        outs[vectorize] = (opt.compute(batch).direction.clone(), opt.evaluate(batch, steps=(1, 4)).losses)
    assert_close(outs[True][0], outs[False][0], rtol=1e-9)
    assert_close(outs[True][1], outs[False][1], rtol=1e-10)
