"""Meta-test adaptation with the tableau's own stages (``evaluate(adaptation="stages")``, ``rkfast eval
--adaptation stages``; docs/method.md, "Meta-test"): each step is one RK meta-step's stage points from the
current parameters, from support gradients only, ending at the last stage's point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import regression_batch, smooth_mlp

import rkfast
from rkfast import functional as RF
from rkfast.cli import main
from rkfast.tableau import get_tableau

H = 0.1


def _opt(tableau, **kw):
    kw.setdefault("vectorize", True)
    return rkfast.MetaOptimizer(smooth_mlp(hidden=6), F.mse_loss, tableau=tableau, inner_lr=H, **kw)


def _last_stage_reference(opt, batch, A, rate):
    """Task by task with plain autograd: theta^(j) = theta - sum_l A[j][l] rate(l) k^(l), the last one returned."""
    loss = RF.module_task_loss(opt.model, F.mse_loss, opt.layout)
    theta = opt.meta_parameters()
    out = []
    for i in range(batch.support[0].shape[0]):
        sup = (batch.support[0][i], batch.support[1][i])
        slopes = []
        for j in range(len(A)):
            point = theta.clone()
            for l in range(j):
                if A[j][l] != 0.0:
                    point = point - A[j][l] * rate(l) * slopes[l]
            row = point.detach().requires_grad_()
            (k,) = torch.autograd.grad(loss(row, sup)[0], row)
            slopes.append(k)
        out.append(point)
    return torch.stack(out)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_maml_k_stage_steps_are_k_gradient_steps(k, vectorize):
    opt = _opt(f"maml({k})", vectorize=vectorize)
    batch = regression_batch()
    stages = opt.evaluate(batch, steps=(1, 2), adaptation="stages", keep_params=True)
    plain = opt.evaluate(batch, steps=(k, 2 * k), keep_params=True)
    torch.testing.assert_close(stages.params[1:], plain.params[1:], rtol=0, atol=1e-12)
    torch.testing.assert_close(stages.losses[1:], plain.losses[1:], rtol=0, atol=1e-12)
    assert stages.step_size == H


@pytest.mark.parametrize("tableau", ["rk4", "heun", "midpoint"])
def test_one_stage_step_is_the_last_stage_point(tableau):
    opt = _opt(tableau)
    batch = regression_batch()
    res = opt.evaluate(batch, steps=(1,), adaptation="stages", keep_params=True)
    ref = _last_stage_reference(opt, batch, get_tableau(tableau).A, lambda l: H)
    torch.testing.assert_close(res.params[1], ref, rtol=0, atol=1e-12)
    if tableau == "rk4":  # the last stage reads k3 at the third stage's point: not a plain step of h c_s = h
        plain = opt.evaluate(batch, steps=(1,), keep_params=True)
        assert (plain.params[1] - res.params[1]).abs().max() > 1e-6


def test_learned_tableau_and_rates_adapt_with_their_current_values():
    opt = _opt(rkfast.LearnedTableau("rk4"), rates=rkfast.Rates("element", per_stage=True))
    with torch.no_grad():
        opt.learned_tableau.tensor.add_(0.1 * torch.randn_like(opt.learned_tableau.tensor))
        opt.rates.tensors[0].add_(0.02 * torch.randn_like(opt.rates.tensors[0]))
    batch = regression_batch()
    res = opt.evaluate(batch, steps=(1,), adaptation="stages", keep_params=True)
    vectors = [opt.rates.vector(s).detach() for s in range(opt.rates.sets)]
    ref = _last_stage_reference(opt, batch, opt.current_tableau().A, lambda l: vectors[min(l, len(vectors) - 1)])
    torch.testing.assert_close(res.params[1], ref, rtol=0, atol=1e-12)
    assert res.step_size == 1.0  # the learned rates are the steps


def test_an_unknown_adaptation_is_refused():
    with pytest.raises(ValueError, match="adaptation must be 'gradient' or 'stages'"):
        _opt("rk4").evaluate(regression_batch(), adaptation="rk")


def test_eval_command_adapts_with_the_stages(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "sinusoid", "--tableau", "rk4", "--iterations", "4", "--meta-batch", "2", "--eval-tasks", "4",
                 "--test-tasks", "6", "--quiet", "--out", str(out)]) == 0
    assert main(["eval", str(out), "--adaptation", "stages", "--out", str(tmp_path / "stages.json")]) == 0
    assert main(["eval", str(out), "--out", str(tmp_path / "gradient.json")]) == 0
    stages, gradient = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("stages", "gradient"))
    assert stages["adaptation"] == "stages" and gradient["adaptation"] == "gradient"
    assert stages["test"]["loss"]["0"] == gradient["test"]["loss"]["0"]  # the same tasks, before adaptation
    assert stages["test"]["loss"]["1"] != gradient["test"]["loss"]["1"]
