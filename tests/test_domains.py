"""The task-domain registry and the one training loop: a toy domain registered here trains, compares and
evaluates through the same command line as the built-in sinusoid domain."""

from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rkfast import TaskBatch, tasks
from rkfast.cli import main
from rkfast.tasks import Defaults, Domain, Metric, Option
from rkfast.train import TrainConfig, load_checkpoint, train


@dataclass(frozen=True)
class Blobs:
    """Toy few-shot classification: each task puts ``ways`` classes at random centres in the plane."""

    ways: int
    shots: int
    query: int
    device: torch.device

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        centres = 3 * torch.randn(num_tasks, self.ways, 2, generator=generator)
        labels = torch.arange(self.ways).repeat_interleave(self.shots + self.query)
        points = centres[:, labels] + torch.randn(num_tasks, len(labels), 2, generator=generator)
        labels = labels.expand(num_tasks, -1).reshape(num_tasks, self.ways, -1)
        points = points.reshape(num_tasks, self.ways, -1, 2)
        s, q = self.shots, self.query
        batch = TaskBatch(points[:, :, :s].reshape(num_tasks, -1, 2), labels[:, :, :s].reshape(num_tasks, -1),
                          points[:, :, s:].reshape(num_tasks, -1, 2), labels[:, :, s:].reshape(num_tasks, -1))
        return batch.to(self.device)


def toy_domain(name: str = "toy-blobs") -> Domain:
    return Domain(
        name=name,
        description="toy blobs: ways Gaussian classes per task in the plane",
        make_tasks=lambda o, split, device: Blobs(o["ways"], o["shots"], 5 if split == "train" else 10, device),
        make_model=lambda o: nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, o["ways"])),
        loss_fn=F.cross_entropy,
        metrics=(Metric("accuracy", "accuracy", "query accuracy", "acc", higher_is_better=True),
                 Metric("loss", "loss", "query loss", "loss")),
        defaults=Defaults(iterations=40, meta_batch=8, inner_lr=0.5, lr=1e-2, eval_every=20, eval_tasks=16,
                          test_tasks=40, test_steps=(1, 3), eval_steps=(1,), eval_chunk=16),
        options=(Option("ways", 3, "classes per task"), Option("shots", 2, "support examples per class")),
        describe_test=lambda o: f"{o['ways']}-way {o['shots']}-shot",
        test_protocol=lambda o: {"ways": o["ways"], "shots": o["shots"]},
    )


@pytest.fixture
def toy():
    domain = tasks.register(toy_domain())
    yield domain
    tasks.unregister(domain.name)


def test_registry_lookup_and_errors(toy):
    assert tasks.get_domain("toy-blobs") is toy and "sinusoid" in tasks.domains()
    with pytest.raises(ValueError, match="unknown task domain 'nope'; registered: sinusoid, omniglot, miniimagenet, glyphs, navigation, halfcheetah-dir, halfcheetah-vel, toy-blobs"):
        tasks.get_domain("nope")
    with pytest.raises(ValueError, match="already registered"):
        tasks.register(toy_domain())
    with pytest.raises(ValueError, match="has no option wayz; its options: ways, shots"):
        toy.resolve_options({"wayz": 3})
    with pytest.raises(ValueError, match="option shots must be > 0"):
        toy.resolve_options({"shots": 0})
    assert toy.resolve_options({"ways": "4"}) == {"ways": 4, "shots": 2}


def test_toy_domain_trains_evaluates_and_compares_through_the_cli(toy, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", "toy-blobs", "--ways", "4", "--quiet", "--out", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "query accuracy" in out and "4-way 2-shot" in out and "40 tasks" in out
    res = json.loads((run_dir / "results.json").read_text())
    assert res["domain"] == "toy-blobs" and res["config"]["options"] == {"ways": 4, "shots": 2}
    assert res["config"]["iterations"] == 40 and res["config"]["inner_lr"] == 0.5  # the domain's defaults
    assert [e["iteration"] for e in res["training"]["eval"]] == [0, 20, 40]
    assert set(res["training"]["eval"][0]) == {"iteration", "accuracy", "loss"}
    assert set(res["test"]["accuracy"]) == {"0", "1", "3"} and res["test"]["ways"] == 4
    acc = {int(k): v[0] for k, v in res["test"]["accuracy"].items()}
    assert all(0.0 <= a <= 1.0 for a in acc.values())
    assert (run_dir / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert load_checkpoint(run_dir / "checkpoint.pt")["iteration"] == 40

    # eval re-runs the meta-test from the checkpoint: the same tasks give the same numbers
    assert main(["eval", str(run_dir)]) == 0
    assert "query accuracy" in capsys.readouterr().out
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["test"]["accuracy"] == res["test"]["accuracy"] and again["iterations"] == 40
    assert main(["eval", str(run_dir), "--steps", "2", "--test-tasks", "16", "--out", str(tmp_path / "e.json")]) == 0
    other = json.loads((tmp_path / "e.json").read_text())
    assert other["test"]["tasks"] == 16 and set(other["test"]["accuracy"]) == {"0", "2"}

    assert main(["compare", "toy-blobs", "--tableaus", "maml,heun", "--iterations", "10", "--quiet",
                 "--out", str(tmp_path / "cmp")]) == 0
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())["table"]
    assert [r["tableau"] for r in table] == ["maml", "heun"] and all("accuracy" in r for r in table)
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000


def test_toy_domain_learns(toy):
    run = train(TrainConfig("toy-blobs", iterations=150, test_tasks=64, eval_tasks=0, seed=3), progress=False)
    # the post-adaptation meta-loss falls (seeds 3-5: by 20-37% from the first 20 steps to the last 20)
    assert sum(run.losses[-20:]) < 0.9 * sum(run.losses[:20])
    acc = run.test_summary()["accuracy"]
    assert acc[1][0] > acc[0][0] + 0.2  # one adaptation step helps a lot on unseen tasks (seen: 0.34 -> 0.67)


def test_cli_errors_name_the_problem(toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["train", "toy-blobs", "--ways", "0"]) == 2
    assert "must be > 0" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint at {tmp_path / 'checkpoint.pt'}" in err and "Traceback" not in err
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", str(tmp_path)]) == 2
    assert "is not a readable rkfast checkpoint" in capsys.readouterr().err


def test_a_run_with_a_custom_tableau_loads_back(toy, tmp_path: Path) -> None:
    from rkfast import Tableau
    from rkfast.train import load_run, resume_config

    custom = Tableau.from_arrays([[0, 0, 0], [0.4, 0, 0], [0.1, 0.5, 0]], [0.2, 0.3, 0.5])  # named "custom"
    cfg = TrainConfig("toy-blobs", tableau=custom, iterations=3, eval_tasks=0, test_tasks=16)
    run = train(cfg, out=tmp_path, progress=False)
    _, opt, iterations = load_run(tmp_path)
    assert opt.tableau == custom and iterations == 3
    # and a resumed run continues with it
    longer = train(replace(resume_config(tmp_path), iterations=5), out=tmp_path, resume=True, progress=False)
    assert longer.tableau == custom and longer.iteration == 5
    assert torch.equal(opt.meta_parameters(), run.opt.meta_parameters())
