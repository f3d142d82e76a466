"""MetaOptimizer: the torch.optim contract (groups, state, schedulers), failure atomicity, training."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_unchanged, classification_batch, flat_theta, regression_batch, same_bits, smooth_mlp, snapshot
from rkfast import MetaOptimizer, NonFiniteLossError, TaskBatch, get_tableau, models, tasks
from rkfast.functional import ParamLayout, meta_step


def expected_direction(model, batch, tableau, h, first_order=False):
    _, theta = flat_theta(model)
    return meta_step(model, F.mse_loss, theta, batch, tableau, h, first_order=first_order).direction


@pytest.mark.parametrize("tableau", ["maml", "rk4"])
def test_sgd_outer_is_plain_rk_step(tableau):
    model, batch = smooth_mlp(), regression_batch()
    before = flat_theta(model)[1].clone()
    d = expected_direction(model, batch, tableau, 0.1)
    opt = MetaOptimizer(model, F.mse_loss, tableau=tableau, inner_lr=0.1, outer="sgd", lr=0.5)
    out = opt.step(batch)
    torch.testing.assert_close(out.direction, d, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.meta_parameters(), before - 0.5 * d, rtol=1e-12, atol=1e-14)
    # .grad holds the meta-direction, split per parameter
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(grads, d, rtol=1e-12, atol=1e-14)


def test_adam_outer_matches_torch_adam_on_the_direction():
    model, batch = smooth_mlp(), regression_batch()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    opt = MetaOptimizer(model, F.mse_loss, tableau="heun", inner_lr=0.1, outer="adam", lr=1e-2)
    for _ in range(3):
        d = expected_direction(reference, batch, "heun", 0.1)
        for p, g in zip(reference.parameters(), ParamLayout.from_module(reference).unflatten(d).values()):
            p.grad = g.clone()
        ref_opt.step()
        opt.step(batch)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_first_order_flag():
    model, batch = smooth_mlp(), regression_batch()
    d1 = expected_direction(model, batch, "maml", 0.3, first_order=True)
    opt = MetaOptimizer(model, F.mse_loss, tableau="maml", inner_lr=0.3, outer="sgd", lr=0.1, first_order=True)
    torch.testing.assert_close(opt.step(batch).direction, d1)


def test_custom_outer_class_with_kwargs():
    model, batch = smooth_mlp(), regression_batch()
    opt = MetaOptimizer(model, F.mse_loss, outer=torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.step(batch)
    assert opt.param_groups[0]["momentum"] == 0.9
    assert all("momentum_buffer" in s for s in opt.state.values())


def test_state_dict_round_trip_resumes_identically():
    batches = [regression_batch() for _ in range(6)]
    model = smooth_mlp()
    opt = MetaOptimizer(model, F.mse_loss, tableau="rk4", inner_lr=0.05, lr=1e-2)
    for b in batches[:3]:
        opt.step(b)
    saved_model = copy.deepcopy(model.state_dict())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    for b in batches[3:]:
        opt.step(b)
    expected = [p.detach().clone() for p in model.parameters()]

    resumed = smooth_mlp()
    resumed.load_state_dict(saved_model)
    # built with other settings: the state dict restores the tableau and the inner step too
    opt2 = MetaOptimizer(resumed, F.mse_loss, tableau="maml", inner_lr=0.5, lr=1.0)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    assert opt2.tableau == get_tableau("rk4") and opt2.inner_lr == 0.05
    assert opt2.param_groups[0]["lr"] == 1e-2
    for b in batches[3:]:
        opt2.step(b)
    for p, q in zip(resumed.parameters(), expected):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_foreign_state():
    model = smooth_mlp()
    opt = MetaOptimizer(model, F.mse_loss, outer="adam")
    plain = torch.optim.Adam(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="rkfast"):
        opt.load_state_dict(plain)
    sgd_state = MetaOptimizer(smooth_mlp(), F.mse_loss, outer="sgd").state_dict()
    with pytest.raises(ValueError, match="outer optimizer"):
        opt.load_state_dict(sgd_state)


def test_lr_scheduler_changes_the_outer_lr():
    model, batch = smooth_mlp(), regression_batch()
    opt = MetaOptimizer(model, F.mse_loss, tableau="maml", inner_lr=0.1, outer="sgd", lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    opt.step(batch)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert opt.outer_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    before = opt.meta_parameters()
    d = expected_direction(model, batch, "maml", 0.1)
    opt.step(batch)
    torch.testing.assert_close(opt.meta_parameters(), before - 0.1 * d, rtol=1e-12, atol=1e-14)


def test_scheduler_survives_load_state_dict():
    model, batch = smooth_mlp(), regression_batch()
    opt = MetaOptimizer(model, F.mse_loss, outer="sgd", lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.load_state_dict(opt.state_dict())
    opt.step(batch)
    sched.step()
    assert opt.outer_optimizer.param_groups[0]["lr"] == pytest.approx(0.2)


def test_param_groups_and_subset():
    model, batch = smooth_mlp(), regression_batch()
    head = list(model[-1].parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("4.")]
    frozen = [p.detach().clone() for p in body]
    opt = MetaOptimizer(model, F.mse_loss, outer="sgd", lr=0.1, params=[{"params": head, "lr": 0.3}])
    assert opt.layout.names == ("4.weight", "4.bias")
    opt.step(batch)
    for p, q in zip(body, frozen):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="not parameters of the model"):
        MetaOptimizer(model, F.mse_loss, params=[torch.zeros(3, requires_grad=True)])
    with pytest.raises(RuntimeError, match="after construction"):
        opt.add_param_group({"params": body})


def test_zero_grad():
    model, batch = smooth_mlp(), regression_batch()
    opt = MetaOptimizer(model, F.mse_loss)
    opt.step(batch)
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# -- bad input leaves everything untouched --------------------------------------------------------------


def _bad_batches(batch: TaskBatch):
    sx, sy, qx, qy = batch
    yield "task dimension", TaskBatch(sx, sy, qx[:2], qy[:2]), ValueError
    yield "examples per task", TaskBatch(sx, sy[:, :2], qx, qy), ValueError
    yield "dtype", TaskBatch(sx.float(), sy, qx, qy), TypeError
    yield "on meta", TaskBatch(sx.to("meta"), sy, qx, qy), RuntimeError
    yield "tensor", (sx, sy, qx, "not a tensor"), TypeError
    yield "4-tuple", (sx, sy, qx), TypeError
    nan_y = qy.clone()
    nan_y[1, 0] = float("nan")
    yield "non-finite", TaskBatch(sx, sy, qx, nan_y), NonFiniteLossError
    inf_y = sy.clone()
    inf_y[0, 1] = float("inf")  # only the support set: the adapted stages become non-finite
    yield "non-finite", TaskBatch(sx, inf_y, qx, qy), NonFiniteLossError


@pytest.mark.parametrize("case", range(8))
def test_bad_batch_raises_before_anything_changes(case):
    model, batch = smooth_mlp(), regression_batch()
    opt = MetaOptimizer(model, F.mse_loss, tableau="rk4", inner_lr=0.1, lr=1e-2)
    opt.step(regression_batch())  # some Adam state and .grad to protect
    snap = snapshot(model, opt)
    message, bad, error = list(_bad_batches(batch))[case]
    with pytest.raises(error, match=message):
        opt.step(bad)
    assert_unchanged(model, opt, snap)


def test_constructor_errors():
    model = smooth_mlp()
    with pytest.raises(ValueError, match="unknown tableau"):
        MetaOptimizer(model, F.mse_loss, tableau="rk5")
    with pytest.raises(ValueError, match="unknown outer optimizer"):
        MetaOptimizer(model, F.mse_loss, outer="lbfgs2")
    with pytest.raises(ValueError, match="inner_lr"):
        MetaOptimizer(model, F.mse_loss, inner_lr=float("inf"))
    with pytest.raises(TypeError, match="nn.Module"):
        MetaOptimizer(lambda x: x, F.mse_loss)
    mixed = smooth_mlp()
    mixed[0].float()
    with pytest.raises(TypeError, match="one dtype and device"):
        MetaOptimizer(mixed, F.mse_loss)


# -- evaluation, norms, training ------------------------------------------------------------------------


def test_evaluate_uses_the_tableaus_own_step_and_leaves_parameters():
    model, batch = smooth_mlp(), regression_batch()
    opt = MetaOptimizer(model, F.mse_loss, tableau="ralston", inner_lr=0.3)
    before = opt.meta_parameters()
    scores = opt.evaluate(batch, steps=(1, 5))
    assert scores.step_size == pytest.approx(0.2)
    assert scores.steps == (0, 1, 5) and scores.losses.shape == (3, batch.num_tasks)
    assert torch.equal(opt.meta_parameters(), before)
    assert opt.evaluate(batch, steps=(1,), step_size=0.05).step_size == 0.05


def test_batchnorm_model_keeps_its_running_statistics():
    model = models.conv4(in_channels=1, num_classes=3, hidden=6, image_size=16).double()
    model[1] = nn.BatchNorm2d(6).double()  # tracks running statistics
    opt = MetaOptimizer(model, F.cross_entropy, tableau="heun", inner_lr=0.1)
    assert model[1].running_mean is not None and model[1].track_running_stats
    out = opt.step(classification_batch())
    assert set(out.stage_metrics["accuracy"]) == {1, 2}


def test_short_sinusoid_training_learns():
    """A few hundred meta-steps (seconds) clearly improve the post-adaptation query MSE."""
    torch.manual_seed(0)
    model = models.sinusoid_mlp()
    opt = MetaOptimizer(model, F.mse_loss, tableau="maml", inner_lr=0.01, lr=3e-3)
    test = tasks.SinusoidTasks(shots=10, query_shots=50).sample(200, torch.Generator().manual_seed(7))
    before = opt.evaluate(test, steps=(10,)).losses[-1].mean().item()
    for batch in tasks.SinusoidTasks(shots=10).batches(meta_batch=25, count=400, seed=1):
        opt.step(batch)
    after = opt.evaluate(test, steps=(10,)).losses
    assert after[-1].mean().item() < 0.5 * before
    # adaptation helps the trained model: 10 test steps beat none
    assert after[-1].mean().item() < 0.7 * after[0].mean().item()


# -- flat buffers and kernel backends ---------------------------------------------------------------------


def test_parameters_are_views_into_one_flat_buffer():
    model = smooth_mlp()
    values = [p.detach().clone() for p in model.parameters()]
    ids = [id(p) for p in model.parameters()]
    opt = MetaOptimizer(model, F.mse_loss, outer="sgd", lr=0.1)
    flat = opt.flat_parameters
    assert flat.is_contiguous() and flat.numel() == opt.layout.numel
    for p, v, i, (name, view) in zip(model.parameters(), values, ids, opt.layout.unflatten(flat).items()):
        assert id(p) == i  # the same Parameter objects, now backed by the flat buffer
        assert torch.equal(p, v)
        assert p.data_ptr() == view.data_ptr()
    with torch.no_grad():
        flat.add_(1.0)  # one write reaches every parameter
    for p, v in zip(model.parameters(), values):
        torch.testing.assert_close(p.detach(), v + 1.0)
    # the model's state_dict and a reload still work
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        flat.zero_()
    model.load_state_dict(state)
    torch.testing.assert_close(opt.meta_parameters(), torch.cat([v.reshape(-1) + 1.0 for v in values]))


def test_grads_are_views_into_one_flat_gradient_buffer():
    model, batch = smooth_mlp(), regression_batch()
    opt = MetaOptimizer(model, F.mse_loss, tableau="heun", inner_lr=0.1, outer="adam", lr=1e-2)
    out = opt.step(batch)
    flat_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(flat_grad, out.direction)
    base = next(model.parameters()).grad.untyped_storage().data_ptr()
    assert all(p.grad.untyped_storage().data_ptr() == base for p in model.parameters())


def test_replaced_parameter_storage_is_rebound():
    model, batch = smooth_mlp(), regression_batch()
    opt = MetaOptimizer(model, F.mse_loss, outer="sgd", lr=0.1)
    first = next(model.parameters())
    first.data = torch.full_like(first, 0.25)  # e.g. what model.to(...) does
    d = expected_direction(model, batch, "maml", 0.01)
    before = flat_theta(model)[1].clone()
    opt.step(batch)
    torch.testing.assert_close(opt.meta_parameters(), before - 0.1 * d, rtol=1e-12, atol=1e-14)
    assert torch.equal(first.detach(), opt.layout.unflatten(opt.flat_parameters)[opt.layout.names[0]])


@pytest.mark.parametrize("outer", ["sgd", "adam"])
@pytest.mark.parametrize("first_order", [False, True])
def test_cpp_backend_trains_like_the_torch_backend(outer, first_order):
    batches = [regression_batch(tasks=5) for _ in range(4)]
    results = []
    for backend in ("torch", "cpp"):
        torch.manual_seed(0)
        model = smooth_mlp()
        opt = MetaOptimizer(model, F.mse_loss, tableau="rk4", inner_lr=0.1, outer=outer, lr=0.05,
                            first_order=first_order, backend=backend)
        assert opt.backend == backend
        losses = [opt.step(b).loss for b in batches]
        results.append((opt.meta_parameters(), torch.stack(losses)))
    (p_torch, l_torch), (p_cpp, l_cpp) = results
    torch.testing.assert_close(p_cpp, p_torch, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(l_cpp, l_torch, rtol=1e-6, atol=1e-10)


def test_backend_errors_at_construction():
    with pytest.raises(ValueError, match="unknown kernel backend 'gpu'"):
        MetaOptimizer(smooth_mlp(), F.mse_loss, backend="gpu")
    with pytest.raises(TypeError, match="backend 'cpp' supports float32 and float64"):
        MetaOptimizer(smooth_mlp(dtype=torch.bfloat16), F.mse_loss, backend="cpp")


def test_vectorize_auto_runs_convolutions_task_by_task_on_the_cpu():
    conv = models.conv4(in_channels=1, num_classes=3, hidden=6, image_size=16).double()
    assert MetaOptimizer(conv, F.cross_entropy).vectorize is False  # grouped convolutions are slow on CPUs
    assert MetaOptimizer(smooth_mlp(), F.mse_loss).vectorize is True
    assert MetaOptimizer(conv, F.cross_entropy, vectorize=True).vectorize is True
    assert MetaOptimizer(smooth_mlp(), F.mse_loss, vectorize=False).vectorize is False
    with pytest.raises(ValueError, match="vectorize must be True, False or 'auto'"):
        MetaOptimizer(smooth_mlp(), F.mse_loss, vectorize="yes")
    # both choices compute the same step
    batch = classification_batch()
    twin = copy.deepcopy(conv)
    looped, mapped = MetaOptimizer(conv, F.cross_entropy, lr=1e-2), MetaOptimizer(twin, F.cross_entropy, lr=1e-2,
                                                                                  vectorize=True)
    torch.testing.assert_close(looped.step(batch).direction, mapped.step(batch).direction, rtol=1e-9, atol=1e-12)
