"""A run folder's ``config.json`` and ``rkfast train DOMAIN --config FILE``: a run written, run again with
typed flags overriding the file, and the one-line errors of a bad file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from rkfast.cli import main
from rkfast.tableau import Tableau
from rkfast.tasks import get_domain
from rkfast.train import CONFIG_FILE, ConfigFileError, TrainConfig, read_config, run_files, train

TINY = ["--iterations", "4", "--eval-every", "2", "--eval-tasks", "3", "--test-tasks", "5", "--meta-batch", "2"]


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _one_error_line(capsys: pytest.CaptureFixture[str], *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for name in names:
        assert name in err, err
    return err


def test_a_run_writes_its_resolved_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "sinusoid", "--tableau", "heun", *TINY, "--quiet", "--out", str(tmp_path)]) == 0
    assert str(tmp_path / CONFIG_FILE) in capsys.readouterr().out  # the "wrote ..." line names it
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved == _results(tmp_path)["config"]  # every setting, the domain's defaults filled in
    assert saved["tableau"] == "heun" and saved["inner_lr"] is not None and saved["options"]
    assert CONFIG_FILE in run_files(get_domain("sinusoid"))  # cleared by --overwrite, checked before a run


def test_config_with_a_typed_seed_reproduces_every_other_setting(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    flags = ["--tableau", "rk2(0.75)", "--first-order", "--shots", "4", *TINY, "--quiet"]
    assert main(["train", "sinusoid", *flags, "--out", str(first)]) == 0
    again = ["train", "sinusoid", "--config", str(first / CONFIG_FILE), "--seed", "1", "--quiet"]
    assert main([*again, "--out", str(second)]) == 0
    one, two = _results(first)["config"], _results(second)["config"]
    assert two.pop("seed") == 1 and one.pop("seed") == 0
    assert one == two
    assert json.loads((second / CONFIG_FILE).read_text())["seed"] == 1


def test_the_same_configuration_gives_the_same_results(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "sinusoid", *TINY, "--quiet", "--out", str(first)]) == 0
    assert main(["train", "sinusoid", "--config", str(first / CONFIG_FILE), "--quiet", "--out", str(second)]) == 0
    one, two = _results(first), _results(second)
    assert one["config"] == two["config"]
    assert one["training"]["meta_loss"] == two["training"]["meta_loss"]
    assert one["test"] == two["test"]


@pytest.mark.parametrize(
    ("content", "names"),
    [
        ({"sed": 1}, ["'sed'", "unknown key"]),
        ({"seed": -1}, ["seed", "-1"]),
        ({"first_order": "yes"}, ["'first_order'", "yes"]),
        ({"inner_lr": "fast"}, ["inner_lr", "fast"]),
        ({"options": {"shot": 5}}, ["shot"]),
        ({"tableau": "rk5"}, ["rk5"]),
        ({"frozen_rates": {"0.*": "x"}}, ["'frozen_rates'"]),
    ],
)
def test_a_bad_key_or_value_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: dict, names: list[str]
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    assert main(["train", "sinusoid", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    _one_error_line(capsys, str(path), *names)
    assert not (tmp_path / "run").exists()


def test_an_unreadable_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.json"
    assert main(["train", "sinusoid", "--config", str(missing)]) == 2
    _one_error_line(capsys, str(missing))
    broken = tmp_path / "broken.json"
    broken.write_text('{"seed": 1,')
    assert main(["train", "sinusoid", "--config", str(broken)]) == 2
    _one_error_line(capsys, str(broken), "not a JSON configuration")
    broken.write_text("[1, 2]")
    assert main(["train", "sinusoid", "--config", str(broken)]) == 2
    _one_error_line(capsys, str(broken))


def test_the_files_domain_must_be_the_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"domain": "sinusoid"}))
    assert main(["train", "omniglot", "--config", str(path)]) == 2
    _one_error_line(capsys, "'sinusoid'", "'omniglot'", str(path))


def test_config_and_resume_are_not_given_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text("{}")
    assert main(["train", "sinusoid", "--config", str(path), "--resume", str(tmp_path)]) == 2
    _one_error_line(capsys, "--config", "--resume")


def test_a_resumed_run_keeps_the_file_its_start_wrote(tmp_path: Path) -> None:
    cfg = TrainConfig(iterations=2, eval_every=0, eval_tasks=2, test_tasks=3, meta_batch=2)
    train(cfg, out=tmp_path, progress=False)
    written = (tmp_path / CONFIG_FILE).read_text()
    train(replace(cfg, iterations=3), out=tmp_path, resume=True, progress=False)
    assert (tmp_path / CONFIG_FILE).read_text() == written


def test_a_custom_tableau_is_written_whole(tmp_path: Path) -> None:
    custom = Tableau.from_arrays([[0.0, 0.0], [0.6, 0.0]], [0.25, 0.75], "mine")
    cfg = TrainConfig(tableau=custom, iterations=1, eval_every=0, eval_tasks=0, test_tasks=2, meta_batch=1)
    train(cfg, out=tmp_path, progress=False)
    again = read_config(tmp_path / CONFIG_FILE, domain="sinusoid")
    assert isinstance(again.tableau, Tableau) and again.tableau.to_dict() == custom.to_dict()
    with pytest.raises(ConfigFileError, match="'omniglot'"):
        read_config(tmp_path / CONFIG_FILE, domain="omniglot")


def test_every_run_of_a_comparison_writes_its_configuration(tmp_path: Path) -> None:
    assert main(["compare", "sinusoid", "--tableaus", "maml,heun", *TINY, "--quiet", "--out", str(tmp_path)]) == 0
    for tableau in ("maml", "heun"):
        run = tmp_path / tableau
        saved = json.loads((run / CONFIG_FILE).read_text())
        assert saved == _results(run)["config"] and saved["tableau"] == tableau


def test_a_typed_flag_overrides_a_setting_the_file_gets_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"device": "cuda:99", "iterations": 2, "eval_tasks": 0, "test_tasks": 2}))
    assert main(["train", "sinusoid", "--config", str(path), "--quiet", "--out", str(tmp_path / "a")]) == 2
    _one_error_line(capsys, str(path), "cuda:99")
    assert (
        main(["train", "sinusoid", "--config", str(path), "--device", "cpu", "--quiet", "--out", str(tmp_path / "b")])
        == 0
    )
    assert _results(tmp_path / "b")["config"]["device"] == "cpu"
