"""Every JSON file the command line writes is strict JSON (no bare NaN or Infinity, which parsers outside
Python reject): a non-finite value is ``null``, with the count of non-finite tasks beside it; files written
before, with bare NaN, are still read back (results, resume, eval, compare --resume)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import rkfast.compare as comparing
import rkfast.train.loop as loop
from rkfast.cli import main
from rkfast.results import AdaptationOutput, count_nonfinite
from rkfast.runs import RunFolder, atomic_write, finite_or_none, write_json
from rkfast.train import load_result

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--iterations", "4", "--eval-every", "2", "--eval-tasks", "10", "--test-tasks", "20", "--meta-batch", "5",
        "--quiet"]
DIVERGING = ["--test-step", "0.5"]  # the meta-test (and held-out) adaptation: most tasks blow up after 5 steps


def _refuse(name: str) -> Any:
    raise ValueError(f"not strict JSON: bare {name}")


def strict(path: Path) -> Any:
    """``path`` parsed as strict JSON (``NaN``, ``Infinity``, ``-Infinity`` refused)."""
    return json.loads(path.read_text(), parse_constant=_refuse)


def strict_all(folder: Path) -> dict[str, Any]:
    """Every ``.json`` file under ``folder``, parsed strictly, by path relative to ``folder``."""
    files = sorted(folder.rglob("*.json"))
    assert files, f"no JSON under {folder}"
    return {str(p.relative_to(folder)): strict(p) for p in files}


def test_write_json_is_strict(tmp_path: Path) -> None:
    data = {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": (2, "x"), 3: {"d": 0.5}}
    write_json(tmp_path / "x.json", data)
    assert strict(tmp_path / "x.json") == {"a": None, "b": [1.0, None, None], "c": [2, "x"], "3": {"d": 0.5}}
    assert finite_or_none(data) == strict(tmp_path / "x.json")
    assert count_nonfinite(torch.tensor([1.0, math.nan, math.inf, 0.0])) == 2


def test_summary_counts_nonfinite_tasks_only_when_there_are_some() -> None:
    losses = torch.tensor([[1.0, 2.0, 3.0], [1.0, math.nan, math.inf]])
    out = AdaptationOutput((0, 1), 0.1, losses, {"accuracy": torch.ones(2, 3)})
    summary = out.summary()
    assert summary["nonfinite"] == {"loss": {0: 0, 1: 2}} == out.nonfinite()  # accuracy: every task finite
    assert summary["loss"][0] == pytest.approx((2.0, 1.96 / math.sqrt(3)))
    finite = AdaptationOutput((0, 1), 0.1, torch.ones(2, 3))
    assert "nonfinite" not in finite.summary() and finite.nonfinite() == {}


def test_train_eval_and_resume_write_strict_json(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "sinusoid", *TINY, *DIVERGING, "--out", str(run)]) == 0
    assert main(["eval", str(run), "--test-tasks", "12", "--steps", "1,5", *DIVERGING,
                 "--out", str(tmp_path / "evals" / "eval.json")]) == 0
    assert main(["train", "sinusoid", "--resume", str(run), "--iterations", "6", "--quiet"]) == 0
    files = {**strict_all(run), **strict_all(tmp_path / "evals")}
    assert set(files) == {"results.json", "config.json", "eval.json"}
    res, ev = files["results.json"], files["eval.json"]
    assert res["status"] == "complete" and res["iteration"] == 6
    test = res["test"]
    bad = test["nonfinite"]["loss"]
    assert bad["0"] == bad["1"] == 0 and 0 < bad["10"] <= 20  # the count beside the mean it makes non-finite
    assert test["loss"]["10"] == [None, None] and all(isinstance(x, float) for x in test["loss"]["0"])
    last = res["training"]["eval"][-1]
    assert last["mse"]["10"] is None and 0 < last["nonfinite"]["mse"]["10"] <= 10 and last["nonfinite"]["mse"]["0"] == 0
    assert ev["test"]["loss"]["5"] == [None, None] and 0 < ev["test"]["nonfinite"]["loss"]["5"] <= 12
    # the metrics log was strict already; it still is
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=_refuse)


def test_a_default_run_adds_nothing_when_every_task_is_finite(tmp_path: Path) -> None:
    assert main(["train", "sinusoid", *TINY, "--out", str(tmp_path)]) == 0
    res = strict(tmp_path / "results.json")
    assert "nonfinite" not in res["test"] and all("nonfinite" not in e for e in res["training"]["eval"])
    assert set(res["training"]["eval"][0]) == {"iteration", "mse"}


def test_compare_writes_strict_json_with_the_nonfinite_counts(tmp_path: Path) -> None:
    # one run per tableau; the second diverges in training (its step is never finite)
    plain = tmp_path / "plain"
    assert main(["compare", "sinusoid", "--tableaus", "maml,rk2(1e-300)", *TINY, *DIVERGING,
                 "--out", str(plain)]) == 0
    files = strict_all(plain)
    assert {"compare.json", "maml/results.json"} <= set(files)
    row = files["compare.json"]["table"][0]
    assert row["loss"]["10"] == [None, None] and 0 < row["nonfinite"]["loss"]["10"] <= 20
    assert row["nonfinite"]["loss"]["0"] == 0 and "nonfinite" not in files["compare.json"]["table"][1]
    # several seeds: pooled over seeds x tasks
    grid = tmp_path / "grid"
    assert main(["compare", "sinusoid", "--tableaus", "maml", "--seeds", "0,1", *TINY, *DIVERGING,
                 "--out", str(grid)]) == 0
    files = strict_all(grid)
    assert len(files) == 5  # compare.json, and one results.json and one config.json per seed
    assert sorted(Path(name).name for name in files) == ["compare.json", *["config.json"] * 2, *["results.json"] * 2]
    stats = files["compare.json"]["table"][0]["mse"]
    assert stats["10"]["mean"] is None and 0 < stats["10"]["nonfinite"] <= 40 and "nonfinite" not in stats["0"]
    # the study driver reads null back as NaN, the count beside it
    study = _driver()
    entry = study.summarize(files["compare.json"])
    assert math.isnan(entry["mse"]["10"]["mean"]) and entry["mse"]["10"]["nonfinite"] == stats["10"]["nonfinite"]
    assert "nan ± nan" in study.markdown([{**entry, "shots": 5, "variant": "maml"}], [], _study_settings())


def _driver() -> Any:
    spec = importlib.util.spec_from_file_location("study_learned", ROOT / "benchmarks" / "study_learned.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_learned"] = module
    spec.loader.exec_module(module)
    return module


def _study_settings() -> dict[str, Any]:
    return {"iterations": 4, "meta_batch": 5, "seeds": [0, 1], "test_tasks": 20, "grid": [0.01],
            "default_inner_lr": 0.01}


def _older_writer(path: Path | str, data: Any) -> None:
    """How rkfast wrote JSON before: non-finite values as bare ``NaN``."""
    atomic_write(Path(path), lambda f: f.write(json.dumps(data, indent=1) + "\n"), "w")


def test_older_files_with_bare_nan_are_still_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, cmp = tmp_path / "run", tmp_path / "cmp"
    with monkeypatch.context() as older:
        older.setattr(loop, "write_json", _older_writer)
        older.setattr(comparing, "write_json", _older_writer)
        assert main(["train", "sinusoid", *TINY, *DIVERGING, "--out", str(run)]) == 0
        assert main(["compare", "sinusoid", "--tableaus", "maml", "--seeds", "0,1", *TINY, *DIVERGING,
                     "--out", str(cmp)]) == 0
    for path in (run / "results.json", cmp / "compare.json"):
        assert "NaN" in path.read_text()
        with pytest.raises(ValueError, match="not strict JSON"):
            strict(path)
    assert RunFolder(run).describe_run() == "4 of 4 meta-steps, complete"
    result = load_result(run)
    assert result.status == "complete" and math.isnan(result.test_summary()["mse"][10][0])
    assert main(["eval", str(run), "--test-tasks", "8", "--steps", "1", "--out", str(tmp_path / "e.json")]) == 0
    strict(tmp_path / "e.json")
    assert main(["train", "sinusoid", "--resume", str(run), "--iterations", "6", "--quiet"]) == 0
    assert strict(run / "results.json")["iteration"] == 6  # rewritten, strict
    older_entry = _driver().summarize(json.loads((cmp / "compare.json").read_text()))
    assert math.isnan(older_entry["mse"]["10"]["mean"])
    assert main(["compare", "sinusoid", "--resume", str(cmp), "--iterations", "6", "--quiet"]) == 0
    assert strict(cmp / "compare.json")["status"] == "complete"
