"""Whole-step CUDA-graph capture (``capture=``) and the eager path's buffer reuse.

The CUDA graph itself needs a GPU (those tests run through benchmarks/gpu_check.sh on a lent machine); on
CPU the capture's state machine (warm-up, capture, replay, shape changes, the on-device skip of a
non-finite step) runs with the graph replaced by an eager stand-in that keeps its semantics: a captured
region records without running, and each replay runs the recorded step on the static input buffers.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import regression_batch, smooth_mlp
from rkfast import LearnedTableau, MetaOptimizer, NonFiniteLossError, Rates, TaskBatch
from rkfast.capture import CaptureShapeError, StepCapture
from rkfast.outer import state_tensors

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/gpu_check.sh)")


class EagerStandIn(StepCapture):
    """StepCapture with the CUDA parts replaced: capture records the step, replay runs it on the statics."""

    requires_cuda = False  # runs on the CPU

    def _warm(self, step, batch):
        return step(batch)

    def _capture(self, step, batch):
        self.static_batch = TaskBatch(*(t.clone() for t in batch))
        self.recorded = step
        self.graph = object()  # "captured"
        self.captures += 1

    def _replay(self, batch):
        for static, new in zip(self.static_batch, batch):
            static.copy_(new)
        self.replays = getattr(self, "replays", 0) + 1
        return self.recorded(self.static_batch)


def stand_in_optimizer(mode, **kwargs) -> tuple[MetaOptimizer, EagerStandIn]:
    """A MetaOptimizer whose capture engine is the stand-in (the constructor's capture= seam) and the engine."""
    engine = EagerStandIn(mode)
    kwargs = {"tableau": "heun", **kwargs}
    return MetaOptimizer(smooth_mlp(), F.mse_loss, inner_lr=0.1, lr=1e-2, capture=engine, **kwargs), engine


@pytest.mark.parametrize("outer", ["adam", "sgd"])
def test_captured_state_machine_matches_eager_steps(outer):
    torch.manual_seed(1)
    batches = [regression_batch() for _ in range(5)]
    eager = MetaOptimizer(smooth_mlp(), F.mse_loss, tableau="heun", inner_lr=0.1, lr=1e-2, outer=outer)
    captured, engine = stand_in_optimizer(True, outer=outer)
    captured.load_state_dict(copy.deepcopy(eager.state_dict()))  # (torch aliases uncast state tensors)
    with torch.no_grad():
        captured.flat_parameters.copy_(eager.flat_parameters)
    for b in batches:
        e, c = eager.step(b), captured.step(b)
        torch.testing.assert_close(c.loss, e.loss)
    torch.testing.assert_close(captured.flat_parameters, eager.flat_parameters, rtol=1e-12, atol=1e-14)
    assert engine.captures == 1 and engine.replays == 3  # 2 warm-up steps, then replays
    assert int(captured.skipped_steps) == 0
    grads = torch.cat([p.grad.reshape(-1) for p in captured.model.parameters()])
    torch.testing.assert_close(grads, torch.cat([p.grad.reshape(-1) for p in eager.model.parameters()]))


def test_shape_change_raises_with_capture_true_and_recaptures_with_auto():
    (strict, _), (auto, auto_engine) = stand_in_optimizer(True), stand_in_optimizer("auto")
    for _ in range(3):
        strict.step(regression_batch(tasks=3))
        auto.step(regression_batch(tasks=3))
    before = strict.meta_parameters()
    with pytest.raises(CaptureShapeError, match=r"support_x\[3, 5, 1\].*got support_x\[4, 5, 1\]"):
        strict.step(regression_batch(tasks=4))
    assert torch.equal(strict.meta_parameters(), before)  # raised before anything changed

    reference = MetaOptimizer(smooth_mlp(), F.mse_loss, tableau="heun", inner_lr=0.1, lr=1e-2)
    reference.load_state_dict(copy.deepcopy(auto.state_dict()))  # (torch aliases uncast state tensors)
    with torch.no_grad():
        reference.flat_parameters.copy_(auto.flat_parameters)
    for _ in range(4):
        b = regression_batch(tasks=4)
        auto.step(b)
        reference.step(b)
    assert auto_engine.captures == 2
    torch.testing.assert_close(auto.flat_parameters, reference.flat_parameters, rtol=1e-12, atol=1e-14)


def test_a_non_finite_replayed_step_is_skipped_on_the_device():
    opt, _ = stand_in_optimizer(True)
    for _ in range(3):
        opt.step(regression_batch())
    params = opt.meta_parameters()
    state = {k: v.clone() for k, v in opt.state[next(opt.model.parameters())].items()}
    bad = regression_batch()
    bad.query_y[0, 0] = float("nan")
    out = opt.step(bad)  # a replay: no exception, no host sync
    assert torch.isnan(out.loss)
    assert int(opt.skipped_steps) == 1
    assert torch.equal(opt.meta_parameters(), params)
    for k, v in opt.state[next(opt.model.parameters())].items():
        assert torch.equal(v, state[k]), k
    opt.step(regression_batch())
    assert int(opt.skipped_steps) == 1 and not torch.equal(opt.meta_parameters(), params)


def test_a_failed_warm_up_step_does_not_count():
    opt, engine = stand_in_optimizer(True)
    bad = regression_batch()
    bad.query_y[0, 0] = float("nan")
    for _ in range(3):  # eager warm-ups raise; none of them counts towards the capture
        with pytest.raises(NonFiniteLossError):
            opt.step(bad)
    assert engine.warm == 0 and engine.graph is None and engine.signature is None and not opt.state
    opt.step(regression_batch())
    assert engine.warm == 1 and engine.graph is None  # still warming up: Adam's state exists only now
    opt.step(regression_batch())
    opt.step(regression_batch())
    assert engine.captures == 1


RATES = dict(rates=Rates("element", per_stage=True, frozen={"0.bias": 0.0}, lr=3e-3))


def _captured_against_eager(seed: int, **kwargs):
    """Five steps of a stand-in-captured and an eager MetaOptimizer from the same state (the optimizers
    returned after checking that every step's loss agrees and one capture and three replays happened)."""
    torch.manual_seed(seed)
    batches = [regression_batch() for _ in range(5)]
    eager = MetaOptimizer(smooth_mlp(), F.mse_loss, **{"tableau": "heun", **kwargs}, inner_lr=0.1, lr=1e-2)
    captured, engine = stand_in_optimizer(True, **kwargs)
    captured.load_state_dict(copy.deepcopy(eager.state_dict()))
    with torch.no_grad():
        captured.flat_parameters.copy_(eager.flat_parameters)
    for b in batches:
        e, c = eager.step(b), captured.step(b)
        torch.testing.assert_close(c.loss, e.loss)
    assert engine.captures == 1 and engine.replays == 3
    torch.testing.assert_close(captured.flat_parameters, eager.flat_parameters, rtol=1e-12, atol=1e-14)
    return captured, eager


@pytest.mark.parametrize("first_order", [False, True])
def test_captured_learned_rates_match_eager_steps(first_order):
    """Learned inner rates are part of the captured step: their direction, .grad and outer update."""
    captured, eager = _captured_against_eager(2, first_order=first_order, **RATES)
    (r_c,), (r_e,) = captured.rates.tensors, eager.rates.tensors
    torch.testing.assert_close(r_c, r_e, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r_c.grad, r_e.grad, rtol=1e-12, atol=1e-14)
    assert not torch.equal(r_c.detach(), torch.full_like(r_c, 0.1))  # the rates did move


@pytest.mark.parametrize("weights", ["fixed", "order"])
def test_captured_learned_tableau_matches_eager_steps(weights):
    """A learned tableau (second order) is part of the captured step too."""
    captured, eager = _captured_against_eager(3, tableau=LearnedTableau("heun", "pattern", weights, lr=3e-3),
                                              rates=Rates("tensor"))
    (a_c,), (a_e,) = captured.learned_tableau.tensors, eager.learned_tableau.tensors
    torch.testing.assert_close(a_c, a_e, rtol=1e-12, atol=1e-14)
    assert float(a_c.detach()) != 1.0


def test_a_skipped_replayed_step_keeps_the_learned_rates_and_their_state():
    opt, _ = stand_in_optimizer(True, **RATES)
    for _ in range(3):
        opt.step(regression_batch())
    (rates,) = opt.rates.tensors
    values = rates.detach().clone()
    state = {k: v.clone() for k, v in opt.state[rates].items()}
    bad = regression_batch()
    bad.query_y[0, 0] = float("nan")
    opt.step(bad)
    assert int(opt.skipped_steps) == 1
    assert torch.equal(rates.detach(), values)
    for k, v in opt.state[rates].items():
        assert torch.equal(v, state[k]), k
    opt.step(regression_batch())
    assert not torch.equal(rates.detach(), values)


def test_capture_needs_cuda_and_a_valid_mode():
    with pytest.raises(RuntimeError, match="needs CUDA parameters; the meta-parameters are on cpu"):
        MetaOptimizer(smooth_mlp(), F.mse_loss, capture=True)
    with pytest.raises(ValueError, match="capture must be False, True or 'auto'"):
        MetaOptimizer(smooth_mlp(), F.mse_loss, capture="always")
    assert MetaOptimizer(smooth_mlp(), F.mse_loss).skipped_steps is None
    for mode in (False, "always", 1):
        with pytest.raises(ValueError, match="StepCapture mode must be True or 'auto'"):
            StepCapture(mode)
    assert StepCapture().mode is True and StepCapture("auto", warmup_steps=3).warmup_steps == 3


# -- the eager path reuses its buffers -------------------------------------------------------------------


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some torch objects warns about deprecated aliases
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("tableau", ["maml", "rk4"])
def test_eager_steps_do_not_accumulate_tensors(tableau, first_order):
    opt = MetaOptimizer(smooth_mlp(), F.mse_loss, tableau=tableau, inner_lr=0.1, first_order=first_order)
    batches = [regression_batch() for _ in range(23)]
    for b in batches[:3]:
        opt.step(b)
    before = _live_tensors()
    for b in batches[3:]:
        opt.step(b)
    assert _live_tensors() == before


def test_first_order_steps_write_into_the_same_buffers():
    opt = MetaOptimizer(smooth_mlp(), F.mse_loss, tableau="rk4", inner_lr=0.1, first_order=True)
    first = opt.step(regression_batch()).direction
    address = first.data_ptr()
    second = opt.step(regression_batch()).direction
    assert second.data_ptr() == address  # the meta-direction buffer is allocated once per shape
    grad_address = next(opt.model.parameters()).grad.data_ptr()
    opt.step(regression_batch())
    assert next(opt.model.parameters()).grad.data_ptr() == grad_address


# -- on a GPU ----------------------------------------------------------------------------------------------


def _cuda_pair(tableau="rk4", outer="adam", lr=1e-3, hidden=32, capture=True, **kwargs):
    """A captured and an eager MetaOptimizer on twin models (the eager Adam made capturable too, so both
    run the same Adam implementation), and the capture engine."""
    torch.manual_seed(0)
    model = smooth_mlp(hidden=hidden, dtype=torch.float32).cuda()
    twin = smooth_mlp(hidden=hidden, dtype=torch.float32).cuda()
    twin.load_state_dict(model.state_dict())
    common = dict(tableau=tableau, inner_lr=0.05, outer=outer, lr=lr, **kwargs)
    engine = StepCapture(capture)
    captured = MetaOptimizer(model, F.mse_loss, capture=engine, **common)
    eager = MetaOptimizer(twin, F.mse_loss, **common, **({"capturable": True} if outer == "adam" else {}))
    return captured, eager, engine


def _cuda_batch(tasks=8):
    return TaskBatch(*(t.float().cuda() for t in regression_batch(tasks=tasks)))


def _five_steps_agree(captured, eager, engine) -> None:
    """Five steps of the captured and the eager optimizer on the same batches: every loss and the final
    parameters agree, and one graph was captured."""
    for _ in range(5):
        b = _cuda_batch()
        c, e = captured.step(b), eager.step(b)
        torch.testing.assert_close(c.loss, e.loss, rtol=1e-5, atol=1e-6)
    assert engine.captures == 1
    torch.testing.assert_close(captured.flat_parameters, eager.flat_parameters, rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize("first_order", [False, True])
def test_captured_steps_equal_eager_steps_on_cuda(first_order):
    captured, eager, engine = _cuda_pair(first_order=first_order)
    _five_steps_agree(captured, eager, engine)


@cuda
@pytest.mark.parametrize("first_order", [False, True])
def test_cuda_captured_learned_rates_equal_eager_steps(first_order):
    captured, eager, engine = _cuda_pair(first_order=first_order,
                                         rates=Rates("element", per_stage=True, frozen={"0.bias": 0.0}))
    _five_steps_agree(captured, eager, engine)
    torch.testing.assert_close(captured.rates.tensors[0], eager.rates.tensors[0], rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize("tableau, weights", [("heun", "order"), ("rk4", "order"), ("rk4", "fixed"), ("kutta3", "order")])
def test_cuda_captured_learned_tableau_equals_eager_steps(tableau, weights):
    captured, eager, engine = _cuda_pair(tableau=LearnedTableau(tableau, "pattern", weights, lr=1e-2),
                                         rates=Rates("tensor"))
    start = captured.learned_tableau.tensor.detach().clone()
    _five_steps_agree(captured, eager, engine)
    torch.testing.assert_close(captured.learned_tableau.tensor, eager.learned_tableau.tensor, rtol=1e-5, atol=1e-6)
    assert not torch.equal(captured.learned_tableau.tensor.detach(), start)  # the entries did move


@cuda
def test_cuda_captured_step_with_a_singular_learned_tableau_is_skipped():
    captured, _, _ = _cuda_pair(tableau=LearnedTableau("heun", "pattern", "order"))
    for _ in range(4):  # warm-ups, the capture, a replay
        captured.step(_cuda_batch())
    before = captured.flat_parameters.clone()
    with torch.no_grad():
        captured.learned_tableau.tensor.zero_()  # c2 = 0: no b satisfies the order conditions
    captured.step(_cuda_batch())  # a replay: no host check, the non-finite loss skips the step on the device
    assert int(captured.skipped_steps) == 1
    torch.testing.assert_close(captured.flat_parameters, before, rtol=0, atol=0)


@cuda
def test_cuda_shape_change_and_auto_recapture():
    captured, _, _ = _cuda_pair()
    for _ in range(3):
        captured.step(_cuda_batch())
    with pytest.raises(CaptureShapeError):
        captured.step(_cuda_batch(tasks=5))
    auto, eager, engine = _cuda_pair(capture="auto")
    for tasks in (8, 8, 8, 5, 5, 5, 5):
        b = _cuda_batch(tasks)
        auto.step(b)
        eager.step(b)
    assert engine.captures == 2
    torch.testing.assert_close(auto.flat_parameters, eager.flat_parameters, rtol=1e-5, atol=1e-6)


@cuda
def test_cuda_eager_memory_is_stable():
    _, eager, _ = _cuda_pair()
    for _ in range(3):
        eager.step(_cuda_batch())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    allocated = torch.cuda.memory_allocated()
    for _ in range(20):
        eager.step(_cuda_batch())
    torch.cuda.synchronize()
    peak_first = torch.cuda.max_memory_allocated()
    assert torch.cuda.memory_allocated() <= allocated + 1024  # nothing accumulates across steps
    for _ in range(20):
        eager.step(_cuda_batch())
    assert torch.cuda.max_memory_allocated() == peak_first


@cuda
def test_cuda_replayed_non_finite_step_is_skipped_on_the_device():
    captured, _, _ = _cuda_pair()
    for _ in range(4):  # two eager warm-ups, the capture, one replay
        captured.step(_cuda_batch())
    before = captured.flat_parameters.clone()
    state_before = [t.clone() for t in state_tensors(captured.outer_optimizer, list(captured.model.parameters()))]
    bad = _cuda_batch()
    bad.query_y[0, 0] = float("nan")
    captured.step(bad)
    assert int(captured.skipped_steps) == 1
    torch.testing.assert_close(captured.flat_parameters, before, rtol=0, atol=0)
    for t, s in zip(state_tensors(captured.outer_optimizer, list(captured.model.parameters())), state_before):
        torch.testing.assert_close(t, s, rtol=0, atol=0)
    captured.step(_cuda_batch())  # and the next good batch updates again
    assert int(captured.skipped_steps) == 1
    assert not torch.equal(captured.flat_parameters, before)


@cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_captured_plain_sgd_equals_eager(backend):
    captured, eager, _ = _cuda_pair(tableau="heun", outer="sgd", lr=1e-2, hidden=16, backend=backend)
    for _ in range(5):
        b = _cuda_batch()
        captured.step(b)
        eager.step(b)
    torch.testing.assert_close(captured.flat_parameters, eager.flat_parameters, rtol=1e-5, atol=1e-6)
