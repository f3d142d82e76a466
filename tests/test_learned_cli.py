"""Learned inner rates through the training loop and the command line: flags, results.json, rates.png,
resume bit for bit, ``rkfast eval`` with the learned rates, one-line refusals."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rkfast.cli import main
from rkfast.runs import RunError, load_checkpoint, save_payload
from rkfast.tasks import get_domain
from rkfast.train import (RunInterrupted, TrainConfig, evaluate_tasks, load_run,
                          resume_config, task_chunks, task_generator, train)

TINY = ["--iterations", "30", "--eval-every", "10", "--eval-tasks", "10", "--test-tasks", "20", "--meta-batch", "5",
        "--quiet"]
SMALL = dict(iterations=30, eval_every=10, eval_tasks=10, test_tasks=20, meta_batch=5)
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]  # the sinusoid MLP's tensors
TIMINGS = ("train_time_s", "wall_time_s", "ms_per_meta_step")
PNG = b"\x89PNG\r\n\x1a\n"


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _entries(values: dict, name: str) -> list[float]:
    """The per-set rates of a tensor in results.json: the value, or the mean of element rates."""
    return [e["mean"] if isinstance(e, dict) else e for e in values[name]]


@pytest.mark.parametrize("granularity,extra,sets", [
    ("scalar", [], 1),
    ("tensor", ["--tableau", "maml(2)", "--per-stage-rates"], 2),  # MAML++: per layer, per step
    ("element", ["--rate-lr", "0.002"], 1),  # Meta-SGD
])
def test_train_with_learned_rates_writes_rates_and_their_plot(tmp_path: Path, capsys, granularity: str,
                                                             extra: list[str], sets: int) -> None:
    out = tmp_path / "run"
    assert main(["train", "sinusoid", *TINY, "--learn-rates", granularity, *extra, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test step: the learned inner rates" in printed and f"learned rates: {granularity}" in printed
    assert str(out / "rates.png") in printed
    res = _results(out)
    assert res["config"]["learn_rates"] == granularity and res["config"]["per_stage_rates"] == (sets > 1)
    rates = res["rates"]
    assert rates["granularity"] == granularity and rates["sets"] == sets and rates["frozen"] == {}
    assert rates["rate_lr"] == (0.002 if "--rate-lr" in extra else 1e-3)
    assert list(rates["values"]) == NAMES and all(len(v) == sets for v in rates["values"].values())
    if granularity == "element":
        entry = rates["values"]["2.weight"][0]
        assert entry["min"] <= entry["mean"] <= entry["max"] and entry["min"] < entry["max"]
    else:
        assert all(isinstance(v, float) for vs in rates["values"].values() for v in vs)
    means = [m for name in NAMES for m in _entries(rates["values"], name)]
    assert all(m != 0.01 for m in means)  # learned: moved away from inner_lr
    history = res["training"]["rates"]
    assert [h["iteration"] for h in history] == [0, 10, 20, 30]
    assert all(m == 0.01 for name in NAMES for m in _entries(history[0]["values"], name))  # they start at inner_lr
    assert history[-1]["values"] == rates["values"]
    assert res["test"]["step_size"] == 1.0  # the test-step factor of maml: the learned rates as they are
    assert (out / "rates.png").read_bytes()[:8] == PNG


def test_anil_through_the_cli_keeps_the_frozen_rates_at_zero(tmp_path: Path, capsys) -> None:
    out = tmp_path / "anil"
    assert main(["train", "sinusoid", *TINY, "--learn-rates", "tensor", "--frozen-rates", "0.*=0,2.*=0",
                 "--out", str(out)]) == 0
    assert "fixed: 0.weight=0, 0.bias=0, 2.weight=0, 2.bias=0" in capsys.readouterr().out
    res = _results(out)
    values = res["rates"]["values"]
    assert res["config"]["frozen_rates"] == {"0.*": 0.0, "2.*": 0.0}
    assert res["rates"]["frozen"] == {n: 0.0 for n in NAMES[:4]}
    assert all(values[n] == [0.0] for n in NAMES[:4])
    assert all(h["values"][n] == [0.0] for h in res["training"]["rates"] for n in NAMES[:4])
    assert values["4.weight"] != [0.01] and values["4.bias"] != [0.01]  # the head's rates are learned
    assert (out / "rates.png").read_bytes()[:8] == PNG

    fixed = tmp_path / "fixed"  # fixed rates alone: reported, but nothing learned, so no history and no plot
    assert main(["train", "sinusoid", *TINY, "--frozen-rates", "0.*=0", "--out", str(fixed)]) == 0
    res = _results(fixed)
    assert res["rates"]["granularity"] is None and res["rates"]["values"]["0.weight"] == [0.0]
    assert res["rates"]["values"]["4.weight"] == [0.01] and "rates" not in res["training"]
    assert not (fixed / "rates.png").exists() and (fixed / "training.png").exists()


def _interrupt_at(step: int):
    def hook(done: int, loss: torch.Tensor) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def _without_timings(results: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in results.items() if k not in TIMINGS}))


def test_resumed_learned_rates_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path: Path) -> None:
    cfg = TrainConfig(tableau="maml(2)", learn_rates="element", per_stage_rates=True, rate_lr=2e-3, **SMALL)
    whole = train(cfg, out=tmp_path / "whole", progress=False)
    with pytest.raises(RunInterrupted):
        train(cfg, out=tmp_path / "cut", checkpoint_every=7, progress=False, on_step=_interrupt_at(13))
    partial = _results(tmp_path / "cut")
    assert [h["iteration"] for h in partial["training"]["rates"]] == [0, 10]

    with pytest.raises(RunError, match=r"learn_rates: 'element' -> 'tensor'"):
        train(replace(cfg, learn_rates="tensor"), out=tmp_path / "cut", resume=True, progress=False)
    with pytest.raises(RunError, match=r"frozen_rates: None -> \{'0.\*': 0.0\}"):
        train(replace(cfg, frozen_rates={"0.*": 0.0}), out=tmp_path / "cut", resume=True, progress=False)

    resumed = train(resume_config(tmp_path / "cut"), out=tmp_path / "cut", resume=True, progress=False)
    for a, b in zip(whole.opt.rates.tensors, resumed.opt.rates.tensors, strict=True):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(whole.opt.model.state_dict().items(), resumed.opt.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.rate_history == whole.rate_history and resumed.losses == whole.losses
    a = _without_timings(_results(tmp_path / "whole"))
    b = _without_timings(_results(tmp_path / "cut"))
    assert a == b and b["status"] == "complete" and b["rates"]["sets"] == 2


def test_a_checkpoint_from_before_learned_rates_still_resumes(tmp_path: Path) -> None:
    cfg = TrainConfig(**SMALL)
    with pytest.raises(RunInterrupted):
        train(cfg, out=tmp_path, checkpoint_every=7, progress=False, on_step=_interrupt_at(8))
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    for key in ("learn_rates", "per_stage_rates", "rate_lr", "frozen_rates"):
        del payload["config"][key]
    del payload["history"]["rates"]
    save_payload(tmp_path / "checkpoint.pt", payload)
    assert resume_config(tmp_path).learn_rates is None
    run = train(resume_config(tmp_path), out=tmp_path, resume=True, progress=False)
    assert run.status == "complete" and run.iteration == 30 and _results(tmp_path)["rates"] is None


def test_eval_adapts_with_the_learned_rates(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "sinusoid", *TINY, "--learn-rates", "tensor", "--rate-lr", "0.003",
                 "--out", str(out)]) == 0
    trained = _results(out)["rates"]
    capsys.readouterr()
    assert main(["eval", str(out), "--test-tasks", "30", "--steps", "1,3"]) == 0
    printed = capsys.readouterr().out
    assert "test step: the learned inner rates (tensor) x 1" in printed and "learned rates: tensor" in printed
    got = json.loads((out / "eval.json").read_text())
    assert got["rates"] == trained

    cfg, opt, iterations = load_run(out)
    assert iterations == 30 and cfg.learn_rates == "tensor" and opt.param_groups[-1]["lr"] == 0.003
    domain = get_domain("sinusoid")
    chunks = task_chunks(domain.make_tasks(cfg.options, "test", opt.device), 30, domain.defaults.eval_chunk,
                         task_generator(cfg.test_seed, "test"))
    expected = json.loads(json.dumps(evaluate_tasks(opt, chunks, (1, 3), None).summary()))
    assert got["test"]["loss"] == expected["loss"] and got["test"]["step_size"] == 1.0
    fixed = json.loads(json.dumps(evaluate_tasks(opt, chunks, (1, 3), 0.01).summary()))
    assert fixed["loss"]["3"] != expected["loss"]["3"]  # the learned rates are not the fixed step

    capsys.readouterr()  # an explicit step replaces the learned rates, and says so
    assert main(["eval", str(out), "--test-tasks", "30", "--steps", "1,3", "--test-step", "0.01",
                 "--out", str(tmp_path / "e.json")]) == 0
    assert "test step size 0.01 (--test-step, in place of the learned rates)" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["test"]["loss"] == fixed["loss"]


def test_compare_with_learned_rates(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "sinusoid", "--tableaus", "maml,heun", *TINY, "--learn-rates", "scalar",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("learned rates: scalar") == 2 and "rates x 1" in printed
    data = json.loads((out / "compare.json").read_text())
    assert data["config"]["learn_rates"] == "scalar"
    assert [r["rates"]["granularity"] for r in data["runs"]] == ["scalar", "scalar"]


@pytest.mark.parametrize("argv,message", [
    (["--learn-rates", "bogus"], "argument --learn-rates: invalid choice: 'bogus'"),
    (["--per-stage-rates"], "per_stage_rates=True needs learn_rates"),
    (["--rate-lr", "0.01"], "rate_lr is the learning rate of learned rates: it needs learn_rates"),
    (["--learn-rates", "scalar", "--rate-lr", "-1"], "argument --rate-lr: must be a finite number >= 0"),
    (["--learn-rates", "scalar", "--rate-lr", "nan"], "argument --rate-lr"),
    (["--frozen-rates", "nothing.*=0"], "frozen_rates pattern 'nothing.*' matches no meta-parameter"),
    (["--frozen-rates", "0.*"], "argument --frozen-rates: expected PATTERN=VALUE"),
    (["--frozen-rates", "0.*=x"], "the rate of '0.*' is not a number"),
    (["--frozen-rates", "0.*=inf"], "must be a finite number"),
    (["--frozen-rates", "0.*=0,0.*=1"], "two rates"),
    (["--frozen-rates", "0.*=0,0.weight=1"], "gives parameter '0.weight' two rates"),
    (["--learn-rates", "tensor", "--frozen-rates", "*=0"], "freezes every meta-parameter tensor"),
])
def test_bad_rate_flags_are_one_line_errors(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    for command in (["train", "sinusoid"], ["compare", "sinusoid", "--tableaus", "maml"]):
        capsys.readouterr()
        assert main([*command, *TINY, *argv, "--out", str(tmp_path / "x")]) == 2, (command, argv)
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_the_configuration_checks_the_rates_as_the_optimizer_does() -> None:
    state = torch.get_rng_state()
    cfg = TrainConfig(learn_rates="element", frozen_rates={"0.*": 0}, rate_lr=1).resolved()
    assert torch.equal(state, torch.get_rng_state())  # checking the patterns draws no random numbers
    assert cfg.frozen_rates == {"0.*": 0.0} and isinstance(cfg.frozen_rates["0.*"], float) and cfg.rate_lr == 1.0
    for bad, message in [({"learn_rates": "layer"}, "learn_rates must be one of"),
                         ({"per_stage_rates": "yes", "learn_rates": "scalar"}, "per_stage_rates must be"),
                         ({"learn_rates": "scalar", "rate_lr": float("inf")}, "rate_lr"),
                         ({"frozen_rates": [("0.*", 0.0)]}, "frozen_rates must be a mapping"),
                         ({"frozen_rates": {"0.*": True}}, "must be a finite number")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad).resolved()


