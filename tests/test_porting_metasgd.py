"""Porting a learn2learn Meta-SGD script (docs/porting.md, "From learn2learn's MetaSGD").

learn2learn 0.2.0 does not import on the Pythons rkfast is tested with, so its ``MetaSGD`` is transcribed here
as its source computes it: one learned rate per parameter element, initialized at ``lr`` (learn2learn's
default 1.0), ``clone()`` + ``adapt(loss)`` as ``p - lrs_p * grad_p`` with the graph kept (second order), the
query losses' gradients accumulated over the tasks and divided by T, then one optimizer over the model's
parameters AND the rates. rkfast's port is ``rates=Rates("element")``; the conventions that differ are the ones
docs/porting.md lists: the rates' ``[sets]`` dimension and their weight decay (0 in rkfast's param group).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import rkfast
from helpers import regression_batch

DTYPE = torch.float64
TASKS, FAST_LR, META_LR, STEPS = 4, 0.05, 1e-2, 3


class TranscribedMetaSGD:
    """learn2learn's ``MetaSGD(model, lr)``: the model and a ``ParameterList`` of per-element rates."""

    def __init__(self, model: nn.Module, lr: float = 1.0) -> None:
        self.module = model
        self.lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in model.parameters()])

    def parameters(self):
        yield from self.module.parameters()
        yield from self.lrs

    def adapted(self, support_x: torch.Tensor, support_y: torch.Tensor) -> dict[str, torch.Tensor]:
        """``learner = meta.clone(); learner.adapt(loss(learner(x), y))``: the adapted parameters."""
        names, params = zip(*self.module.named_parameters(), strict=True)
        loss = F.mse_loss(self.module(support_x), support_y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return {n: p - lr * g for n, p, lr, g in zip(names, params, self.lrs, grads, strict=True)}


def l2l_iteration(meta: TranscribedMetaSGD, opt: torch.optim.Optimizer, batch: rkfast.TaskBatch) -> None:
    """One iteration of the learn2learn example loop, as its scripts write it."""
    opt.zero_grad()
    for t in range(TASKS):
        fast = meta.adapted(batch.support_x[t], batch.support_y[t])
        evaluation_error = F.mse_loss(functional_call(meta.module, fast, (batch.query_x[t],)), batch.query_y[t])
        evaluation_error.backward()
    for p in meta.parameters():
        p.grad.data.mul_(1.0 / TASKS)  # the mean over tasks
    opt.step()


def ported(model: nn.Module, weight_decay: float) -> rkfast.MetaOptimizer:
    """The rkfast port (docs/porting.md): MAML's tableau with element rates starting at the same value."""
    opt = rkfast.MetaOptimizer(model, F.mse_loss, tableau="maml", inner_lr=FAST_LR, rates=rkfast.Rates("element"),
                               outer="adamw", lr=META_LR, weight_decay=weight_decay)
    return opt


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_metasgd_port_follows_learn2learn(weight_decay: float) -> None:
    torch.manual_seed(0)
    model = rkfast.models.sinusoid_mlp().to(DTYPE)
    meta = TranscribedMetaSGD(copy.deepcopy(model), lr=FAST_LR)
    l2l_opt = torch.optim.AdamW(meta.parameters(), META_LR, weight_decay=weight_decay)
    opt = ported(model, weight_decay)
    opt.param_groups[-1]["weight_decay"] = weight_decay  # learn2learn decays the rates too (rkfast: 0)
    for _ in range(STEPS):
        batch = regression_batch(tasks=TASKS, shots=10, query=10, dtype=DTYPE)
        l2l_iteration(meta, l2l_opt, batch)
        opt.step(batch)
    theirs = torch.cat([p.detach().reshape(-1) for p in meta.module.parameters()])
    torch.testing.assert_close(opt.meta_parameters(), theirs, rtol=1e-12, atol=1e-14)
    rates = opt.rates.values()  # {name: [sets, *shape]}: one set without per-stage rates
    for (name, _), lr in zip(meta.module.named_parameters(), meta.lrs, strict=True):
        torch.testing.assert_close(rates[name][0], lr.detach(), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(meta.lrs[0].detach(), torch.full_like(meta.lrs[0], FAST_LR))  # the rates moved


def test_rates_are_not_decayed_unless_asked() -> None:
    """Under AdamW(weight_decay > 0) learn2learn decays its rates with everything else; rkfast's rates have
    their own param group with weight_decay=0, so the two part unless the port sets it (docs/porting.md)."""
    torch.manual_seed(0)
    model = rkfast.models.sinusoid_mlp().to(DTYPE)
    meta = TranscribedMetaSGD(copy.deepcopy(model), lr=FAST_LR)
    l2l_opt = torch.optim.AdamW(meta.parameters(), META_LR, weight_decay=0.1)
    opt = ported(model, 0.1)
    assert opt.param_groups[-1]["weight_decay"] == 0.0
    for _ in range(STEPS):
        batch = regression_batch(tasks=TASKS, shots=10, query=10, dtype=DTYPE)
        l2l_iteration(meta, l2l_opt, batch)
        opt.step(batch)
    gap = (opt.rates.values()["0.weight"][0] - meta.lrs[0].detach()).abs().max()
    assert gap > 1e-7
