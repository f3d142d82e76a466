"""Few-shot image classification: N-way K-shot episodes from cached image arrays, and the registered
``omniglot``, ``miniimagenet`` and ``glyphs`` domains.

:class:`EpisodeSampler` draws a whole meta-batch of episodes at once from a split's ``uint8`` array
(:class:`~rkfast.data.images.ClassImages`): per task ``ways`` distinct classes (labelled ``0..N-1`` in a
random order per task), and per class ``shots + query`` distinct drawings, the first ``shots`` for the
support set and the rest for the query set (disjoint). The gather and the conversion to float happen on the
run's device in a few tensor operations, so sampling stays a small fraction of a meta-step
(``benchmarks/episodes.py`` measures it).

The defaults follow Finn et al. 2017 (MAML): Omniglot 5-way: meta-batch 32, one inner step of 0.4; 20-way:
meta-batch 16, five inner steps of 0.1; MiniImageNet: meta-batch 4 (1-shot) or 2 (5-shot), five inner
steps of 0.01, 15 query images per class, ten adaptation steps at meta-test; Adam 1e-3 outside.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batch import TaskBatch
from ..data.glyphs import load_glyphs
from ..data.images import ClassImages, DataError
from ..data.miniimagenet import load_miniimagenet
from ..data.omniglot import load_omniglot
from ..figures import new_figure, save_figure
from ..models import RESNET12_MIN_IMAGE_SIZE, DropBlock, SpatialMean, eval_mode, resnet12
from .registry import Defaults, Domain, Metric, Option, TrainedRun, kept_params, meta_test_tasks, register
from .sampling import task_chunks

__all__ = ["EpisodeSampler", "OMNIGLOT", "MINIIMAGENET", "GLYPHS", "plot_episodes"]

SPLITS = ("train", "val", "test")
BACKBONES = ("conv4", "resnet12")  # the --backbone choices; conv4 is the default


@dataclass
class EpisodeSampler:
    """N-way K-shot episodes of one split, a whole meta-batch per call.

    Args:
        data: the split's images.
        ways, shots, query: classes per task, support and query images per class.
        device: where the batches are made (the images are copied there once).
        dtype: the image dtype of the batches (pixels scaled to [0, 1]).

    Raises:
        DataError: a split with fewer classes than ``ways`` or fewer drawings than ``shots + query``.
    """

    data: ClassImages
    ways: int
    shots: int
    query: int
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    images: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        name = self.data.meta.get("dataset", "the data")
        split = self.data.meta.get("split", "this split")
        if self.data.num_classes < self.ways:
            raise DataError(f"{name} {split} has {self.data.num_classes} classes, fewer than --ways {self.ways}")
        if self.data.per_class < self.shots + self.query:
            raise DataError(
                f"{name} {split} has {self.data.per_class} images per class, fewer than --shots "
                f"{self.shots} + --query {self.query}"
            )
        # one copy on the device (a cached split is a read-only memory map); uint8 keeps it 4x smaller
        self.images = torch.from_numpy(np.array(self.data.images, copy=True)).to(self.device)

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """``num_tasks`` episodes: support ``[T, N*K, C, H, W]`` and query ``[T, N*Q, C, H, W]`` images with
        labels ``[T, N*K]``, ``[T, N*Q]`` in ``0..N-1`` (the same generator state gives the same episodes)."""
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        classes, drawings = self.data.num_classes, self.data.per_class
        per_class = self.shots + self.query
        # random keys, sorted: distinct classes per task and distinct drawings per class, without a loop
        chosen = torch.rand(num_tasks, classes, generator=generator).argsort(dim=1)[:, : self.ways]
        picks = torch.rand(num_tasks, self.ways, drawings, generator=generator).argsort(dim=2)[..., :per_class]
        chosen, picks = chosen.to(self.images.device), picks.to(self.images.device)
        images = self.images[chosen.unsqueeze(-1), picks]  # [T, N, K+Q, C, H, W] uint8
        images = images.to(self.dtype).div_(255.0)
        labels = torch.arange(self.ways, device=images.device).view(1, -1, 1)  # position = label: random per task
        labels = labels.expand(num_tasks, self.ways, per_class)

        def part(t: Tensor, lo: int, hi: int) -> Tensor:
            return t[:, :, lo:hi].reshape(num_tasks, self.ways * (hi - lo), *t.shape[3:])

        k = self.shots
        return TaskBatch(part(images, 0, k), part(labels, 0, k), part(images, k, per_class), part(labels, k, per_class))


# -- models -----------------------------------------------------------------------------------------------


def conv4(in_channels: int, ways: int, filters: int, image_size: int, strided: bool) -> nn.Sequential:
    """The conv4 backbone as published: ``strided`` (Omniglot in Finn et al. 2017): 4 x [conv 3x3 stride 2,
    BatchNorm, ReLU], then the mean over space; else (MiniImageNet): 4 x [conv 3x3, BatchNorm, ReLU,
    max-pool 2], flattened. A linear head gives the ``ways`` logits."""
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, filters, 3, stride=2 if strided else 1, padding=1),
            nn.BatchNorm2d(filters, track_running_stats=False),
            nn.ReLU(),
        ]
        if not strided:
            layers.append(nn.MaxPool2d(2))
        channels, size = filters, (size + 1) // 2 if strided else size // 2
    if size < 1:
        raise ValueError(f"image size {image_size} is too small for four halvings")
    head = (
        [SpatialMean(), nn.Linear(filters, ways)] if strided else [nn.Flatten(), nn.Linear(filters * size * size, ways)]
    )
    return nn.Sequential(*layers, *head)


# -- plots ------------------------------------------------------------------------------------------------


def _predictions(run: TrainedRun, batch: TaskBatch, steps: int) -> Tensor:
    """Query predictions ``[T, N*Q]`` of the run's model after ``steps`` adaptation steps on each support set."""
    opt = run.opt
    with eval_mode(opt.model):  # as the meta-test (rkfast.train.evaluate_tasks)
        adapted = opt.evaluate(batch, steps=(steps,), step_size=run.config.test_step, keep_params=True)
        rows = kept_params(adapted)[-1]  # [T, N]
        with torch.no_grad():
            return opt.task_models(rows)(batch.query_x).argmax(-1)


def plot_episodes(run: TrainedRun, path: Path | str, episodes: int = 3, queries: int = 10) -> None:
    """A few meta-test episodes: the support images with their labels, and query images with the label the
    adapted model predicts (green: right, red: wrong) after the protocol's last number of steps."""
    defaults, options = run.defaults, run.config.options
    sampler = run.domain.make_tasks(options, "test", run.opt.device)
    batch = task_chunks(sampler, min(episodes, meta_test_tasks(run)), defaults.eval_chunk, run.task_generator("test"))[
        0
    ]
    steps = defaults.test_steps[-1]
    predicted = _predictions(run, batch, steps).cpu()
    ways, shots = options["ways"], options["shots"]
    shown_support = min(ways * shots, 10)
    shown_query = min(queries, batch.query_x.shape[1])
    cols = shown_support + shown_query
    fig = new_figure(figsize=(0.9 * cols + 1, 1.3 * batch.num_tasks + 0.6))
    for t in range(batch.num_tasks):
        images: list[tuple[Tensor, int, int | None]] = [
            (batch.support_x[t, i], int(batch.support_y[t, i]), None) for i in range(shown_support)
        ]
        order = torch.randperm(batch.query_x.shape[1], generator=torch.Generator().manual_seed(t))[:shown_query]
        images += [(batch.query_x[t, i], int(batch.query_y[t, i]), int(predicted[t, i])) for i in order.tolist()]
        for j, (image, label, guess) in enumerate(images):
            ax = fig.add_subplot(batch.num_tasks, cols, t * cols + j + 1)
            pixels = image.detach().float().cpu().permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if guess is None:
                ax.set_title(f"{label}", fontsize=8)
            else:
                ax.set_title(f"{guess}", fontsize=8, color="green" if guess == label else "red")
                for spine in ax.spines.values():
                    spine.set_edgecolor("green" if guess == label else "red")
                    spine.set_linewidth(1.5)
    fig.suptitle(
        f"{run.domain.name}: {ways}-way {shots}-shot test episodes, tableau {run.tableau.name}. Left: "
        f"support with labels; right: query with the prediction after {steps} steps (green right, red wrong)",
        fontsize=9,
    )
    save_figure(fig, path)


# -- the domains ------------------------------------------------------------------------------------------

Loader = Callable[[Mapping[str, Any], str], ClassImages]


def _sampler(load: Loader, channels: int) -> Callable[[Mapping[str, Any], str, torch.device], EpisodeSampler]:
    def make(options: Mapping[str, Any], split: str, device: torch.device) -> EpisodeSampler:
        data = load(options, split)
        if data.image_shape[0] != channels:
            raise DataError(f"expected {channels}-channel images, got {data.image_shape}")
        query = options["query"] if split == "train" else options["test_query"]
        return EpisodeSampler(data, options["ways"], options["shots"], query, device)

    return make


def _root(options: Mapping[str, Any], dataset: str, layout: str) -> Path:
    if not options["root"]:
        raise DataError(f"{dataset} needs --root DIR: the folder that holds {layout} (nothing is downloaded)")
    return Path(options["root"]).expanduser()


def _load_omniglot(options: Mapping[str, Any], split: str) -> ClassImages:
    root = _root(options, "omniglot", "images_background/ and images_evaluation/")
    return load_omniglot(
        root,
        split,
        image_size=options["image_size"],
        cache_dir=options["cache_dir"] or None,
        split_rule=options["split_rule"],
        train_characters=options["train_characters"],
        val_characters=options["val_characters"],
    )


def _load_miniimagenet(options: Mapping[str, Any], split: str) -> ClassImages:
    root = _root(options, "miniimagenet", "train.csv, val.csv, test.csv and images/, or mini-imagenet-cache-*.pkl")
    return load_miniimagenet(root, split, image_size=options["image_size"], cache_dir=options["cache_dir"] or None)


def _load_glyphs(options: Mapping[str, Any], split: str) -> ClassImages:
    return load_glyphs(
        split, seed=options["data_seed"], image_size=options["image_size"], cache_dir=options["cache_dir"] or None
    )


def _common_options(
    ways: int, shots: int, query: int, test_query: int, filters: int, image_size: int
) -> tuple[Option, ...]:
    return (
        Option("ways", ways, "classes per task (N)"),
        Option("shots", shots, "support images per class (K)"),
        Option(
            "query",
            query,
            "query images per class of a training task (Finn et al.: as many as --shots "
            "for Omniglot, 15 for MiniImageNet)",
        ),
        Option("test_query", test_query, "query images per class of a held-out and meta-test task"),
        Option(
            "backbone",
            "conv4",
            "the model: 'conv4' (Finn et al. 2017) or 'resnet12' (MetaOptNet's ResNet-12, widths "
            f"64-160-320-640, rkfast.models.resnet12; needs --image-size >= {RESNET12_MIN_IMAGE_SIZE})",
            positive=False,
            choices=BACKBONES,
        ),
        Option(
            "drop_block",
            0.0,
            "resnet12's DropBlock rate after its last two blocks, in [0, 1) (MetaOptNet: 0.1; 0: none); meta-training "
            "only: held-out and meta-test tasks adapt without it",
            positive=False,
        ),
        Option("filters", filters, "convolution filters per layer of conv4 (resnet12 has its own widths)"),
        Option("image_size", image_size, "images are resized to this many pixels square"),
        Option(
            "cache_dir",
            "",
            "where decoded images are cached (default: $RKFAST_CACHE or ~/.cache/rkfast)",
            positive=False,
        ),
    )


def _model(channels: int, strided: bool) -> Callable[[Mapping[str, Any]], nn.Module]:
    """The domain's ``make_model``: the ``backbone`` option's model for ``channels``-channel images."""

    def make(o: Mapping[str, Any]) -> nn.Module:
        if o["backbone"] == "resnet12":
            drop = DropBlock(o["drop_block"]) if o["drop_block"] > 0 else None
            return resnet12(channels, o["ways"], image_size=o["image_size"], drop_block=drop)
        return conv4(channels, o["ways"], o["filters"], o["image_size"], strided)

    return make


def _check_backbone(o: Mapping[str, Any]) -> None:
    """The ``backbone`` option against the image size (ResNet-12 halves the images four times) and the
    DropBlock rate (ResNet-12's only)."""
    if o["backbone"] == "resnet12" and o["image_size"] < RESNET12_MIN_IMAGE_SIZE:
        raise ValueError(
            f"--backbone resnet12 needs --image-size >= {RESNET12_MIN_IMAGE_SIZE} (four 2x2 max-pools), "
            f"got {o['image_size']}"
        )
    if not 0.0 <= o["drop_block"] < 1.0:
        raise ValueError(f"--drop-block must be in [0, 1), got {o['drop_block']!r}")
    if o["drop_block"] > 0 and o["backbone"] != "resnet12":
        raise ValueError(f"--drop-block is resnet12's (--backbone resnet12), not {o['backbone']}'s")


def _describe(o: Mapping[str, Any]) -> str:
    return f"{o['ways']}-way {o['shots']}-shot, {o['test_query']} query images per class"


def _protocol(o: Mapping[str, Any]) -> dict[str, Any]:
    return {"ways": o["ways"], "shots": o["shots"], "query_per_class": o["test_query"], "image_size": o["image_size"]}


ACCURACY = (
    Metric("accuracy", "accuracy", "query accuracy", "acc", higher_is_better=True),
    Metric("loss", "loss", "query loss", "loss"),
)


def _image_domain(
    name: str,
    description: str,
    load: Loader,
    channels: int,
    strided: bool,
    defaults: Defaults,
    options: tuple[Option, ...],
    defaults_by_options: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> Domain:
    """A registered N-way K-shot domain: what the image domains share (loss, metrics, protocol, plots)."""
    return register(
        Domain(
            name=name,
            description=description,
            make_tasks=_sampler(load, channels),
            make_model=_model(channels, strided),
            loss_fn=F.cross_entropy,
            metrics=ACCURACY,
            defaults=defaults,
            options=options,
            describe_test=_describe,
            test_protocol=_protocol,
            plots={"episodes.png": plot_episodes},
            defaults_by_options=defaults_by_options,
            check_options=_check_backbone,
        )
    )


def _omniglot_defaults(o: Mapping[str, Any]) -> dict[str, Any]:
    if o["ways"] >= 20:  # Finn et al. 2017: 20-way with 5 inner steps of 0.1, 16 tasks per meta-batch
        return {"meta_batch": 16, "inner_lr": 0.1, "tableau": "maml(5)"}
    return {}


OMNIGLOT = _image_domain(
    "omniglot",
    "Omniglot few-shot classification (Lake et al. 2015) from the original release's files; "
    "characters in 4 rotations are the classes; conv4 with strided convolutions (or --backbone resnet12)",
    _load_omniglot,
    channels=1,
    strided=True,
    defaults=Defaults(
        iterations=60000,
        meta_batch=32,
        inner_lr=0.4,
        lr=1e-3,
        eval_every=1000,
        eval_tasks=300,
        test_tasks=600,
        test_steps=(1, 3, 10),
        eval_steps=(1, 3),
        eval_chunk=100,
        source="Finn et al. 2017: 5-way meta-batch 32, one inner step of 0.4; 20-way meta-batch 16, "
        "5 inner steps of 0.1; Adam 1e-3",
    ),
    options=(
        Option("root", "", "the Omniglot folder (images_background/, images_evaluation/)", positive=False),
        *_common_options(5, 1, 1, 5, 64, 28),
        Option(
            "split_rule",
            "finn",
            "'finn': all characters shuffled with a fixed seed, then train / val / "
            "test; 'alphabets': background alphabets train (5 held out for val), "
            "evaluation alphabets test",
            positive=False,
            choices=("finn", "alphabets"),
        ),
        Option("train_characters", 1100, "characters (each in 4 rotations) of the 'finn' training split"),
        Option("val_characters", 100, "characters of the 'finn' validation split (the rest, 423, test)"),
    ),
    defaults_by_options=_omniglot_defaults,
)


def _miniimagenet_defaults(o: Mapping[str, Any]) -> dict[str, Any]:
    return {"meta_batch": 4 if o["shots"] == 1 else 2}  # Finn et al. 2017


MINIIMAGENET = _image_domain(
    "miniimagenet",
    "MiniImageNet few-shot classification (Vinyals et al. 2016, the Ravi & Larochelle split) from "
    "its CSV + images or pickled-cache files; conv4 with max-pooling (or --backbone resnet12)",
    _load_miniimagenet,
    channels=3,
    strided=False,
    defaults=Defaults(
        iterations=60000,
        meta_batch=4,
        inner_lr=0.01,
        lr=1e-3,
        tableau="maml(5)",
        eval_every=1000,
        eval_tasks=300,
        test_tasks=600,
        test_steps=(1, 10),
        eval_steps=(1, 10),
        eval_chunk=50,
        source="Finn et al. 2017: 5 inner steps of 0.01, meta-batch 4 (1-shot) / 2 (5-shot), "
        "15 query images per class, 10 steps at meta-test; Adam 1e-3",
    ),
    options=(Option("root", "", "the MiniImageNet folder", positive=False), *_common_options(5, 1, 15, 15, 32, 84)),
    defaults_by_options=_miniimagenet_defaults,
)


GLYPHS = _image_domain(
    "glyphs",
    "built-in Omniglot-style benchmark rendered from the fonts matplotlib ships (alphabets = Unicode "
    "blocks, classes = characters, drawings = random affine distortions); needs no data",
    _load_glyphs,
    channels=1,
    strided=True,
    defaults=Defaults(
        iterations=3000,
        meta_batch=16,
        inner_lr=0.4,
        lr=1e-3,
        eval_every=500,
        eval_tasks=200,
        test_tasks=600,
        test_steps=(1, 3, 10),
        eval_steps=(1, 3),
        eval_chunk=100,
        source="Omniglot's (Finn et al. 2017: one inner step of 0.4, Adam 1e-3) at a CPU budget: "
        "32 filters, meta-batch 16, 3000 meta-steps",
    ),
    options=(
        Option("data_seed", 0, "seed of the rendered drawings", positive=False),
        *_common_options(5, 1, 1, 5, 32, 28),
    ),
)
