"""Plots say what they show: every Axes of every plot has its labels, title and readable tick labels (log axes
that span less than a decade fall back to linear); non-finite points are marked rather than dropped; a grid
comparison whose held-out scores are non-finite after the selecting step count (learned rates, a learned
tableau) reports it as such, judged on that step count, and plots it without crashing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import rkfast.compare as comparing
import rkfast.plots as plots
from rkfast.cli import main
from rkfast.figures import NONFINITE_GID, new_figure, readable_log_axis
from rkfast.train import load_result

TINY = ["--iterations", "4", "--meta-batch", "2", "--eval-every", "2", "--eval-tasks", "4", "--test-tasks", "4",
        "--quiet"]


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every figure the plots save, kept to inspect."""
    figures: list[Figure] = []
    real_save = plots.save_figure

    def keep(fig: Figure, path: Path | str) -> None:
        real_save(fig, path)
        figures.append(fig)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def assert_labelled(ax: Axes) -> None:
    ax.figure.canvas.draw()
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), ax
    for axis in (ax.xaxis, ax.yaxis):
        view = axis.get_view_interval()
        shown = [t.get_text() for t in axis.get_ticklabels(which="both")
                 if t.get_visible() and t.get_text() and min(view) <= t.get_position()[axis is ax.yaxis] <= max(view)]
        assert len(shown) >= 2, (ax.get_title(), axis.axis_name, axis.get_scale())


def nonfinite_marks(ax: Axes) -> int:
    return sum(len(line.get_xdata()) for line in ax.get_lines() if line.get_gid() == NONFINITE_GID)


def test_a_sub_decade_log_axis_falls_back_to_linear_and_a_wide_one_is_labelled() -> None:
    fig = new_figure()
    narrow, wide = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    narrow.plot([1, 2, 3], [0.39, 0.45, 0.5])
    wide.plot([1, 2, 3], [0.01, 0.5, 3.0])
    narrow.set(xlabel="x", ylabel="y", title="narrow")
    wide.set(xlabel="x", ylabel="y", title="wide")
    assert readable_log_axis(narrow) is False and narrow.get_yscale() == "linear"
    assert readable_log_axis(wide) is True and wide.get_yscale() == "log"
    assert readable_log_axis(new_figure().add_subplot(), values=[math.nan, -1.0]) is False  # nothing to log
    for ax in (narrow, wide):
        assert_labelled(ax)


def test_every_run_plot_and_compare_plot_is_labelled(tmp_path: Path, captured: list[Figure]) -> None:
    out = tmp_path / "c"
    assert main(["compare", "sinusoid", "--tableaus", "maml,heun", *TINY, "--learn-rates", "tensor",
                 "--out", str(out)]) == 0
    run = load_result(out / "maml")
    captured.clear()
    plots.write_run_plots(run, tmp_path)
    plots.plot_compare([run, load_result(out / "heun")], tmp_path / "compare.png")
    assert len(captured) == 3  # training, rates, compare (the domain's own plots save through rkfast.figures)
    for fig in captured:
        for ax in fig.axes:
            assert_labelled(ax)


def test_a_nan_held_out_series_is_marked_not_dropped(tmp_path: Path, captured: list[Figure]) -> None:
    out = tmp_path / "c"
    assert main(["train", "sinusoid", *TINY, "--out", str(out)]) == 0
    run = load_result(out)
    run.evals[-1]["mse"]["10"] = None
    run.evals[-2]["mse"]["1"] = math.nan
    captured.clear()
    plots.plot_training(run, tmp_path / "training.png")
    plots.plot_compare([run], tmp_path / "compare.png")
    training, compare = captured[0], captured[-1]
    assert nonfinite_marks(training.axes[0]) == 2
    assert nonfinite_marks(compare.axes[1]) == 1
    for fig in captured:
        for ax in fig.axes:
            assert_labelled(ax)


@pytest.mark.parametrize("learned", [["--learn-rates", "element"], ["--learn-tableau", "pattern"]])
def test_non_finite_at_the_selecting_step_is_reported_and_plotted(tmp_path: Path, monkeypatch, capsys,
                                                                   captured: list[Figure], learned) -> None:
    real_train = comparing.train

    def nan_after_10(cfg, **kwargs):  # as learned coefficients do when 10 steps extrapolate what 1 step learned
        run = real_train(cfg, **kwargs)
        run.evals[-1]["mse"]["10"] = None
        run.evals[-1]["nonfinite"] = {"mse": {"0": 0, "1": 0, "10": 3}}
        return run

    monkeypatch.setattr(comparing, "train", nan_after_10)
    out = tmp_path / "g"
    assert main(["compare", "sinusoid", "--tableaus", "maml", "--inner-lr", "0.01,0.02", *TINY, *learned,
                 "--select-steps", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "h=0.01 non-finite on 3/4 tasks" in printed and "every h diverged" not in printed
    assert "no h has a finite held-out score after 10 steps" in printed and "finite after 1" in printed
    row = json.loads((out / "compare.json").read_text())["table"][0]
    assert row["status"] == "not selected" and row["selected_inner_lr"] is None
    assert "no finite score @10" in printed
    right = captured[-1].axes[1]
    assert "after 10 steps" in right.get_title() and nonfinite_marks(right) == 2
    for ax in captured[-1].axes:
        assert_labelled(ax)

    # selecting on 1 step: selected, and the title says so. Learned rates select on the step count they train
    # (1) by default, as best.pt does; a learned tableau on the domain's last unless told
    out1 = tmp_path / "g1"
    monkeypatch.setattr(comparing, "train", real_train)
    select_1 = [] if learned[0] == "--learn-rates" else ["--select-steps", "1"]
    assert main(["compare", "sinusoid", "--tableaus", "maml", "--inner-lr", "0.01,0.02", *TINY, *learned,
                 *select_1, "--out", str(out1)]) == 0
    saved = json.loads((out1 / "compare.json").read_text())
    assert saved["table"][0]["status"] == "complete" and saved["grid"]["select_steps"] == 1
    right = captured[-1].axes[1]
    assert "after 1 step," in right.get_title()
    for ax in captured[-1].axes:
        assert_labelled(ax)
