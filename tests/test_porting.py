"""Porting MAML scripts onto rkfast (docs/porting.md): each peer's meta-training step, written as its example
script writes it, against the same step on a ``MetaOptimizer``.

Peers:

* higher's ``examples/maml-omniglot.py``: ``higher.innerloop_ctx`` + ``diffopt.step`` per task, one
  ``qry_loss.backward()`` per task (the gradients of the T tasks accumulate: a SUM), ``meta_opt.step()``.
* PyTorch's torch.func ``maml_omniglot`` example (``maml-omniglot-transforms.py``): ``grad`` inside,
  ``vmap`` over the tasks, ``qry_losses.sum().backward()`` (a SUM).
* PyTorch's torch.func ``maml_regression`` example (``evjang_transforms_module.py``): the same pattern,
  ``loss2 = sum(inner_losses) / len(inner_losses)`` (a MEAN).

rkfast's meta-loss is the mean over the T tasks, so its meta-direction times T is the summing peers'
gradient; with plain SGD at ``lr * T``, or Adam at ``eps / T`` (Adam ignores the scale of its gradient
except through eps), the parameters follow the peer's. Everything runs in float64 with T = 4 tasks.
"""

from __future__ import annotations

import copy

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import rkfast
from helpers import classification_batch, regression_batch

DTYPE = torch.float64
TASKS = 4  # T, the meta-batch
WAYS = 3
ALPHA = 0.4  # the inner learning rate: higher's inner SGD lr, the examples' step, rkfast's inner_lr
ADAM_EPS = 1e-8  # torch.optim.Adam's default eps, which the peers use
OUTER_STEPS = 3

# Each test asserts agreement to these (float64); what they measure is reported in docs/porting.md.
DIRECTION_RTOL = 1e-13  # max |T d_rkfast - g_peer| / max |g_peer|
PARAMS_RTOL = 1e-13  # max |theta_rkfast - theta_peer| / max |theta_peer| after OUTER_STEPS outer steps
MOVED = 1e-4  # the outer steps must move the parameters by more than this (relative), or nothing was tested


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for these tiny models: with two, torch's OpenMP workers spin-wait between the
    hundreds of small ops of a step, and on a busy 2-core machine this file took 2 minutes instead of 3 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def omniglot_net(batch_norm: bool = True) -> nn.Sequential:
    """The examples' omniglot network (conv 3x3, BatchNorm, ReLU, max-pool 2, ..., linear), shrunk to 4
    channels, two blocks and 10x10 images; the torch.func example's copy has no BatchNorm (see
    test_torch_func_omniglot_direction).

    With BatchNorm the convolutions have no bias: BatchNorm subtracts it again, so its exact gradient is 0
    and the computed one is rounding noise (~1e-16), which Adam divides by its equally tiny running scale
    and turns into visible steps (~1e-10 here) that differ between any two implementations.
    """
    def block(cin: int, cout: int) -> list[nn.Module]:
        norm = [nn.BatchNorm2d(cout, momentum=1, affine=True)] if batch_norm else []
        return [nn.Conv2d(cin, cout, 3, bias=not batch_norm), *norm, nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]

    return nn.Sequential(*block(1, 4), *block(4, 4), nn.Flatten(), nn.Linear(4, WAYS)).to(DTYPE)


def omniglot_batch() -> rkfast.TaskBatch:
    return classification_batch(tasks=TASKS, ways=WAYS, shots=2, query=3, size=10, dtype=DTYPE)


def flat_grad(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()]).clone()


def flat_params(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).clone()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def maml_tableau(steps: int) -> str:
    return "maml" if steps == 1 else f"maml({steps})"


def rkfast_twin(net: nn.Module, steps: int, first_order: bool, outer: str, lr: float, sums: bool = True,
                vectorize="auto", **outer_kwargs) -> rkfast.MetaOptimizer:
    """The port: a MetaOptimizer on a copy of ``net``. A peer that sums its T task losses gets ``lr * T``
    with plain SGD and ``eps / T`` with Adam; a peer that averages them gets its own settings."""
    scale = TASKS if sums else 1
    if outer == "sgd":
        lr = lr * scale
    else:
        outer_kwargs["eps"] = ADAM_EPS / scale
    return rkfast.MetaOptimizer(copy.deepcopy(net), F.cross_entropy, tableau=maml_tableau(steps), inner_lr=ALPHA,
                                outer=outer, lr=lr, first_order=first_order, vectorize=vectorize, **outer_kwargs)


def peer_optimizer(params, outer: str, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr) if outer == "sgd" else torch.optim.Adam(params, lr=lr)


# Every (inner steps, order, task mapping) a direction test covers: 1 and 3 inner steps, second and first
# order, rkfast vmapped and task by task ("auto" runs convolutional models task by task on the CPU).
DIRECTION_CASES = pytest.mark.parametrize("steps, first_order, vectorize", [
    pytest.param(steps, first_order, vectorize,
                 id=f"{steps}-{'first' if first_order else 'second'}-order-{'vmap' if vectorize is True else 'task-by-task'}")
    for steps in (1, 3) for first_order in (False, True) for vectorize in ("auto", True)
])


def assert_direction(peer_step, net, steps, first_order, vectorize) -> None:
    """rkfast's meta-direction x T == the gradient ``peer_step`` (a summing peer) accumulates on one batch."""
    batch = omniglot_batch()
    opt = rkfast_twin(net, steps, first_order, "sgd", 0.0, vectorize=vectorize)
    expected = peer_step(net, torch.optim.SGD(net.parameters(), lr=0.0), batch, steps, first_order)
    out = opt.step(rkfast.TaskBatch(*batch))
    assert rel_err(TASKS * out.direction, expected) <= DIRECTION_RTOL
    assert opt.vectorize is (vectorize is True)


def assert_same_trajectory(peer_step, net, steps, first_order, outer, lr) -> None:
    """OUTER_STEPS steps: the peer with SGD(lr) / Adam(lr) and rkfast with SGD(lr * T) / Adam(lr, eps / T)
    end at the same parameters."""
    start = flat_params(net)
    opt = rkfast_twin(net, steps, first_order, outer, lr)
    meta_opt = peer_optimizer(net.parameters(), outer, lr)
    for _ in range(OUTER_STEPS):
        batch = omniglot_batch()
        peer_step(net, meta_opt, batch, steps, first_order)
        opt.step(rkfast.TaskBatch(*batch))
    assert rel_err(opt.meta_parameters(), flat_params(net)) <= PARAMS_RTOL
    assert rel_err(flat_params(net), start) > MOVED


# -- higher's maml-omniglot.py ----------------------------------------------------------------------------------


def higher_meta_step(net, meta_opt, batch, n_inner_iter, first_order=False, clip=None) -> torch.Tensor:
    """One iteration of higher's maml-omniglot ``train()``, line for line; returns the accumulated gradient.

    First order: higher has no switch for it (``track_higher_grads=False`` also cuts the path to the initial
    weights), so the support gradients are detached in ``diffopt.step``'s ``grad_callback``. ``clip``: a
    ``clip_grad_norm_`` between the backward passes and ``meta_opt.step()``.
    """
    x_spt, y_spt, x_qry, y_qry = batch
    task_num = x_spt.size(0)
    inner_opt = torch.optim.SGD(net.parameters(), lr=ALPHA)
    callback = (lambda grads: [g.detach() for g in grads]) if first_order else None
    meta_opt.zero_grad()
    for i in range(task_num):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(n_inner_iter):
                spt_logits = fnet(x_spt[i])
                spt_loss = F.cross_entropy(spt_logits, y_spt[i])
                diffopt.step(spt_loss, grad_callback=callback)
            qry_logits = fnet(x_qry[i])
            qry_loss = F.cross_entropy(qry_logits, y_qry[i])
            qry_loss.backward()  # accumulates: the gradient of the SUM of the task losses
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    accumulated = flat_grad(net)
    meta_opt.step()
    return accumulated


@DIRECTION_CASES
def test_higher_direction(steps, first_order, vectorize):
    """rkfast's meta-direction x T == higher's accumulated gradient (conv + BatchNorm, MAML's batch statistics)."""
    net = omniglot_net()
    net.train()
    assert_direction(higher_meta_step, net, steps, first_order, vectorize)


@pytest.mark.parametrize("outer, lr", [("sgd", 0.05), ("adam", 1e-2)])
@pytest.mark.parametrize("steps, first_order", [(1, False), (3, False), (3, True)],
                         ids=["maml", "maml(3)", "maml(3)-first-order"])
def test_higher_training_trajectory(steps, first_order, outer, lr):
    net = omniglot_net()
    net.train()
    assert_same_trajectory(higher_meta_step, net, steps, first_order, outer, lr)


def test_higher_clipping_between_gradient_and_update():
    """``clip_grad_norm_`` between backward and step ports to ``opt.compute(); clip_grad_norm_(); opt.apply()``.

    ``.grad`` is multiplied by T first, so that it IS the peer's summed gradient and every setting of the
    script (lr, max_norm) carries over unchanged. (Clipping rkfast's own gradient at ``max_norm / T`` is the
    same only up to the 1e-6 that ``clip_grad_norm_`` adds to the norm.)
    """
    net, lr = omniglot_net(), 0.05
    net.train()
    opt = rkfast_twin(net, 1, False, "sgd", lr, sums=False)
    meta_opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(OUTER_STEPS):
        batch = omniglot_batch()
        out = opt.compute(rkfast.TaskBatch(*batch))
        max_norm = 0.5 * float(TASKS * out.direction.norm())  # half the peer's gradient norm: the clipping acts
        higher_meta_step(net, meta_opt, batch, 1, clip=max_norm)
        torch._foreach_mul_([p.grad for p in opt.model.parameters()], TASKS)
        torch.nn.utils.clip_grad_norm_(opt.model.parameters(), max_norm)
        opt.apply()
    assert rel_err(opt.meta_parameters(), flat_params(net)) <= PARAMS_RTOL


# -- PyTorch's torch.func MAML examples ---------------------------------------------------------------------


def torch_func_loss_for_task(net, params, buffers, n_inner_iter, alpha, loss_fn, first_order=False):
    """The examples' per-task function: ``grad`` of the support loss, ``n_inner_iter`` plain steps, the query
    loss at the adapted parameters. First order (not in the examples): the support gradients detached."""
    def compute_loss(new_params, buffers, x, y):
        logits = functional_call(net, (new_params, buffers), (x,))
        return loss_fn(logits, y)

    def loss_for_task(x_spt, y_spt, x_qry, y_qry):
        new_params = params
        for _ in range(n_inner_iter):
            grads = grad(compute_loss)(new_params, buffers, x_spt, y_spt)
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            new_params = {k: p - grads[k] * alpha for k, p in new_params.items()}
        return compute_loss(new_params, buffers, x_qry, y_qry)

    return loss_for_task


def torch_func_omniglot_step(net, meta_opt, batch, n_inner_iter, first_order=False) -> torch.Tensor:
    """One iteration of the torch.func ``maml-omniglot-transforms.py`` ``train()``: ``vmap`` over the tasks,
    ``qry_losses.sum().backward()``, ``meta_opt.step()``; returns the gradient."""
    params, buffers = dict(net.named_parameters()), dict(net.named_buffers())
    x_spt, y_spt, x_qry, y_qry = batch
    meta_opt.zero_grad()
    loss_for_task = torch_func_loss_for_task(net, params, buffers, n_inner_iter, ALPHA, F.cross_entropy, first_order)
    qry_losses = vmap(loss_for_task)(x_spt, y_spt, x_qry, y_qry)
    qry_losses.sum().backward()  # "Compute the maml loss by summing together the returned losses."
    summed = flat_grad(net)
    meta_opt.step()
    return summed


@DIRECTION_CASES
def test_torch_func_omniglot_direction(steps, first_order, vectorize):
    """rkfast's meta-direction x T == the torch.func example's summed gradient.

    The network is the example's without its BatchNorm layers: under ``vmap``, PyTorch's fused batch-norm
    backward has a wrong batching rule for its own derivative (pytorch/functorch#534), so the example's own
    second-order step through BatchNorm is not the exact meta-gradient (rkfast's is; test_higher_direction).
    """
    assert_direction(torch_func_omniglot_step, omniglot_net(batch_norm=False), steps, first_order, vectorize)


@pytest.mark.parametrize("outer, lr", [("sgd", 0.05), ("adam", 1e-2)])
def test_torch_func_omniglot_training_trajectory(outer, lr):
    assert_same_trajectory(torch_func_omniglot_step, omniglot_net(batch_norm=False), 3, False, outer, lr)


def mse_loss(x, y):
    return torch.mean((x - y) ** 2)


@pytest.mark.parametrize("outer, lr", [("sgd", 0.05), ("adam", 1e-3)])
def test_torch_func_regression_example_averages(outer, lr):
    """The torch.func maml_regression example averages its task losses (``sum(inner_losses) /
    len(inner_losses)``), as rkfast does: its gradient is rkfast's direction and its settings carry over as
    they are (same lr, same eps)."""
    net = rkfast.models.sinusoid_mlp().to(DTYPE)  # the example's ThreeLayerNet: 1-40-40-1, ReLU
    start = flat_params(net)
    alpha = 0.1
    params = dict(net.named_parameters())
    meta_opt = peer_optimizer(params.values(), outer, lr)
    opt = rkfast.MetaOptimizer(copy.deepcopy(net), F.mse_loss, tableau="maml", inner_lr=alpha, outer=outer, lr=lr)
    for _ in range(OUTER_STEPS):
        x1, y1, x2, y2 = task = regression_batch(tasks=TASKS, shots=20, query=20, dtype=DTYPE)
        meta_opt.zero_grad()
        get_loss_for_task = torch_func_loss_for_task(net, params, {}, 1, alpha, mse_loss)
        inner_losses = vmap(get_loss_for_task)(x1, y1, x2, y2)
        loss2 = sum(inner_losses) / len(inner_losses)
        loss2.backward()
        peer_grad = flat_grad(net)
        meta_opt.step()
        out = opt.step(task)
        assert rel_err(out.direction, peer_grad) <= DIRECTION_RTOL
        # float64 losses after steps that drift apart by rounding: 1.5e-13 relative was seen once (of 1e-13 then)
        torch.testing.assert_close(out.loss, loss2.detach(), rtol=1e-12, atol=0)
    assert rel_err(opt.meta_parameters(), flat_params(net)) <= PARAMS_RTOL
    assert rel_err(flat_params(net), start) > MOVED
