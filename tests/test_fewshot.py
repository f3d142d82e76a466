"""Few-shot episodes (invariants of the sampler), the conv4 models and the registered image domains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rkfast.cli import main
from rkfast.data.images import ClassImages, DataError
from rkfast.tasks import get_domain
from rkfast.tasks.fewshot import EpisodeSampler, conv4
from rkfast.train import TrainConfig


def coded_images(classes: int = 12, per_class: int = 9, size: int = 6) -> ClassImages:
    """Images whose first two pixels say which class and which drawing they are."""
    images = np.zeros((classes, per_class, 1, size, size), dtype=np.uint8)
    images[:, :, 0, 0, 0] = np.arange(classes)[:, None]
    images[:, :, 0, 0, 1] = np.arange(per_class)[None, :]
    images[:, :, 0, 1:, :] = 200
    return ClassImages(images, tuple(f"c{i}" for i in range(classes)), {"dataset": "coded", "split": "train"})


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, drawing) of images ``[..., 1, H, W]`` made by :func:`coded_images`."""
    pixels = (x[..., 0, 0, :2] * 255).round().long()
    return pixels[..., 0], pixels[..., 1]


@pytest.mark.parametrize("ways,shots,query", [(5, 1, 3), (3, 2, 7), (12, 4, 5)])
def test_episodes_have_distinct_classes_disjoint_sets_and_shuffled_labels(ways, shots, query):
    sampler = EpisodeSampler(coded_images(), ways, shots, query)
    batch = sampler.sample(64, torch.Generator().manual_seed(1))
    assert batch.support_x.shape == (64, ways * shots, 1, 6, 6) and batch.query_x.shape == (64, ways * query, 1, 6, 6)
    assert batch.support_x.dtype == torch.float32 and float(batch.support_x.max()) <= 1.0
    s_class, s_draw = decode(batch.support_x)
    q_class, q_draw = decode(batch.query_x)
    for t in range(64):
        for label in range(ways):
            cls = s_class[t][batch.support_y[t] == label]
            assert len(cls) == shots and len(set(cls.tolist())) == 1  # one class per label
            assert set(q_class[t][batch.query_y[t] == label].tolist()) == set(cls.tolist())
            drawn = s_draw[t][batch.support_y[t] == label].tolist() + q_draw[t][batch.query_y[t] == label].tolist()
            assert len(set(drawn)) == shots + query  # support and query drawings are distinct
        assert len(set(s_class[t].tolist())) == ways  # distinct classes per task
    # labels are a random relabelling per task: class 0 does not always get the same label
    label_of_first = {(s_class[t] == s_class[t].min()).nonzero()[0].item() for t in range(64)}
    assert len(label_of_first) > 1


def test_episodes_are_deterministic_given_the_generator():
    sampler = EpisodeSampler(coded_images(), 5, 1, 2)
    a = sampler.sample(8, torch.Generator().manual_seed(3))
    b = sampler.sample(8, torch.Generator().manual_seed(3))
    c = sampler.sample(8, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.support_x, c.support_x)


def test_too_few_classes_or_drawings_is_a_data_error():
    with pytest.raises(DataError, match="coded train has 12 classes, fewer than --ways 20"):
        EpisodeSampler(coded_images(), 20, 1, 1)
    with pytest.raises(DataError, match="9 images per class, fewer than --shots 5 \\+ --query 5"):
        EpisodeSampler(coded_images(), 5, 5, 5)


@pytest.mark.parametrize("strided,channels,size", [(True, 1, 28), (False, 3, 84), (True, 1, 17)])
def test_conv4_shapes(strided, channels, size):
    model = conv4(channels, 5, 8, size, strided)
    out = model(torch.randn(7, channels, size, size))
    assert out.shape == (7, 5)
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in model) != strided


def test_image_domains_are_registered_with_published_defaults():
    omniglot = TrainConfig("omniglot").resolved()
    assert (omniglot.meta_batch, omniglot.inner_lr, omniglot.tableau) == (32, 0.4, "maml")
    twenty = TrainConfig("omniglot", options={"ways": 20}).resolved()
    assert (twenty.meta_batch, twenty.inner_lr, twenty.tableau) == (16, 0.1, "maml(5)")
    mini = TrainConfig("miniimagenet").resolved()
    assert (mini.meta_batch, mini.inner_lr, mini.tableau, mini.options["query"]) == (4, 0.01, "maml(5)", 15)
    assert TrainConfig("miniimagenet", options={"shots": 5}).resolved().meta_batch == 2
    assert get_domain("miniimagenet").defaults_for(mini.options).test_steps[-1] == 10
    # an explicit setting wins over the option-dependent default
    assert TrainConfig("omniglot", meta_batch=3, options={"ways": 20}).resolved().meta_batch == 3


@pytest.mark.parametrize("domain,root", [("omniglot", None), ("omniglot", "missing"), ("miniimagenet", "missing")])
def test_missing_data_root_is_one_line_and_writes_nothing(tmp_path: Path, capsys, domain, root):
    out = tmp_path / "run"
    argv = ["train", domain, "--quiet", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    if root is not None:
        argv += ["--root", str(tmp_path / root)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert ("needs --root" in err) if root is None else (str(tmp_path / root) in err)
    assert not out.exists() and not (tmp_path / "cache").exists()


# -- end to end through the command line, on fixtures in the published layouts ------------------------------

TINY = ["--iterations", "4", "--eval-every", "2", "--eval-tasks", "4", "--test-tasks", "6", "--meta-batch", "2",
        "--filters", "4", "--quiet"]


def _train_and_eval(domain: str, root: Path, tmp_path: Path, extra: list[str]) -> dict:
    import json

    out = tmp_path / "run"
    argv = ["train", domain, "--root", str(root), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
            *TINY, *extra]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and set(results["test"]["accuracy"]) == {"0", *map(str, results["test"]["steps"][1:])}
    assert all(0.0 <= v[0] <= 1.0 for v in results["test"]["accuracy"].values())
    assert (out / "episodes.png").read_bytes()[:4] == b"\x89PNG" and (out / "training.png").exists()
    assert any((tmp_path / "cache").iterdir())  # decoded once, cached
    assert main(["eval", str(out), "--test-tasks", "4"]) == 0
    return results


def test_omniglot_trains_from_the_original_layout(tmp_path: Path) -> None:
    from test_data import make_omniglot

    root = make_omniglot(tmp_path / "omniglot", drawings=4)
    results = _train_and_eval("omniglot", root, tmp_path, ["--ways", "3", "--train-characters", "6",
                                                           "--val-characters", "2", "--test-query", "2"])
    assert results["config"]["options"]["ways"] == 3 and results["test"]["ways"] == 3


@pytest.mark.parametrize("layout", ["csv", "pickle"])
def test_miniimagenet_trains_from_either_layout(tmp_path: Path, layout: str) -> None:
    from test_data import make_miniimagenet_csv, make_miniimagenet_pickle

    root = tmp_path / "mini"
    for split in ("train", "val", "test"):
        if layout == "csv":
            make_miniimagenet_csv(root, split)
        else:
            make_miniimagenet_pickle(root, split)
    _train_and_eval("miniimagenet", root, tmp_path, ["--ways", "3", "--query", "2", "--test-query", "2",
                                                     "--tableau", "maml"])
