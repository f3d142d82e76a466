"""A learned tableau through the training loop: configuration checks, results.json, tableau.png, resume bit
for bit, and the checkpoint loader of meta-test/``rkfast eval`` rebuilding the learned tableau."""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rkfast import cli, plots
from rkfast.runs import RunError, load_checkpoint, save_payload
from rkfast.tableau import get_tableau
from rkfast.tasks import get_domain
from rkfast.train import (TABLEAU_PLOT, RunDiverged, RunInterrupted, TrainConfig, describe_learned_tableau, evaluate_tasks,
                          load_run, resume_config, run_files, task_chunks, task_generator, train)

SMALL = dict(iterations=12, eval_every=4, eval_tasks=4, test_tasks=4, meta_batch=2)
LEARNED = dict(tableau="heun", learn_tableau="pattern", tableau_weights="order", tableau_lr=0.05)
TIMINGS = ("train_time_s", "wall_time_s", "ms_per_meta_step")
PNG = b"\x89PNG\r\n\x1a\n"


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _without_timings(results: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in results.items() if k not in TIMINGS}))


def _interrupt_at(step: int):
    def hook(done: int, loss: torch.Tensor) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


@pytest.mark.parametrize("settings,message", [
    ({"learn_tableau": "diagonal"}, "learn_tableau must be one of"),
    ({"learn_tableau": "pattern", "tableau_weights": "free"}, "tableau_weights must be one of"),
    ({"tableau_weights": "order"}, "tableau_weights='order' needs learn_tableau"),
    ({"tableau_lr": 0.01}, "tableau_lr is the learning rate of a learned tableau: it needs learn_tableau"),
    ({"learn_tableau": "pattern", "tableau_lr": -1.0}, "tableau_lr must be a finite, non-negative number"),
    ({"learn_tableau": "pattern", "tableau_lr": float("inf")}, "tableau_lr must be a finite, non-negative number"),
    ({"learn_tableau": "pattern", "tableau_lr": "fast"}, "tableau_lr must be a finite, non-negative number"),
    ({"learn_tableau": "pattern", "tableau_lr": True}, "tableau_lr must be a finite, non-negative number"),
    ({"tableau": "euler", "learn_tableau": "pattern"}, "tableau 'euler' has no entry of A to learn"),
    ({"tableau": "euler", "learn_tableau": "full"}, "tableau 'euler' has no entry of A to learn"),  # one stage
])
def test_bad_learned_tableau_settings_are_refused_naming_them(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings).resolved()
    with pytest.raises(ValueError, match=message):  # before the run touches its folder
        train(TrainConfig(**settings, **SMALL), out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_good_learned_tableau_settings_resolve() -> None:
    state = torch.get_rng_state()
    cfg = TrainConfig(tableau="rk4", learn_tableau="full", tableau_lr=1).resolved()
    assert torch.equal(state, torch.get_rng_state())  # checking draws no random numbers
    assert cfg.tableau_lr == 1.0 and isinstance(cfg.tableau_lr, float)
    assert TrainConfig(**LEARNED).resolved().tableau_weights == "order"
    assert TrainConfig().resolved().learn_tableau is None and TrainConfig().resolved().tableau_weights == "fixed"
    assert TrainConfig(**LEARNED).to_json()["learn_tableau"] == "pattern"
    assert TABLEAU_PLOT == "tableau.png" and TABLEAU_PLOT in run_files(get_domain("sinusoid"))


def test_a_learned_tableau_run_reports_its_values_history_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = train(TrainConfig(**LEARNED, **SMALL), out=out, progress=False)
    res = _results(out)
    assert res["config"]["learn_tableau"] == "pattern" and res["config"]["tableau_weights"] == "order"
    assert res["config"]["tableau_lr"] == 0.05 and res["tableau"]["name"] == "heun"  # the base tableau
    info = res["learned_tableau"]
    assert info["pattern"] == "pattern" and info["weights"] == "order" and info["tableau_lr"] == 0.05
    assert info["base"] == "heun" and info["entries"] == [[1, 0]] and info["order"] == 2
    (a21,) = [info["A"][1][0]]
    assert a21 != 1.0 and info["A"][0] == [0.0, 0.0] and info["A"][1][1] == 0.0  # learned: moved from heun's 1
    b = info["b"]
    assert abs(sum(b) - 1.0) < 1e-6 and abs(b[1] * a21 - 0.5) < 1e-6  # the order conditions: sum b = 1, b.c = 1/2
    assert b != [0.5, 0.5]
    current = run.opt.current_tableau()
    assert info["test_step"] == float(f"{current.test_step(run.config.inner_lr):.7g}")
    assert res["test"]["step_size"] == current.test_step(run.config.inner_lr) != get_tableau("heun").test_step(0.01)
    history = res["training"]["tableau"]
    assert [h["iteration"] for h in history] == [e["iteration"] for e in res["training"]["eval"]] == [0, 4, 8, 12]
    assert history[0] == {"iteration": 0, "A": [[0.0, 0.0], [1.0, 0.0]], "b": [0.5, 0.5]}  # heun at the start
    assert {k: history[-1][k] for k in ("A", "b")} == {"A": info["A"], "b": info["b"]}
    assert all(abs(sum(h["b"]) - 1.0) < 1e-6 for h in history)
    assert run.tableau_history == history and run.learned_tableau == info
    assert "rates" not in res["training"] and res["rates"] is None
    line = describe_learned_tableau(info)
    assert line is not None and line.startswith(f"learned tableau (pattern, b by order): A21={a21:.4g}, b=(")
    assert "from heun" in line and describe_learned_tableau(None) is None

    plots.plot_learned_tableau(history, out / "from_history.png")
    plots.plot_learned_tableau(run, out / TABLEAU_PLOT)  # as a run plot (what the CLI's plot makers take)
    assert (out / "from_history.png").read_bytes()[:8] == PNG and (out / TABLEAU_PLOT).read_bytes()[:8] == PNG

    # a run without a learned tableau into the same folder clears the plot and reports none
    plain = train(TrainConfig(tableau="heun", **SMALL), out=out, overwrite=True, progress=False)
    res = _results(out)
    assert res["learned_tableau"] is None and "tableau" not in res["training"] and plain.tableau_history == []
    assert not (out / TABLEAU_PLOT).exists()


def test_cli_plots_of_a_learned_tableau_run(tmp_path: Path) -> None:
    run = train(TrainConfig(**LEARNED, **SMALL), progress=False)
    written = plots.write_run_plots(run, tmp_path)
    assert tmp_path / TABLEAU_PLOT in written
    assert (tmp_path / TABLEAU_PLOT).read_bytes()[:8] == PNG
    plain = train(TrainConfig(tableau="heun", **SMALL), progress=False)
    (tmp_path / "plain").mkdir()
    assert tmp_path / "plain" / TABLEAU_PLOT not in plots.write_run_plots(plain, tmp_path / "plain")
    assert not (tmp_path / "plain" / TABLEAU_PLOT).exists()


def test_fixed_weights_beside_learned_rates_keep_each_its_own_rate(tmp_path: Path) -> None:
    cfg = TrainConfig(tableau="ralston", learn_tableau="pattern", tableau_lr=0.05, learn_rates="scalar",
                      rate_lr=0.002, **SMALL)
    run = train(cfg, out=tmp_path, progress=False)
    res = _results(tmp_path)
    info = res["learned_tableau"]
    assert info["weights"] == "fixed" and info["tableau_lr"] == 0.05 and res["rates"]["rate_lr"] == 0.002
    assert info["b"] == [0.25, 0.75] and all(h["b"] == [0.25, 0.75] for h in res["training"]["tableau"])
    assert info["A"][1][0] != float(f"{2 / 3:.7g}")
    assert [h["iteration"] for h in res["training"]["tableau"]] == [h["iteration"] for h in res["training"]["rates"]]
    assert "b fixed" in describe_learned_tableau(info)  # type: ignore[operator]
    assert run.opt.current_tableau().b == (0.25, 0.75)


def test_resumed_learned_tableau_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path: Path) -> None:
    cfg = TrainConfig(**LEARNED, **SMALL)
    whole = train(cfg, out=tmp_path / "whole", progress=False)
    with pytest.raises(RunInterrupted):
        train(cfg, out=tmp_path / "cut", checkpoint_every=3, progress=False, on_step=_interrupt_at(6))
    partial = _results(tmp_path / "cut")
    assert partial["iteration"] == 6 and [h["iteration"] for h in partial["training"]["tableau"]] == [0, 4]
    assert partial["learned_tableau"]["A"] != whole.learned_tableau["A"]  # type: ignore[index]

    for change, message in [({"learn_tableau": "full"}, r"learn_tableau: 'pattern' -> 'full'"),
                            ({"tableau_weights": "fixed"}, r"tableau_weights: 'order' -> 'fixed'"),
                            ({"tableau_lr": 0.01}, r"tableau_lr: 0.05 -> 0.01"),
                            ({"learn_tableau": None, "tableau_weights": "fixed", "tableau_lr": None},
                             r"learn_tableau: 'pattern' -> None")]:
        with pytest.raises(RunError, match=message):
            train(replace(cfg, **change), out=tmp_path / "cut", resume=True, progress=False)

    saved = resume_config(tmp_path / "cut")
    assert (saved.learn_tableau, saved.tableau_weights, saved.tableau_lr) == ("pattern", "order", 0.05)
    resumed = train(saved, out=tmp_path / "cut", resume=True, progress=False)
    for a, b in zip(whole.opt.learned_tableau.tensors, resumed.opt.learned_tableau.tensors, strict=True):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(whole.opt.model.state_dict().items(), resumed.opt.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.tableau_history == whole.tableau_history and resumed.losses == whole.losses
    assert torch.equal(resumed.test.losses, whole.test.losses)
    a = _without_timings(_results(tmp_path / "whole"))
    b = _without_timings(_results(tmp_path / "cut"))
    assert a == b and b["status"] == "complete" and b["learned_tableau"] == whole.learned_tableau


def test_a_checkpoint_from_before_learned_tableaus_still_resumes(tmp_path: Path) -> None:
    cfg = TrainConfig(tableau="heun", **SMALL)
    with pytest.raises(RunInterrupted):
        train(cfg, out=tmp_path, checkpoint_every=3, progress=False, on_step=_interrupt_at(5))
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    for key in ("learn_tableau", "tableau_weights", "tableau_lr"):
        del payload["config"][key]
    del payload["history"]["tableau"]
    save_payload(tmp_path / "checkpoint.pt", payload)
    assert resume_config(tmp_path).learn_tableau is None
    run = train(resume_config(tmp_path), out=tmp_path, resume=True, progress=False)
    assert run.status == "complete" and _results(tmp_path)["learned_tableau"] is None


def test_the_checkpoint_loader_rebuilds_the_learned_tableau(tmp_path: Path) -> None:
    cfg = TrainConfig(**LEARNED, **SMALL)
    run = train(cfg, out=tmp_path, progress=False)
    res = _results(tmp_path)
    loaded_cfg, opt, iterations = load_run(tmp_path)
    assert iterations == 12 and loaded_cfg.learn_tableau == "pattern" and loaded_cfg.tableau_lr == 0.05
    assert opt.learned_tableau is not None and opt.param_groups[-1]["lr"] == 0.05
    assert torch.equal(opt.learned_tableau.tensor, run.opt.learned_tableau.tensor)
    current = opt.current_tableau()
    assert current.name == "learned-heun" and current.A == run.opt.current_tableau().A

    # meta-test again from the checkpoint: the very tasks and result of the run's own meta-test
    domain = get_domain("sinusoid")
    defaults = domain.defaults_for(loaded_cfg.options)
    chunks = task_chunks(domain.make_tasks(loaded_cfg.options, "test", opt.device), loaded_cfg.test_tasks,
                         defaults.eval_chunk, task_generator(loaded_cfg.test_seed, "test"))
    again = evaluate_tasks(opt, chunks, defaults.test_steps, None)
    assert again.step_size == current.test_step(loaded_cfg.inner_lr) == res["test"]["step_size"]
    assert again.step_size != get_tableau("heun").test_step(loaded_cfg.inner_lr)  # not the base tableau's step
    assert torch.equal(again.losses, run.test.losses)

    # best.pt: the learned values at the best held-out evaluation
    _, best_opt, best_iteration = load_run(tmp_path, checkpoint="best.pt")
    assert best_iteration == run.best["iteration"]  # type: ignore[index]
    recorded = next(h for h in res["training"]["tableau"] if h["iteration"] == best_iteration)
    values = best_opt.learned_tableau.values()
    assert [[float(f"{x:.7g}") for x in row] for row in values["A"]] == recorded["A"]
    step = evaluate_tasks(best_opt, chunks[:1], (1,), None).step_size
    assert step == best_opt.current_tableau().test_step(loaded_cfg.inner_lr)


def test_cli_train_and_eval_of_a_learned_tableau(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = cli.main(["train", "sinusoid", "--tableau", "heun", "--learn-tableau", "pattern", "--tableau-weights",
                     "order", "--tableau-lr", "0.05", "--iterations", "12", "--meta-batch", "3", "--eval-every", "6",
                     "--eval-tasks", "4", "--test-tasks", "4", "--quiet", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "learned-heun: s=2" in printed and "learned tableau (pattern, b by order): A21=" in printed
    assert "the learned tableau's own step" in printed
    assert (out / TABLEAU_PLOT).read_bytes()[:8] == PNG
    res = _results(out)
    assert code == 0 and cli.main(["eval", str(out), "--test-tasks", "4"]) == 0
    printed = capsys.readouterr().out
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["learned_tableau"] == res["learned_tableau"]
    assert math.isclose(evaluated["test"]["step_size"], res["learned_tableau"]["test_step"], rel_tol=1e-6)
    assert "learned-heun" in printed
    # refused in one line: the weights without a learned tableau
    assert cli.main(["train", "sinusoid", "--tableau-weights", "order", "--iterations", "2", "--out",
                     str(tmp_path / "bad")]) == 2
    assert "tableau_weights='order' needs learn_tableau" in capsys.readouterr().err


def test_a_run_whose_learned_weights_turn_negative_ends_as_diverged_with_the_reason(tmp_path: Path) -> None:
    """heun's node c = A21 pulled below 1/2 makes b1 < 0 (an unbounded meta-loss): the step that would do so is
    undone, the run ends as diverged naming the reason, and the last good state (b >= 0) is saved."""
    cfg = TrainConfig(tableau="heun", learn_tableau="pattern", tableau_weights="order", tableau_lr=0.1,
                      iterations=200, meta_batch=4, eval_every=50, eval_tasks=4, test_tasks=4)
    with pytest.raises(RunDiverged, match="negative entry"):
        train(cfg, out=tmp_path / "run", progress=False)
    res = _results(tmp_path / "run")
    assert res["status"] == "diverged" and "negative entry" in res["error"]
    assert 0 < res["iteration"] < 200 and min(res["learned_tableau"]["b"]) >= 0
