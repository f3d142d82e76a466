"""A failed call changes nothing, and a wrong setup is refused.

After any failure of ``step``/``compute``/``apply``/``evaluate`` the parameters, every ``.grad`` (``None``
included) and the serialized optimizer state dict are bit-identical to what they were before
(``snapshot``/``assert_unchanged``), and a later call works. The cases: inference mode and inference
tensors, a non-scalar or detached loss, parameters moved to another dtype, failures inside the outer update,
non-finite learning rates, 0-d parameters, and re-binding parameters that cannot be re-bound.
"""

from __future__ import annotations

import copy
import io
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_unchanged, regression_batch, same_bits, smooth_mlp, snapshot
from rkfast import MetaOptimizer, NonFiniteLossError, TaskBatch, TaskSet, kernels
from rkfast.functional import ParamLayout, module_task_loss, rk_meta_step
from test_capture import EagerStandIn


def trained(outer="adam", steps=1, dtype=torch.float64, **kwargs):
    """A MetaOptimizer after ``steps`` steps (outer state and .grad to protect), and its model."""
    model = smooth_mlp(dtype=dtype)
    opt = MetaOptimizer(model, F.mse_loss, tableau="rk4", inner_lr=0.1, outer=outer, lr=1e-2, **kwargs)
    for _ in range(steps):
        opt.step(regression_batch(dtype=dtype))
    return model, opt


def twin_of(opt: MetaOptimizer, model: nn.Module | None = None, state: dict | None = None, **kwargs) -> MetaOptimizer:
    """An independent MetaOptimizer with the same settings as ``opt``, over a copy of its model (or
    ``model``), with a copy of its state dict (or ``state``) loaded."""
    settings = dict(tableau=opt.tableau, inner_lr=opt.inner_lr, outer=type(opt.outer_optimizer),
                    lr=opt.param_groups[0]["lr"], first_order=opt.first_order, vectorize=opt.vectorize)
    twin = MetaOptimizer(copy.deepcopy(opt.model) if model is None else model, opt.loss_fn, **{**settings, **kwargs})
    twin.load_state_dict(copy.deepcopy(opt.state_dict() if state is None else state))
    return twin


def assert_same_training_state(a: MetaOptimizer, b: MetaOptimizer) -> None:
    assert same_bits(a.flat_parameters, b.flat_parameters)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        assert p.grad is None or same_bits(p.grad, q.grad)
    for sa, sb in zip(a.state_dict()["state"].values(), b.state_dict()["state"].values(), strict=True):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert same_bits(sa[key], sb[key]), key


# -- 1. inference mode and no_grad ---------------------------------------------------------------------


CALLS = {
    "step": lambda opt, batch: opt.step(batch),
    "compute": lambda opt, batch: opt.compute(batch),
    "apply": lambda opt, batch: opt.apply(),
    "evaluate": lambda opt, batch: opt.evaluate(batch, steps=(1,)),
}


@pytest.mark.parametrize("steps_before", [0, 1])
@pytest.mark.parametrize("call", list(CALLS))
def test_inference_mode_is_refused_before_anything_changes(call, steps_before):
    model, opt = trained(steps=steps_before)  # steps_before=0: no Adam state yet, none may be created
    if steps_before == 0:
        opt.compute(regression_batch())  # a .grad for apply
    batch = regression_batch()
    snap = snapshot(model, opt)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=rf"{call}\(\) cannot run under torch\.inference_mode"
                                                                     rf".*Call {call}\(\) outside inference_mode"):
        CALLS[call](opt, batch)
    assert_unchanged(model, opt, snap)
    assert not any(t.is_inference() for s in opt.state.values() for t in s.values())
    opt.step(batch)  # and every later step works


@pytest.mark.parametrize("field", TaskBatch._fields)
def test_inference_tensors_in_a_batch_are_refused(field):
    model, opt = trained()
    batch = regression_batch()
    with torch.inference_mode():
        frozen = batch._replace(**{field: getattr(batch, field) * 1})
    snap = snapshot(model, opt)
    for call in ("step", "compute", "evaluate"):
        message = rf"batch\.{field} is an inference tensor.*outside inference_mode.*\.clone\(\)"
        with pytest.raises(RuntimeError, match=message):
            CALLS[call](opt, frozen)
        assert_unchanged(model, opt, snap)
    opt.step(frozen._replace(**{field: getattr(frozen, field).clone()}))  # cloned outside: an ordinary tensor


def test_inference_tensors_in_a_task_set_are_refused():
    model, opt = trained()
    batch = regression_batch()
    with torch.inference_mode():
        query = tuple(t * 1 for t in batch.query)
    mse = lambda m, data: F.mse_loss(m(data[0]), data[1])  # noqa: E731
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"a tensor of TaskSet\.query_data is an inference tensor"):
        opt.step(TaskSet(mse, mse, batch.support, query))
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [True, False])
def test_no_grad_step_and_evaluate_equal_the_ones_without_it(first_order, vectorize):
    model, opt = trained(first_order=first_order, vectorize=vectorize)
    twin = twin_of(opt)
    batches = [regression_batch() for _ in range(2)]
    for b in batches:
        expected = opt.step(b)
        with torch.no_grad():
            got = twin.step(b)
        assert same_bits(got.direction, expected.direction) and same_bits(got.loss, expected.loss)
    assert_same_training_state(twin, opt)
    with torch.no_grad():
        scores = twin.evaluate(batches[0], steps=(1, 3))
    assert same_bits(scores.losses, opt.evaluate(batches[0], steps=(1, 3)).losses)


# -- 1b. a loss that gives no meta-gradient: refused, nothing changed --------------------------------------


class SwitchableLoss:
    """MSE, or while ``bad`` is set one that cannot be meta-trained on: per element (``reduction='none'``)
    or detached from the parameters."""

    def __init__(self) -> None:
        self.bad: str | None = None

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.bad == "non-scalar":
            return F.mse_loss(out, y, reduction="none")
        if self.bad == "detached":
            return F.mse_loss(out, y).detach()
        return F.mse_loss(out, y)


@pytest.mark.parametrize("call", ["step", "compute"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("bad, message", [("non-scalar", r"must be a scalar.*reduction='mean'"),
                                          ("detached", r"does not depend on the parameters.*detach")])
def test_a_non_scalar_or_detached_loss_is_refused_and_changes_nothing(bad, message, vectorize, first_order, call):
    loss = SwitchableLoss()
    model = smooth_mlp()
    opt = MetaOptimizer(model, loss, tableau="rk4", inner_lr=0.1, outer="adam", lr=1e-2, first_order=first_order,
                        vectorize=vectorize)
    opt.step(regression_batch())  # Adam moments, a step count and .grad: all to keep
    reference = twin_of(opt)
    batch = regression_batch()
    snap = snapshot(model, opt)
    loss.bad = bad
    with pytest.raises(ValueError, match=message):
        CALLS[call](opt, batch)
    assert_unchanged(model, opt, snap)
    loss.bad = None  # and training goes on as if the refused call never happened
    opt.step(batch)
    reference.step(batch)
    assert_same_training_state(opt, reference)


# -- 2. parameters moved to another dtype: the outer state follows -----------------------------------------


def cast_by_hand(opt: MetaOptimizer, dtype: torch.dtype) -> MetaOptimizer:
    """A twin of ``opt`` on a ``dtype`` copy of its model, its outer state cast tensor by tensor (Adam's
    ``step`` stays the float32 tensor torch keeps for fused optimizers and as it is for the others)."""
    state = copy.deepcopy(opt.state_dict())
    for entries in state["state"].values():
        for key, value in entries.items():
            if key != "step":
                entries[key] = value.to(dtype)
    return twin_of(opt, model=copy.deepcopy(opt.model).to(dtype), state=state)


@pytest.mark.parametrize("outer, kwargs", [("adam", {}), ("sgd", {"momentum": 0.9}), ("adam", {"foreach": True})])
def test_outer_state_is_cast_when_the_model_changes_dtype(outer, kwargs):
    model, opt = trained(outer, steps=2, dtype=torch.float32, **kwargs)
    for dtype in (torch.float64, torch.float32):  # there and back
        reference = cast_by_hand(opt, dtype)
        model.to(dtype)
        batch = regression_batch(dtype=dtype)
        opt.step(batch)
        reference.step(batch)
        assert opt.dtype == dtype and opt.flat_parameters.dtype == dtype
        assert_same_training_state(opt, reference)
        for entries in opt.state.values():
            for key, value in entries.items():
                assert value.dtype == (torch.float32 if key == "step" else dtype), key


def test_a_bad_batch_after_model_to_is_refused_before_the_rebind():
    model, opt = trained("adam", dtype=torch.float32)
    model.to(torch.float64)
    snap = snapshot(model, opt)  # the parameters are float64 now, the outer state still float32
    with pytest.raises(TypeError, match="dtype torch.float32 but the model's parameters are torch.float64"):
        opt.step(regression_batch(dtype=torch.float32))
    assert_unchanged(model, opt, snap)
    opt.step(regression_batch())


# -- 3. a failure inside the outer update is undone ----------------------------------------------------------


class FailingAdam(torch.optim.Adam):
    """Adam whose step, while ``armed``, updates (parameters, moments, a new state entry, a replaced state
    tensor, a param-group setting) and then raises, as an optimizer failing half-way would."""

    armed = False

    def step(self, closure=None):
        super().step(closure)
        if not self.armed:
            return None
        for p, entries in self.state.items():
            entries["exp_avg"].add_(1.0)
            entries["exp_avg_sq"] = entries["exp_avg_sq"] * 2  # replaced, not written in place
            entries["extra"] = torch.ones(())
            p.data.add_(1.0)
        self.param_groups[0]["eps"] = 0.5
        raise RuntimeError("injected outer failure")


@pytest.mark.parametrize("steps_before", [0, 2])
def test_a_failing_outer_optimizer_changes_nothing(steps_before):
    model, opt = trained(FailingAdam, steps=steps_before)
    reference = twin_of(opt)
    if steps_before == 0:
        opt.zero_grad()
        reference.zero_grad()
    assert all(p.grad is None for p in model.parameters()) == (steps_before == 0)
    snap = snapshot(model, opt)
    FailingAdam.armed = True
    try:
        with pytest.raises(RuntimeError, match="injected outer failure"):
            opt.step(regression_batch())
    finally:
        FailingAdam.armed = False
    assert_unchanged(model, opt, snap)  # .grad None again at steps_before=0; no Adam state created
    assert len(opt.state) == (0 if steps_before == 0 else len(opt.layout.names))
    assert not any("extra" in s for s in opt.state.values())
    for b in [regression_batch() for _ in range(2)]:  # later steps work, as if the failure never happened
        opt.step(b)
        reference.step(b)
    assert_same_training_state(opt, reference)


def test_a_failing_apply_restores_the_edited_grads():
    model, opt = trained(FailingAdam)
    opt.compute(regression_batch())
    params = list(model.parameters())
    mine = torch.full_like(params[0], 0.5)
    params[0].grad = mine  # a replaced .grad ...
    params[1].grad = None  # ... and an unset one
    snap = snapshot(model, opt)
    FailingAdam.armed = True
    try:
        with pytest.raises(RuntimeError, match="injected outer failure"):
            opt.apply()
    finally:
        FailingAdam.armed = False
    assert_unchanged(model, opt, snap)
    assert params[0].grad is mine and params[1].grad is None
    opt.apply()


def test_a_failing_plain_sgd_update_changes_nothing():
    model, opt = trained("sgd")
    reference = twin_of(opt)
    snap = snapshot(model, opt)

    def axpy_then_fail(x, y, alpha, backend="auto"):
        x.add_(y, alpha=alpha)
        raise RuntimeError("injected kernel failure")

    batch = regression_batch()
    with mock.patch.object(kernels, "axpy_", axpy_then_fail), pytest.raises(RuntimeError, match="injected kernel"):
        opt.step(batch)
    assert_unchanged(model, opt, snap)
    opt.step(batch)
    reference.step(batch)
    assert_same_training_state(opt, reference)


class NanRefusingSGD(torch.optim.SGD):
    """An optimizer that checks the gradient itself (and modifies nothing first)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    raise ValueError("NaN gradient")
        return super().step(closure)


def test_an_optimizer_refusing_a_non_finite_direction_still_raises_non_finite_loss_error():
    model, opt = trained(NanRefusingSGD)
    bad = regression_batch()
    bad.query_y[0, 0] = float("nan")
    snap = snapshot(model, opt)
    with pytest.raises(NonFiniteLossError, match="non-finite meta-loss") as info:
        opt.step(bad)
    assert isinstance(info.value.__cause__, ValueError)
    assert_unchanged(model, opt, snap)


# -- 4. non-finite learning rates -------------------------------------------------------------------------


@pytest.mark.parametrize("outer, kwargs", [("sgd", {}), ("sgd", {"momentum": 0.9}), ("adam", {}), ("adamw", {})])
@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_a_non_finite_lr_set_later_is_caught_after_the_update_and_undone(outer, kwargs, lr):
    model, opt = trained(outer, steps=2, **kwargs)
    good = opt.param_groups[0]["lr"]
    reference = twin_of(opt, **kwargs)
    opt.param_groups[0]["lr"] = lr  # e.g. a scheduler gone wrong
    snap = snapshot(model, opt)
    batch = regression_batch()
    name = type(opt.outer_optimizer).__name__
    with pytest.raises(NonFiniteLossError, match=rf"the outer update \({name}, lr={lr}\) produced non-finite "
                                                  "parameters") as info:
        opt.step(batch)
    assert "inner_lr" not in str(info.value) and "meta-loss" not in str(info.value)
    assert_unchanged(model, opt, snap)
    opt.compute(batch)
    with pytest.raises(NonFiniteLossError, match="outer update"):
        opt.apply()
    opt.param_groups[0]["lr"] = good
    opt.step(batch)
    reference.step(batch)
    assert_same_training_state(opt, reference)


def test_non_finite_direction_and_non_finite_update_have_their_own_messages():
    model, opt = trained("sgd")
    bad = regression_batch()
    bad.support_y[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="non-finite meta-loss .* or meta-direction"):
        opt.step(bad)
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite meta-loss"):  # both wrong: the direction is named
        opt.step(bad)


@pytest.mark.parametrize("outer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -1.0])
def test_a_bad_lr_is_refused_at_construction(outer, lr):
    with pytest.raises(ValueError, match=r"^lr must be a finite, non-negative number"):
        MetaOptimizer(smooth_mlp(), F.mse_loss, outer=outer, lr=lr)
    model = smooth_mlp()
    groups = [{"params": list(model[0].parameters()), "lr": lr}, {"params": list(model[2].parameters())}]
    with pytest.raises(ValueError, match=r"lr (of param group 0 )?must be a finite, non-negative number"):
        MetaOptimizer(model, F.mse_loss, outer=outer, params=groups)


def test_a_state_dict_with_a_bad_lr_is_refused():
    model, opt = trained("adam")
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["lr"] = float("nan")
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="lr of param group 0 must be a finite, non-negative number, got nan"):
        opt.load_state_dict(bad)
    assert_unchanged(model, opt, snap)


def test_an_eager_step_synchronizes_with_the_host_once():
    _, opt = trained("adam")
    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in ("__bool__", "item", "__float__", "__int__", "tolist")}

    def counted(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            return originals[name](self, *args, **kwargs)
        return read

    batch = regression_batch()
    with mock.patch.multiple(torch.Tensor, **{name: counted(name) for name in originals}):
        opt.step(batch)
    assert reads == ["__bool__"]


# -- 5. 0-d parameters -------------------------------------------------------------------------------------


class Scaled(nn.Module):
    """A model with a learnable scale: 0-d (``shape=()``) or ``[1]``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = smooth_mlp()
        self.scale = nn.Parameter(torch.full(shape, 1.5, dtype=torch.float64))

    def forward(self, x):
        return self.net(x) * self.scale


def test_layout_unflattens_0d_parameters():
    layout = ParamLayout(("a", "s", "b"), (torch.Size([2]), torch.Size([]), torch.Size([1, 2])))
    views = layout.unflatten(torch.arange(5.0))
    assert views["s"].shape == () and float(views["s"]) == 2.0 and views["b"].shape == (1, 2)
    rows = layout.unflatten(torch.arange(10.0).view(2, 5))
    assert rows["s"].shape == (2,) and rows["s"].tolist() == [2.0, 7.0]
    assert torch.equal(layout.flatten(views), torch.arange(5.0))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [True, False])
def test_0d_parameters_train_like_1_element_ones(first_order, vectorize):
    scalar, vector = Scaled(()), Scaled((1,))
    vector.net.load_state_dict(scalar.net.state_dict())
    settings = dict(tableau="rk4", inner_lr=0.1, lr=1e-2, first_order=first_order, vectorize=vectorize)
    opts = [MetaOptimizer(m, F.mse_loss, **settings) for m in (scalar, vector)]
    batches = [regression_batch() for _ in range(3)]
    layout = ParamLayout.from_module(scalar)
    theta = opts[0].meta_parameters()
    expected = rk_meta_step(theta, *[module_task_loss(scalar, F.mse_loss, layout)] * 2, batches[0].support,
                            batches[0].query, "rk4", 0.1, first_order=first_order, vectorize=vectorize).direction
    for b in batches:
        outs = [opt.step(b) for opt in opts]
        torch.testing.assert_close(outs[0].direction, outs[1].direction, rtol=1e-12, atol=1e-14)
    for entries, twin_entries in zip(opts[0].state.values(), opts[1].state.values(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(entries[key].reshape(-1), twin_entries[key].reshape(-1))
    assert scalar.scale.shape == () and scalar.scale.grad.shape == ()
    torch.testing.assert_close(opts[0].meta_parameters(), opts[1].meta_parameters(), rtol=1e-12, atol=1e-14)
    scores = [opt.evaluate(batches[0], steps=(1, 2)).losses for opt in opts]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-12, atol=1e-14)
    # the first direction is the functional core's
    fresh = MetaOptimizer(Scaled(()), F.mse_loss, **settings)
    with torch.no_grad():
        fresh.flat_parameters.copy_(theta)
    torch.testing.assert_close(fresh.step(batches[0]).direction, expected, rtol=1e-12, atol=1e-14)


def test_0d_parameters_survive_a_state_dict_round_trip():
    model = Scaled(())
    opt = MetaOptimizer(model, F.mse_loss, tableau="heun", inner_lr=0.1, lr=1e-2)
    opt.step(regression_batch())
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = Scaled(())
    resumed.load_state_dict(saved["model"])
    opt2 = MetaOptimizer(resumed, F.mse_loss, tableau="heun", inner_lr=0.1, lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    b = regression_batch()
    opt.step(b)
    opt2.step(b)
    assert_same_training_state(opt, opt2)


# -- 6. parameters that cannot be re-bound, and what depends on the binding -------------------------------


def test_a_parameter_that_changed_shape_is_refused():
    model, opt = trained()
    first = next(model.parameters())
    first.data = torch.zeros(3, 3, dtype=first.dtype)
    snap = snapshot(model, opt)
    for call in ("step", "compute", "apply", "evaluate"):
        with pytest.raises(ValueError, match=r"parameter '0.weight' changed shape from \(8, 1\) to \(3, 3\)"):
            CALLS[call](opt, regression_batch())
        assert_unchanged(model, opt, snap)


def test_parameters_of_mixed_dtypes_are_refused():
    model, opt = trained()
    model[0].float()
    snap = snapshot(model, opt)
    for call in ("step", "apply"):
        with pytest.raises(TypeError, match="one dtype and device"):
            CALLS[call](opt, regression_batch())
        assert_unchanged(model, opt, snap)
    model[0].double()
    opt.step(regression_batch())


def test_a_rebind_inside_inference_mode_stays_trainable():
    model, opt = trained(dtype=torch.float32)
    model.to(torch.float64)
    with torch.inference_mode():
        theta = opt.meta_parameters()  # reading re-binds the flat buffer
    assert theta.dtype == torch.float64
    assert not opt.flat_parameters.is_inference()
    assert not any(t.is_inference() for s in opt.state.values() for t in s.values())
    opt.step(regression_batch())


def test_a_rebind_releases_the_captured_step():
    engine = EagerStandIn(True)
    model = smooth_mlp()
    opt = MetaOptimizer(model, F.mse_loss, tableau="heun", inner_lr=0.1, lr=1e-2, capture=engine)
    for _ in range(3):
        opt.step(regression_batch())
    assert engine.captures == 1
    first = next(model.parameters())
    first.data = first.data.clone()  # new storage: the captured step's buffers are stale
    for _ in range(3):
        opt.step(regression_batch())
    assert engine.captures == 2
