"""The command line and the Python API agree on what is valid.

Every value the API refuses (``MetaOptimizer``, its ``evaluate``, ``get_tableau``, ``TrainConfig.resolved``)
the command line refuses too, in one line with exit code 2 and before any training; and what the API
accepts (an outer ``lr`` of 0) the command line accepts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.nn.functional as F

from helpers import assert_unchanged, refused_in_one_line, regression_batch, smooth_mlp, snapshot
from rkfast import MetaOptimizer, get_tableau
from rkfast.cli import main
from rkfast.train import TrainConfig

TINY = ["--iterations", "2", "--eval-every", "0", "--eval-tasks", "2", "--test-tasks", "2", "--meta-batch", "2",
        "--quiet"]


def trained_optimizer(**kwargs):
    model = smooth_mlp()
    opt = MetaOptimizer(model, F.mse_loss, tableau="maml", inner_lr=0.1, lr=1e-2, **kwargs)
    opt.step(regression_batch())
    return model, opt


# -- the inner step h and the meta-test step size: finite and > 0 ---------------------------------------


@pytest.mark.parametrize("text", ["-0.1", "0", "nan", "inf", "-inf"])
def test_inner_lr_is_refused_alike(text: str, tmp_path: Path, capsys) -> None:
    value = float(text)
    with pytest.raises(ValueError, match=r"inner_lr must be a finite number > 0"):
        MetaOptimizer(smooth_mlp(), F.mse_loss, inner_lr=value)
    with pytest.raises(ValueError, match=r"inner_lr must be a finite number > 0"):
        TrainConfig(inner_lr=value).resolved()
    refused_in_one_line(["train", "sinusoid", *TINY, f"--inner-lr={text}", "--out", str(tmp_path / "run")], capsys,
                        "argument --inner-lr: must be a finite number > 0", text)
    refused_in_one_line(["compare", "sinusoid", *TINY, f"--inner-lr={text}", "--out", str(tmp_path / "cmp")], capsys,
                        "--inner-lr")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("text", ["-1", "0", "nan", "inf"])
def test_test_step_is_refused_alike(text: str, tmp_path: Path, capsys) -> None:
    value = float(text)
    model, opt = trained_optimizer()
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"step_size must be a finite number > 0"):
        opt.evaluate(regression_batch(), steps=(1,), step_size=value)
    assert_unchanged(model, opt, snap)
    with pytest.raises(ValueError, match=r"test_step must be a finite number > 0"):
        TrainConfig(test_step=value).resolved()
    refused_in_one_line(["train", "sinusoid", *TINY, f"--test-step={text}", "--out", str(tmp_path / "run")], capsys,
                        "argument --test-step: must be a finite number > 0", text)
    refused_in_one_line(["eval", str(tmp_path / "run"), f"--test-step={text}"], capsys, "argument --test-step")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["0.1", True])
def test_a_step_of_another_type_is_refused_alike(value) -> None:
    # MetaOptimizer raises TypeError; TrainConfig.resolved() the ValueError it documents for any bad setting
    with pytest.raises(TypeError, match="inner_lr must be a number > 0"):
        MetaOptimizer(smooth_mlp(), F.mse_loss, inner_lr=value)
    with pytest.raises(ValueError, match="inner_lr must be a number > 0"):
        TrainConfig(inner_lr=value).resolved()
    with pytest.raises(ValueError, match="lr must be a finite, non-negative number"):
        MetaOptimizer(smooth_mlp(), F.mse_loss, lr="fast")
    with pytest.raises(ValueError, match="lr must be a finite, non-negative number"):
        TrainConfig(lr="fast").resolved()


# -- the outer learning rate: finite and >= 0 everywhere -------------------------------------------------


@pytest.mark.parametrize("text", ["-1", "-0.001", "nan", "inf"])
def test_outer_lr_is_refused_alike(text: str, tmp_path: Path, capsys) -> None:
    value = float(text)
    with pytest.raises(ValueError, match="lr must be a finite, non-negative number"):
        MetaOptimizer(smooth_mlp(), F.mse_loss, lr=value)
    with pytest.raises(ValueError, match="lr must be a finite, non-negative number"):
        TrainConfig(lr=value).resolved()
    refused_in_one_line(["train", "sinusoid", *TINY, f"--lr={text}", "--out", str(tmp_path / "run")], capsys,
                        "argument --lr: must be a finite number >= 0", text)
    assert not any(tmp_path.iterdir())


def test_outer_lr_of_zero_is_accepted_alike(tmp_path: Path, capsys) -> None:
    # torch's optimizers take lr=0 (the parameters stay where they are), and so does every rkfast entry point
    model = smooth_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    MetaOptimizer(model, F.mse_loss, lr=0.0).step(regression_batch())
    assert all(p.equal(q) for p, q in zip(model.parameters(), before))
    assert TrainConfig(lr=0).resolved().lr == 0
    assert main(["train", "sinusoid", *TINY, "--lr", "0", "--out", str(tmp_path)]) == 0
    assert "error" not in capsys.readouterr().err


# -- meta-test step counts: positive integers ------------------------------------------------------------


@pytest.mark.parametrize(("text", "steps", "error"), [
    ("1.5", [1.5], TypeError), ("1,2.0", [1, 2.0], TypeError), ("0", [0], ValueError), ("-1", [-1], ValueError),
])
def test_step_counts_are_refused_alike(text: str, steps: list, error: type, tmp_path: Path, capsys) -> None:
    model, opt = trained_optimizer()
    snap = snapshot(model, opt)
    with pytest.raises(error, match="steps must be positive"):
        opt.evaluate(regression_batch(), steps=steps)
    assert_unchanged(model, opt, snap)
    # argparse reads --steps before eval looks at the run folder (there is none here)
    refused_in_one_line(["eval", str(tmp_path / "run"), f"--steps={text}"], capsys, "argument --steps")
    assert not any(tmp_path.iterdir())


# -- tableau specs: the same parser, the same message -------------------------------------------------------


@pytest.mark.parametrize("spec", ["maml(100000)", "maml_msl(55)", "rk2(-1)", "maml(0)", "rk5"])
def test_tableau_specs_are_refused_alike(spec: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError) as api:
        get_tableau(spec)
    message = str(api.value)
    with pytest.raises(ValueError, match=".") as in_config:
        TrainConfig(tableau=spec).resolved()
    assert str(in_config.value) == message
    with pytest.raises(ValueError) as in_optimizer:
        MetaOptimizer(smooth_mlp(), F.mse_loss, tableau=spec)
    assert str(in_optimizer.value) == message
    refused_in_one_line(["train", "sinusoid", *TINY, "--tableau", spec, "--out", str(tmp_path / "run")], capsys,
                        f"argument --tableau: {message}")
    refused_in_one_line(["compare", "sinusoid", *TINY, "--tableaus", f"maml,{spec}", "--out", str(tmp_path / "c")],
                        capsys, f"argument --tableaus: {message}")
    assert not any(tmp_path.iterdir())


def test_maml_limit_and_msl_weights_on_the_command_line(capsys) -> None:
    err = refused_in_one_line(["train", "sinusoid", "--tableau", "maml(100000)"], capsys, "MAX_STAGES = 1001")
    assert "100001 stages" in err
    refused_in_one_line(["train", "sinusoid", "--tableau", "maml_msl(55)"], capsys, "needs at least 2 weights")
    assert get_tableau("maml(1000)").stages == 1001  # the limit itself builds
