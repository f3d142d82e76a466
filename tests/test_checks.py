"""Inputs that used to give silently wrong results or raw torch errors: each now raises a clear error.

1. losses: a per-task loss that is not a scalar (``reduction='none'``), a loss that does not depend on the
   parameters (``loss.detach()``), targets whose shape differs from the outputs' (``[K]`` against ``[K, 1]``);
2. step arguments: ``inner_lr``/``step_size`` not a finite number > 0, step counts that are not integers;
3. models and losses that cannot run under ``vmap`` (LSTM, GRU, ``.item()``, data-dependent control flow):
   the vmap path says so and points to ``vectorize=False``, which runs them.

Tableau arguments are checked in ``test_tableau.py``.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_unchanged, classification_batch, flat_theta, regression_batch, smooth_mlp, snapshot
from rkfast import MetaOptimizer, Tableau, TaskBatch
from rkfast.functional import adapt, evaluate, meta_step, model_task_loss, rk_meta_step
from rkfast.tableau import InconsistentTableauWarning
from rkfast.taskmap import VmapUnsupportedError

H = 0.1
PATHS = [pytest.param(v, f, id=f"{'vmap' if v else 'loop'}-{'first' if f else 'second'}")
         for v in (True, False) for f in (False, True)]


def regression():
    model, batch = smooth_mlp(), regression_batch()
    return model, batch, flat_theta(model)[1]


# == 1a. the per-task loss must be a scalar ==============================================================


def mse_none(out, y):
    return F.mse_loss(out, y, reduction="none")


@pytest.mark.parametrize(("vectorize", "first_order"), PATHS)
@pytest.mark.parametrize("tableau", ["euler", "maml", "heun"])
def test_non_scalar_loss_is_refused(tableau, vectorize, first_order):
    # euler, first order: the direction used to come out K = 6 times too large (the query gradients of
    # q.sum() over every element); maml: the support gradient of a non-scalar loss
    model, batch, theta = regression()
    with pytest.raises(ValueError, match=r"scalar.*shape \((5|6), 1\) per task.*reduction='mean'"):
        meta_step(model, mse_none, theta, batch, tableau, H, first_order=first_order, vectorize=vectorize)


@pytest.mark.parametrize("vectorize", [True, False])
def test_non_scalar_loss_is_refused_in_adapt(vectorize):
    model, batch, theta = regression()
    with pytest.raises(ValueError, match=r"shape \(6, 1\) per task"):
        evaluate(model, mse_none, theta, batch, H, steps=(1,), vectorize=vectorize)


def test_non_tensor_loss_is_refused():
    model, batch, theta = regression()
    loss = model_task_loss(model, lambda m, data: 1.0)
    with pytest.raises(TypeError, match="0-d tensor"):
        rk_meta_step(theta, loss, loss, (batch.support_x, batch.support_y), (batch.query_x, batch.query_y),
                     "maml", H, vectorize=False)


# == 1b. the loss must depend on the parameters ==========================================================


def detached_mse(out, y):
    return F.mse_loss(out, y).detach()


@pytest.mark.parametrize(("vectorize", "first_order"), PATHS)
@pytest.mark.parametrize("tableau", ["maml", "euler", "heun"])
def test_detached_loss_is_refused(tableau, vectorize, first_order):
    # vmap, second order: used to return a zero direction (the support gradients of torch.func.grad are
    # zeros, and a query loss without grad read as "every b_j == 0"), which Adam would step on
    model, batch, theta = regression()
    with pytest.raises(ValueError, match="does not depend on the parameters.*detach"):
        meta_step(model, detached_mse, theta, batch, tableau, H, first_order=first_order, vectorize=vectorize)


@pytest.mark.parametrize(("vectorize", "first_order"), PATHS)
@pytest.mark.parametrize("which", ["support", "query"])
def test_detached_support_or_query_loss_is_refused(which, vectorize, first_order):
    model, batch, theta = regression()
    good = model_task_loss(model, lambda m, d: F.mse_loss(m(d[0]), d[1]))
    bad = model_task_loss(model, lambda m, d: F.mse_loss(m(d[0]), d[1]).detach())
    support, query = (bad, good) if which == "support" else (good, bad)
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        rk_meta_step(theta, support, query, (batch.support_x, batch.support_y), (batch.query_x, batch.query_y),
                     "maml", H, first_order=first_order, vectorize=vectorize)


@pytest.mark.parametrize(("vectorize", "first_order"), PATHS)
def test_loss_of_another_model_is_refused(vectorize, first_order):
    # the loss calls the original module instead of the model it is given: it has a graph, but not to the row
    model, batch, theta = regression()
    loss = model_task_loss(model, lambda m, d: F.mse_loss(model(d[0]), d[1]))
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        rk_meta_step(theta, loss, loss, (batch.support_x, batch.support_y), (batch.query_x, batch.query_y),
                     "heun", H, first_order=first_order, vectorize=vectorize)


@pytest.mark.parametrize("vectorize", [True, False])
def test_detached_support_loss_is_refused_in_adapt(vectorize):
    model, batch, theta = regression()
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        evaluate(model, detached_mse, theta, batch, H, steps=(1,), vectorize=vectorize)


@pytest.mark.parametrize(("vectorize", "first_order"), PATHS)
def test_all_zero_weights_still_give_a_zero_direction(vectorize, first_order):
    model, batch, theta = regression()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InconsistentTableauWarning)
        zero = Tableau(((0.0, 0.0), (1.0, 0.0)), (0.0, 0.0))
    out = meta_step(model, F.mse_loss, theta, batch, zero, H, first_order=first_order, vectorize=vectorize)
    assert torch.equal(out.direction, torch.zeros_like(theta)) and out.loss == 0


# == 1c. outputs and targets of the built-in losses must have matching shapes ===========================


def squeezed_targets(batch: TaskBatch) -> TaskBatch:
    return TaskBatch(batch.support_x, batch.support_y[..., 0], batch.query_x, batch.query_y[..., 0])


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize(
    "loss_fn",
    [F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, nn.MSELoss(), nn.L1Loss(), nn.SmoothL1Loss(),
     nn.HuberLoss(), functools.partial(F.mse_loss, reduction="mean")],
    ids=lambda f: getattr(f, "__name__", None) or type(f).__name__,
)
def test_regression_targets_of_another_shape_are_refused(loss_fn, vectorize):
    # outputs [T, K, 1] against targets [T, K] used to broadcast to [K, K] per task with only torch's warning
    model, batch, theta = regression()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the check comes before torch's broadcasting warning
        with pytest.raises(ValueError, match=r"outputs \(5, 1\) and targets \(5,\) per task.*unsqueeze"):
            meta_step(model, loss_fn, theta, squeezed_targets(batch), "maml", H, vectorize=vectorize)


def test_regression_targets_with_an_extra_dimension_are_refused():
    model, batch, theta = regression()
    wide = TaskBatch(batch.support_x, batch.support_y[..., None], batch.query_x, batch.query_y[..., None])
    with pytest.raises(ValueError, match=r"outputs \(5, 1\) and targets \(5, 1, 1\).*squeeze"):
        meta_step(model, F.mse_loss, theta, wide, "maml", H)


def test_custom_loss_functions_are_left_alone():
    model, batch, theta = regression()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = meta_step(model, lambda o, y: F.mse_loss(o, y), theta, squeezed_targets(batch), "maml", H)
    assert torch.isfinite(out.loss)


def linear_classifier(ways: int = 3, features: int = 4) -> nn.Module:
    return nn.Linear(features, ways).double()


def class_batch(ways: int = 3, features: int = 4) -> TaskBatch:
    return TaskBatch(torch.randn(2, 6, features, dtype=torch.float64), torch.randint(0, ways, (2, 6)),
                     torch.randn(2, 9, features, dtype=torch.float64), torch.randint(0, ways, (2, 9)))


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss(), F.nll_loss],
                         ids=["F.cross_entropy", "nn.CrossEntropyLoss", "F.nll_loss"])
def test_class_index_targets_with_a_trailing_dimension_are_refused(loss_fn, vectorize):
    model, batch = linear_classifier(), class_batch()
    theta = flat_theta(model)[1]
    meta_step(model, loss_fn, theta, batch, "maml", H, vectorize=vectorize)  # [K, C] against [K]: fine
    bad = TaskBatch(batch.support_x, batch.support_y[..., None], batch.query_x, batch.query_y[..., None])
    with pytest.raises(ValueError, match=r"outputs \[K, C\] and targets \[K\].*outputs \(6, 3\) and targets "
                                         r"\(6, 1\) per task.*squeeze"):
        meta_step(model, loss_fn, theta, bad, "maml", H, vectorize=vectorize)


def test_class_probability_targets_must_have_the_outputs_shape():
    model, batch = linear_classifier(), class_batch()
    theta = flat_theta(model)[1]
    probs = TaskBatch(batch.support_x, F.one_hot(batch.support_y, 3).double(),
                      batch.query_x, F.one_hot(batch.query_y, 3).double())
    meta_step(model, F.cross_entropy, theta, probs, "maml", H)
    short = TaskBatch(batch.support_x, probs.support_y[..., :2], batch.query_x, probs.query_y[..., :2])
    with pytest.raises(ValueError, match=r"class-probability targets.*\(6, 3\).*\(6, 2\)"):
        meta_step(model, F.cross_entropy, theta, short, "maml", H)


def test_conv_classifier_targets_still_pass():
    from rkfast import models

    model = models.conv4(in_channels=1, num_classes=3, hidden=4, image_size=16).double()
    theta = flat_theta(model)[1]
    out = meta_step(model, F.cross_entropy, theta, classification_batch(), "maml", H, vectorize=False)
    assert set(out.stage_metrics["accuracy"]) == {2}


# == 2. step arguments ====================================================================================


BAD_STEP_VALUES = [(0, ValueError), (0.0, ValueError), (-0.1, ValueError), (math.nan, ValueError),
                   (math.inf, ValueError), (-math.inf, ValueError), (True, TypeError), ("0.1", TypeError),
                   (None, TypeError)]


@pytest.mark.parametrize(("value", "error"), BAD_STEP_VALUES)
def test_bad_inner_lr_is_refused(value, error):
    model, batch, theta = regression()
    with pytest.raises(error, match="inner_lr"):
        meta_step(model, F.mse_loss, theta, batch, "maml", value)
    with pytest.raises(error, match="inner_lr"):
        MetaOptimizer(model, F.mse_loss, tableau="maml", inner_lr=value)


@pytest.mark.parametrize(("value", "error"), BAD_STEP_VALUES)
def test_bad_step_size_is_refused(value, error):
    model, batch, theta = regression()
    with pytest.raises(error, match="step_size"):
        evaluate(model, F.mse_loss, theta, batch, value, steps=(1,))
    if value is None:  # MetaOptimizer.evaluate: None is the tableau's default step
        return
    opt = MetaOptimizer(model, F.mse_loss, tableau="maml", inner_lr=H)
    opt.step(batch)  # outer state and .grad to keep
    snap = snapshot(model, opt)
    with pytest.raises(error, match="step_size"):
        opt.evaluate(batch, steps=(1,), step_size=value)
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize(
    ("steps", "error"),
    [((1.5,), TypeError), ((1, 2.0), TypeError), (("3",), TypeError), ((True,), TypeError), ("3", TypeError),
     (3, TypeError), (None, TypeError), ((), ValueError), ((0, 1), ValueError), ((-2,), ValueError)],
)
def test_bad_step_counts_are_refused(steps, error):
    model, batch, theta = regression()
    with pytest.raises(error, match="steps"):
        evaluate(model, F.mse_loss, theta, batch, H, steps=steps)
    # and through MetaOptimizer.evaluate, which leaves everything as it was
    opt = MetaOptimizer(model, F.mse_loss, tableau="heun", inner_lr=H)
    opt.step(batch)
    snap = snapshot(model, opt)
    with pytest.raises(error, match="steps"):
        opt.evaluate(batch, steps=steps)
    assert_unchanged(model, opt, snap)


def test_integer_like_step_counts_are_accepted():
    import numpy as np

    model, batch, theta = regression()
    out = evaluate(model, F.mse_loss, theta, batch, H, steps=[np.int64(2), torch.tensor(1), 2])
    assert out.steps == (0, 1, 2)


# == 3. models and losses that cannot run under vmap ======================================================


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(2, 4, batch_first=True)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.out(y[:, -1])


def sequence_batch() -> TaskBatch:
    return TaskBatch(torch.randn(3, 5, 7, 2), torch.randn(3, 5, 1), torch.randn(3, 6, 7, 2), torch.randn(3, 6, 1))


def item_loss(out, y):  # .item() in the loss
    return F.mse_loss(out, y) * (2.0 if out.sum().item() > 0 else 1.0)


def branching_loss(out, y):  # data-dependent Python control flow
    loss = F.mse_loss(out, y)
    if loss > 0:
        return loss
    return 2 * loss


def mlp32():
    return smooth_mlp(dtype=torch.float32)


CANNOT_VMAP = {
    "lstm": (lambda: Recurrent(nn.LSTM), F.mse_loss, sequence_batch),
    "gru": (lambda: Recurrent(nn.GRU), F.mse_loss, sequence_batch),  # reads "output with shape [5, 4] doesn't
    "item": (mlp32, item_loss, lambda: regression_batch(dtype=torch.float32)),  # match the broadcast shape"
    "branch": (mlp32, branching_loss, lambda: regression_batch(dtype=torch.float32)),
}


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("case", list(CANNOT_VMAP))
def test_vmap_limitation_says_vectorize_false(case, first_order):
    make_model, loss_fn, make_batch = CANNOT_VMAP[case]
    model, batch = make_model(), make_batch()
    theta = flat_theta(model)[1]
    with pytest.raises(VmapUnsupportedError, match=r"cannot run under torch\.func\.vmap.*vectorize=False") as info:
        meta_step(model, loss_fn, theta, batch, "maml", H, first_order=first_order, vectorize=True)
    assert isinstance(info.value, RuntimeError)
    cause = info.value.__cause__
    assert isinstance(cause, RuntimeError) and str(cause) in str(info.value)
    with pytest.raises(VmapUnsupportedError, match="vectorize=False"):
        evaluate(model, loss_fn, theta, batch, H, steps=(1,), vectorize=True)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("case", list(CANNOT_VMAP))
def test_vmap_limitation_runs_task_by_task(case, first_order):
    make_model, loss_fn, make_batch = CANNOT_VMAP[case]
    model, batch = make_model(), make_batch()
    opt = MetaOptimizer(model, loss_fn, tableau="maml", inner_lr=H, first_order=first_order, vectorize=False)
    out = opt.step(batch)
    assert torch.isfinite(out.direction).all() and out.direction.abs().sum() > 0
    assert torch.isfinite(opt.evaluate(batch, steps=(1,)).losses).all()


def test_meta_optimizer_vmap_error_names_vectorize_false():
    model, batch = Recurrent(nn.LSTM), sequence_batch()
    opt = MetaOptimizer(model, F.mse_loss, tableau="maml", inner_lr=H, vectorize=True)
    with pytest.raises(VmapUnsupportedError, match=r"MetaOptimizer\(\.\.\., vectorize=False\)"):
        opt.step(batch)


@pytest.mark.parametrize("vectorize", [True, False])
def test_errors_of_the_model_itself_are_not_wrapped(vectorize):
    # a feature count the model does not take fails without vmap too: its own error, unchanged
    model, batch, theta = regression()
    wrong = TaskBatch(torch.randn(3, 5, 2, dtype=torch.float64), batch.support_y, batch.query_x, batch.query_y)
    with pytest.raises(RuntimeError) as info:
        meta_step(model, F.mse_loss, theta, wrong, "maml", H, vectorize=vectorize)
    assert not isinstance(info.value, VmapUnsupportedError)
    assert "vectorize" not in str(info.value) and "shapes cannot be multiplied" in str(info.value)


def test_adapt_with_a_vmap_limitation_in_the_query_loss_only():
    model, batch, theta = regression()
    loss = model_task_loss(model, lambda m, d: F.mse_loss(m(d[0]), d[1]))
    item = model_task_loss(model, lambda m, d: item_loss(m(d[0]), d[1]))
    data = ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y))
    with pytest.raises(VmapUnsupportedError):
        adapt(theta, loss, item, *data, H, steps=(1,))
    assert adapt(theta, loss, item, *data, H, steps=(1,), vectorize=False).losses.shape == (2, 3)
