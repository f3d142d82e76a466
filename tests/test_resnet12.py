"""The ResNet-12 backbone (rkfast.models.resnet12), its DropBlock, and the image domains' --backbone option."""

from __future__ import annotations

import copy
import functools
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_batch, refused_in_one_line
from torch import nn
from torch.func import vmap
from torch.testing import assert_close

from rkfast import MetaOptimizer, models
from rkfast.cli import main
from rkfast.data.glyphs import render_glyphs
from rkfast.models import DropBlock, ResidualBlock, resnet12
from rkfast.norms import PerStepBatchNorm2d
from rkfast.tasks import Option, fewshot, get_domain
from rkfast.train import TrainConfig, evaluate_tasks, read_config

TINY = (4, 6, 8, 10)  # block widths that keep the tests fast


def resnet12_parameters(in_channels: int, num_classes: int, widths: tuple[int, ...]) -> int:
    """Per block (a -> b): three 3x3 convolutions without bias (9ab + 18b^2), a 1x1 shortcut (ab) and four
    BatchNorms (8b); then the linear head."""
    blocks = itertools.pairwise((in_channels, *widths))
    return sum(9 * a * b + 18 * b * b + a * b + 8 * b for a, b in blocks) + widths[-1] * num_classes + num_classes


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_follows_the_formula():
    assert count(resnet12()) == resnet12_parameters(3, 5, (64, 160, 320, 640)) == 12_427_525
    assert count(resnet12(1, 20, TINY, image_size=16)) == resnet12_parameters(1, 20, TINY)


def test_structure_and_output_shape():
    model = resnet12(3, 5)
    blocks = [m for m in model if isinstance(m, ResidualBlock)]
    assert len(blocks) == 4 and [b.conv1.out_channels for b in blocks] == [64, 160, 320, 640]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert all(isinstance(b.drop, nn.Identity) for b in blocks)  # no DropBlock by default
    seen: list[torch.Size] = []
    blocks[-1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert model(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    assert seen == [torch.Size([2, 640, 5, 5])]  # four halvings of 84
    for size in (16, 20, 33):
        assert resnet12(1, 7, TINY, image_size=size)(torch.randn(3, 1, size, size)).shape == (3, 7)


def test_too_small_images_and_bad_widths_are_refused():
    with pytest.raises(ValueError, match=r"at least 16 pixels .*got image_size 15"):
        resnet12(image_size=15)
    with pytest.raises(ValueError, match="four positive block widths"):
        resnet12(channels=(4, 6, 8))
    with pytest.raises(ValueError, match="drop_rate"):
        DropBlock(1.0)
    with pytest.raises(ValueError, match="block_size"):
        DropBlock(0.1, 0)


def test_batchnorm_uses_batch_statistics():
    model = resnet12(1, 5, TINY, image_size=16).double()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 16 and all(not m.track_running_stats for m in norms)
    assert not list(model.buffers()) and all("running" not in k for k in model.state_dict())
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    train_out = model.train()(x)
    assert torch.equal(model.eval()(x), train_out)  # eval() normalizes with the batch too


# -- DropBlock ------------------------------------------------------------------------------------------


def test_drop_block_is_the_identity_in_eval_mode():
    drop = DropBlock(0.5, 3).eval()
    x = torch.randn(4, 3, 10, 10)
    assert drop(x) is x
    model = resnet12(1, 5, TINY, image_size=16, drop_block=DropBlock(0.5, 5)).double().eval()
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    assert torch.equal(model(x), model(x))


def test_drop_block_sits_on_the_last_two_blocks_as_separate_copies():
    setting = DropBlock(0.1, 5)
    blocks = [m for m in resnet12(drop_block=setting) if isinstance(m, ResidualBlock)]
    assert [type(b.drop) for b in blocks] == [nn.Identity, nn.Identity, DropBlock, DropBlock]
    assert blocks[2].drop is not blocks[3].drop and blocks[2].drop is not setting
    assert (blocks[3].drop.drop_rate, blocks[3].drop.block_size) == (0.1, 5)


# bounds at 5 standard deviations or more of the dropped fraction (measured over 1000 and 300 draws: 0.300 with
# sd 0.014, whole maps dropped; 0.094 with sd 0.002, blocks overlapping): fresh random masks every run
@pytest.mark.parametrize("size,block,rate,low,high", [(5, 5, 0.3, 0.23, 0.37), (24, 5, 0.1, 0.075, 0.11)])
def test_drop_block_drops_squares_at_about_the_rate_and_rescales(size, block, rate, low, high):
    drop = DropBlock(rate, block).train()
    x = torch.ones(64, 16, size, size, dtype=torch.float64)
    y = drop(x)
    zero = y == 0
    assert low < zero.double().mean().item() < high
    kept = (~zero).sum()
    assert torch.allclose(y[~zero], torch.full_like(y[~zero], x.numel() / kept.item()))  # count / kept
    # every dropped unit lies in a whole dropped block x block square
    whole = -F.max_pool2d(-zero.double(), block, stride=1)  # 1 where a block x block window is all dropped
    covered = F.max_pool2d(F.pad(whole, (block - 1,) * 4), block, stride=1)
    assert torch.equal(covered.bool(), zero)


def test_drop_block_under_vmap_draws_a_mask_per_task():
    drop = DropBlock(0.3, 3).train()
    x = torch.ones(4, 2, 9, 9).expand(5, 4, 2, 9, 9)
    different = vmap(drop, randomness="different")(x)
    assert all(not torch.equal(different[0], different[t]) for t in range(1, 5))
    for t in range(5):  # each task rescaled by its own count / kept
        assert different[t].sum().item() == pytest.approx(x[t].numel())
    same = vmap(drop, randomness="same")(x)
    assert all(torch.equal(same[0], same[t]) for t in range(1, 5))
    model = resnet12(1, 5, TINY, image_size=16, drop_block=DropBlock(0.5, 5)).train()
    images = torch.randn(6, 1, 16, 16).expand(3, 6, 1, 16, 16)
    logits = vmap(model, randomness="different")(images)
    assert not torch.equal(logits[0], logits[1]) and not torch.equal(logits[1], logits[2])


# -- through MetaOptimizer ------------------------------------------------------------------------------


def tiny_resnet12(drop_block: DropBlock | None = None) -> nn.Module:
    return resnet12(1, 3, TINY, image_size=16, drop_block=drop_block).double()


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_step_under_vmap_equals_the_loop(first_order):
    model = tiny_resnet12()
    batch = classification_batch(tasks=3, ways=3, shots=2, query=2, size=16)
    outs, params = [], []
    for vectorize in (True, False):
        copied = copy.deepcopy(model)
        opt = MetaOptimizer(
            copied, F.cross_entropy, "maml", 0.1, "sgd", 0.1, first_order=first_order, vectorize=vectorize
        )
        outs.append(opt.step(batch))
        params.append(torch.cat([p.detach().flatten() for p in copied.parameters()]))
    assert_close(outs[0].loss, outs[1].loss, rtol=1e-10, atol=1e-10)
    assert_close(outs[0].direction, outs[1].direction, rtol=1e-10, atol=1e-10)
    assert_close(params[0], params[1], rtol=1e-10, atol=1e-10)
    assert outs[0].direction.abs().sum() > 0


@pytest.mark.parametrize("first_order", [False, True])
def test_per_step_norm_rows_follow_the_stages(first_order):
    model = resnet12(1, 3, TINY, image_size=16, per_step_norm=3).double()
    norms = [m for m in model.modules() if isinstance(m, PerStepBatchNorm2d)]
    assert len(norms) == 16 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert norms[0].weight.shape == (3, TINY[0])
    batch = classification_batch(tasks=2, ways=3, shots=2, query=2, size=16)
    outs = []
    for vectorize in (True, False):
        opt = MetaOptimizer(copy.deepcopy(model), F.cross_entropy, tableau="maml(2)", inner_lr=0.1,
                            first_order=first_order, vectorize=vectorize)
        outs.append(opt.compute(batch).direction.clone())
        layout = opt.layout
    assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-12)
    # maml(2) adapts with rows 0 and 1 and queries with row 2: second order differentiates through the
    # adaptation (every row gets a direction), first order holds the slopes constant (only the query's row)
    rows = layout.unflatten(outs[0])["0.bn1.weight"].abs().sum(dim=1)
    assert rows[2] > 0 and ((rows[:2] == 0).all() if first_order else (rows[:2] > 0).all()), rows


@pytest.mark.parametrize("vectorize", [True, False])
def test_meta_step_runs_with_drop_block(vectorize):
    model = tiny_resnet12(DropBlock(0.2, 5)).train()
    opt = MetaOptimizer(model, F.cross_entropy, "heun", 0.1, lr=1e-3, vectorize=vectorize)
    batch = classification_batch(tasks=2, ways=3, shots=2, query=2, size=16)
    out = opt.step(batch)
    assert torch.isfinite(out.direction).all() and out.direction.abs().sum() > 0
    assert torch.isfinite(opt.evaluate(batch, steps=(1,)).losses).all()


# -- the image domains' --backbone option ---------------------------------------------------------------


def test_backbone_option_builds_the_model():
    for name, channels in (("omniglot", 1), ("miniimagenet", 3), ("glyphs", 1)):
        domain = get_domain(name)
        options = domain.resolve_options({"backbone": "resnet12", "ways": 4})
        model = domain.make_model(options)
        assert isinstance(model[0], ResidualBlock) and model[0].conv1.in_channels == channels
        assert model[-1].out_features == 4
        default = domain.make_model(domain.resolve_options({}))
        assert isinstance(default[0], nn.Conv2d)  # conv4 stays the default
    with pytest.raises(ValueError, match="option backbone must be one of conv4, resnet12, got 'resnet18'"):
        get_domain("glyphs").resolve_options({"backbone": "resnet18"})
    with pytest.raises(ValueError, match="--backbone resnet12 needs --image-size >= 16"):
        TrainConfig("omniglot", options={"backbone": "resnet12", "image_size": 12}).resolved()


def test_option_choices():
    option = Option("kind", "a", "help", positive=False, choices=("a", "b"))
    assert option.check("b") == "b"
    with pytest.raises(ValueError, match="option kind must be one of a, b, got 'c'"):
        option.check("c")
    with pytest.raises(ValueError, match="default 'z' is not among its choices"):
        Option("kind", "z", "help", choices=("a", "b"))


@pytest.fixture
def small_glyphs(monkeypatch):
    """The glyphs domain on a few classes and the resnet12 at tiny widths: the command line end to end, fast."""
    monkeypatch.setattr(
        fewshot,
        "load_glyphs",
        lambda split, seed, image_size, cache_dir: render_glyphs(split, seed, image_size, drawings=6, max_classes=10),
    )
    monkeypatch.setattr(fewshot, "resnet12", functools.partial(models.resnet12, channels=TINY))


def test_glyphs_trains_with_resnet12_and_records_it(tmp_path: Path, small_glyphs):
    out = tmp_path / "run"
    argv = [
        "train",
        "glyphs",
        "--backbone",
        "resnet12",
        "--image-size",
        "16",
        "--out",
        str(out),
        "--quiet",
        "--iterations",
        "2",
        "--eval-every",
        "1",
        "--eval-tasks",
        "2",
        "--test-tasks",
        "2",
        "--meta-batch",
        "2",
        "--drop-block",
        "0.1",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and results["config"]["options"]["backbone"] == "resnet12"
    assert results["config"]["options"]["drop_block"] == 0.1
    assert json.loads((out / "config.json").read_text())["options"]["backbone"] == "resnet12"
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert "0.shortcut.0.weight" in state and state["5.weight"].shape == (5, TINY[-1])
    # a configuration written before the options existed still loads, as conv4
    old = json.loads((out / "config.json").read_text())
    del old["options"]["backbone"], old["options"]["drop_block"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert read_config(tmp_path / "old.json").resolved().options["backbone"] == "conv4"


def test_drop_block_option_builds_it_into_resnet12_only(capsys):
    domain = get_domain("miniimagenet")
    model = domain.make_model(domain.resolve_options({"backbone": "resnet12", "drop_block": 0.1}))
    drops = [m for m in model.modules() if isinstance(m, DropBlock)]
    assert [d.drop_rate for d in drops] == [0.1, 0.1]
    plain = domain.make_model(domain.resolve_options({"backbone": "resnet12"}))
    assert not any(isinstance(m, DropBlock) for m in plain.modules())
    refused_in_one_line(["train", "glyphs", "--drop-block", "0.1"], capsys, "--drop-block", "resnet12")
    refused_in_one_line(
        ["train", "glyphs", "--backbone", "resnet12", "--drop-block", "1.0"], capsys, "--drop-block", "[0, 1)"
    )


def test_meta_test_adapts_without_drop_block():
    # evaluate_tasks runs the model in eval() mode (DropBlock off): the same tasks give the same result, and
    # the model's own mode is back afterwards; in train() mode MetaOptimizer.evaluate draws new blocks
    torch.manual_seed(0)
    model = tiny_resnet12(DropBlock(0.5, 3)).train()
    opt = MetaOptimizer(model, F.cross_entropy, "maml", 0.1)
    chunks = [classification_batch(tasks=2, ways=3, shots=2, query=2, size=16)]
    first, second = (evaluate_tasks(opt, chunks, (1,), None).losses for _ in range(2))
    assert_close(first, second, rtol=0, atol=0)
    assert all(m.training for m in model.modules())
    dropped = [opt.evaluate(chunks[0], steps=(1,)).losses for _ in range(2)]
    assert not torch.equal(dropped[0], dropped[1])
    model.eval()
    assert_close(opt.evaluate(chunks[0], steps=(1,)).losses, first, rtol=0, atol=0)


def test_bad_backbone_is_refused_in_one_line(capsys):
    refused_in_one_line(["train", "glyphs", "--backbone", "resnet18"], capsys, "--backbone", "conv4", "resnet12")
    refused_in_one_line(
        ["train", "glyphs", "--backbone", "resnet12", "--image-size", "8"], capsys, "--image-size >= 16", "got 8"
    )
