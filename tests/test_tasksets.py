"""MetaOptimizer beyond TaskBatch: general task sets (per-stage data, losses over the model) and the
two-phase ``compute()`` / ``apply()`` step with a user hook in between."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from helpers import flat_theta, regression_batch, smooth_mlp
from rkfast import MetaOptimizer, NonFiniteLossError, TaskBatch, TaskSet
from rkfast.capture import StepCapture
from rkfast.functional import module_task_loss, rk_meta_step


def mse(model, data):
    x, y = data
    return F.mse_loss(model(x), y)


def as_task_set(batch: TaskBatch, loss=mse) -> TaskSet:
    return TaskSet(loss, loss, batch.support, batch.query)


def twins(**kwargs):
    torch.manual_seed(0)
    model = smooth_mlp()
    twin = copy.deepcopy(model)
    return (MetaOptimizer(model, F.mse_loss, **kwargs), MetaOptimizer(twin, F.mse_loss, **kwargs))


# -- task sets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [True, False])
def test_task_set_step_equals_the_task_batch_step(first_order, vectorize):
    a, b = twins(tableau="rk4", inner_lr=0.1, outer="adam", lr=1e-2, first_order=first_order, vectorize=vectorize)
    for _ in range(3):
        batch = regression_batch()
        out_a, out_b = a.step(batch), b.step(as_task_set(batch))
        torch.testing.assert_close(out_b.direction, out_a.direction, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out_b.loss, out_a.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.flat_parameters, a.flat_parameters, rtol=1e-12, atol=1e-14)


def test_per_stage_data_is_made_from_each_stages_own_parameters():
    """As in reinforcement learning: stage j's data exists only once stage j's parameters are known."""
    model, batch, h = smooth_mlp(), regression_batch(tasks=4), 0.2
    layout, theta = flat_theta(model)
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def data(kind, xs):
        def make(stage, params):  # the "rollout": targets that depend on the stage's own model
            seen[kind, stage] = params.clone()
            with torch.no_grad():
                preds = torch.stack([functional_call(model, layout.unflatten(row), (x,)) for row, x in zip(params, xs)])
            return xs, torch.sin(3 * preds)
        return make

    tasks = TaskSet(mse, mse, data("support", batch.support_x), data("query", batch.query_x), num_tasks=4)
    opt = MetaOptimizer(model, None, tableau="maml", inner_lr=h, outer="sgd", lr=0.1)
    out = opt.step(tasks)

    # stage 0 sits at theta for every task; stage 1 at theta - h * (support gradient of that task at theta)
    torch.testing.assert_close(seen["support", 0], theta.expand(4, -1))
    support_0 = data("check", batch.support_x)(0, theta.expand(4, -1))
    expected_1 = []
    for i in range(4):
        row = theta.clone().requires_grad_()
        loss = F.mse_loss(functional_call(model, layout.unflatten(row), (support_0[0][i],)), support_0[1][i])
        (g,) = torch.autograd.grad(loss, row)
        expected_1.append(theta - h * g)
    torch.testing.assert_close(seen["query", 1], torch.stack(expected_1), rtol=1e-12, atol=1e-14)
    # and the step is the functional core's with the same callables
    core_loss = module_task_loss(model, F.mse_loss, layout)
    reference = rk_meta_step(theta, core_loss, core_loss, data("support", batch.support_x),
                             data("query", batch.query_x), "maml", h, num_tasks=4)
    torch.testing.assert_close(out.direction, reference.direction, rtol=1e-12, atol=1e-14)


def test_task_models_run_each_tasks_parameters():
    model = smooth_mlp()
    opt = MetaOptimizer(model, F.mse_loss)
    layout = opt.layout
    params = opt.meta_parameters() + 0.1 * torch.randn(3, layout.numel, dtype=torch.float64)
    x = torch.randn(3, 5, 1, dtype=torch.float64)
    out = opt.task_models(params)(x)
    expected = torch.stack([functional_call(model, layout.unflatten(params[t]), (x[t],)) for t in range(3)])
    torch.testing.assert_close(out, expected)


def test_task_set_evaluation_and_metrics():
    batch = regression_batch()
    opt = MetaOptimizer(smooth_mlp(), F.mse_loss, tableau="heun", inner_lr=0.1)

    def with_metric(model, data):
        x, y = data
        err = model(x) - y
        return (err ** 2).mean(), {"max_error": err.abs().max()}

    by_set = opt.evaluate(as_task_set(batch, with_metric), steps=(1, 3))
    by_batch = opt.evaluate(batch, steps=(1, 3))
    torch.testing.assert_close(by_set.losses, by_batch.losses, rtol=1e-12, atol=1e-14)
    assert by_set.metrics["max_error"].shape == (3, batch.num_tasks)
    assert set(opt.step(as_task_set(batch, with_metric)).stage_metrics["max_error"]) == {1, 2}


def _snapshot(opt):
    return opt.meta_parameters(), [None if p.grad is None else p.grad.clone() for p in opt.model.parameters()], \
        copy.deepcopy(opt.state_dict())


def _assert_same(opt, snap):
    params, grads, state = snap
    assert torch.equal(opt.meta_parameters(), params)
    for p, g in zip(opt.model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    now = opt.state_dict()
    assert now["rkfast"] == state["rkfast"]
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(now["state"][key][name], tensor)


def _bad_task_sets(batch: TaskBatch):
    sx, sy, qx, qy = batch
    yield "must be callable", TaskSet("mse", mse, batch.support, batch.query), TypeError
    yield "task dimension differs", TaskSet(mse, mse, batch.support, (qx[:2], qy[:2])), ValueError
    yield "task dimension \\(dim 0\\) differs between its tensors", TaskSet(mse, mse, (sx, sy[:2]), batch.query), ValueError
    yield "is on meta", TaskSet(mse, mse, (sx.to("meta"), sy), batch.query), RuntimeError
    yield "num_tasks is required", TaskSet(mse, mse, lambda s, p: batch.support, lambda s, p: batch.query), ValueError
    yield "positive integer", TaskSet(mse, mse, batch.support, batch.query, num_tasks=0), TypeError
    nan_y = qy.clone()
    nan_y[0, 0] = float("nan")
    yield "non-finite", TaskSet(mse, mse, batch.support, (qx, nan_y)), NonFiniteLossError


@pytest.mark.parametrize("case", range(7))
def test_bad_task_set_raises_before_anything_changes(case):
    batch = regression_batch()
    opt = MetaOptimizer(smooth_mlp(), F.mse_loss, tableau="rk4", inner_lr=0.1, lr=1e-2)
    opt.step(regression_batch())
    snap = _snapshot(opt)
    message, bad, error = list(_bad_task_sets(batch))[case]
    with pytest.raises(error, match=message):
        opt.step(bad)
    _assert_same(opt, snap)


def test_loss_fn_none_takes_task_sets_only():
    opt = MetaOptimizer(smooth_mlp(), None, outer="sgd", lr=0.1)
    with pytest.raises(TypeError, match="loss_fn=None: give each step a TaskSet"):
        opt.step(regression_batch())
    assert torch.isfinite(opt.step(as_task_set(regression_batch())).loss)


def test_captured_steps_refuse_task_sets():
    class StandIn(StepCapture):
        requires_cuda = False

    opt = MetaOptimizer(smooth_mlp(), F.mse_loss, capture=StandIn(True))
    with pytest.raises(TypeError, match="captured step .* takes TaskBatch"):
        opt.step(as_task_set(regression_batch()))


# -- compute(), a hook, apply() ----------------------------------------------------------------------------


@pytest.mark.parametrize("outer", ["sgd", "adam"])
def test_compute_then_apply_is_step(outer):
    a, b = twins(tableau="ralston", inner_lr=0.1, outer=outer, lr=1e-2)
    for _ in range(3):
        batch = regression_batch()
        before = b.meta_parameters()
        stepped = a.step(batch)
        computed = b.compute(batch)
        assert torch.equal(b.meta_parameters(), before)  # compute does not update
        grads = torch.cat([p.grad.reshape(-1) for p in b.model.parameters()])
        torch.testing.assert_close(grads, computed.direction, rtol=0, atol=0)
        b.apply()
        torch.testing.assert_close(computed.direction, stepped.direction, rtol=0, atol=0)
    assert torch.equal(a.meta_parameters(), b.meta_parameters())


def test_gradient_clipping_between_compute_and_apply():
    model, batch = smooth_mlp(), regression_batch()
    opt = MetaOptimizer(model, F.mse_loss, tableau="heun", inner_lr=0.3, outer="sgd", lr=0.5)
    before = opt.meta_parameters()
    d = opt.compute(batch).direction.clone()
    max_norm = 0.5 * float(d.norm())
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.apply()
    clipped = d * (max_norm / (float(d.norm()) + 1e-6))  # clip_grad_norm_'s own formula
    torch.testing.assert_close(opt.meta_parameters(), before - 0.5 * clipped, rtol=1e-12, atol=1e-14)


def test_apply_takes_replaced_and_unset_grads():
    model, batch = smooth_mlp(), regression_batch()
    opt = MetaOptimizer(model, F.mse_loss, outer="sgd", lr=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.compute(batch)
    params = dict(model.named_parameters())
    first, second = list(params)[:2]
    expected_first = before[first] - 0.5 * (params[first].grad * 3.0)
    params[first].grad = params[first].grad * 3.0  # a new tensor, not the flat buffer's view
    params[second].grad = None  # skipped, as torch optimizers skip it
    others = {n: before[n] - 0.5 * p.grad for n, p in params.items() if n not in (first, second)}
    opt.apply()
    torch.testing.assert_close(params[first].detach(), expected_first, rtol=1e-12, atol=1e-14)
    assert torch.equal(params[second].detach(), before[second])
    for n, value in others.items():
        torch.testing.assert_close(params[n].detach(), value, rtol=1e-12, atol=1e-14)


def test_adam_skips_a_parameter_whose_grad_was_unset():
    model, batch = smooth_mlp(), regression_batch()
    opt = MetaOptimizer(model, F.mse_loss, outer="adam", lr=1e-2)
    head_bias = model[-1].bias
    before = head_bias.detach().clone()
    opt.compute(batch)
    head_bias.grad = None
    opt.apply()
    assert torch.equal(head_bias.detach(), before) and head_bias not in opt.state


def test_apply_refuses_a_non_finite_grad_and_changes_nothing():
    model, batch = smooth_mlp(), regression_batch()
    opt = MetaOptimizer(model, F.mse_loss, outer="adam", lr=1e-2)
    opt.step(batch)
    opt.compute(batch)
    next(model.parameters()).grad[0] = float("inf")
    snap = _snapshot(opt)
    with pytest.raises(NonFiniteLossError, match="non-finite .grad"):
        opt.apply()
    _assert_same(opt, snap)
