"""The reference models of the few-shot benchmarks: the sinusoid MLP, conv4 and ResNet-12 (with DropBlock)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norms import PerStepBatchNorm2d

__all__ = [
    "sinusoid_mlp",
    "conv4",
    "resnet12",
    "ResidualBlock",
    "DropBlock",
    "SpatialMean",
    "RESNET12_MIN_IMAGE_SIZE",
    "eval_mode",
]

RESNET12_MIN_IMAGE_SIZE = 16  # four 2x2 max-pools leave 1 x 1 maps


def sinusoid_mlp(hidden: Sequence[int] = (40, 40)) -> nn.Sequential:
    """The sinusoid regression MLP of Finn et al. 2017: ``1 -> 40 -> 40 -> 1`` with ReLU."""
    sizes = [1, *hidden]
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 1))


def conv4(
    in_channels: int = 1, num_classes: int = 5, hidden: int = 64, image_size: int = 28, per_step_norm: int | None = None
) -> nn.Sequential:
    """The conv4 few-shot backbone: 4 x [conv 3x3, BatchNorm, ReLU, max-pool 2], then a linear head.

    BatchNorm is created with ``track_running_stats=False``: each task normalizes with its own batch
    statistics (MAML's convention) in ``train()`` and ``eval()`` mode alike. rkfast never updates running
    statistics (its calls use batch statistics, :mod:`rkfast.norms`), so tracked ones would stay at their
    initial values and ``eval()`` would normalize with those (mean 0, variance 1) instead of what the model
    was meta-trained with; the state dict has no running buffers either way.

    ``per_step_norm=S`` uses MAML++'s per-step batch norm instead
    (:class:`~rkfast.norms.PerStepBatchNorm2d` with ``S`` rows of weights and biases: stage / adaptation
    step ``j`` uses row ``min(j, S - 1)``); ``None`` (default) plain BatchNorm.
    """
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, hidden, 3, padding=1),
            _batch_norm(hidden, per_step_norm),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, size = hidden, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * size * size, num_classes))


def _batch_norm(channels: int, per_step: int | None) -> nn.Module:
    """conv4's and ResNet-12's norm layer: batch statistics, with ``per_step`` rows of affine parameters if
    given."""
    if per_step is None:
        return nn.BatchNorm2d(channels, track_running_stats=False)
    return PerStepBatchNorm2d(channels, per_step)


# -- ResNet-12 ------------------------------------------------------------------------------------------


class SpatialMean(nn.Module):
    """``[B, C, H, W] -> [B, C]``: global average pooling, the mean over the image."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): in ``train()`` mode, zeros ``block_size x block_size`` squares of each
    feature map and rescales the rest by ``count / kept``; the identity in ``eval()`` mode.

    Block corners are drawn independently per sample and channel with probability
    ``gamma = drop_rate / block_size**2 * (H * W) / ((H - block_size + 1) * (W - block_size + 1))`` (the
    paper's formula) among the positions where a whole block fits, so that about ``drop_rate`` of the units
    are dropped. A block larger than the feature map is cut to its size (a 5 x 5 block on a 5 x 5 map drops
    the whole map with probability ``drop_rate``). The rate is fixed (MetaOptNet's linear ramp of the rate
    over training is not built in). ``count / kept`` is taken over the whole input of a call (each task's
    under ``vmap``); an input with every unit dropped stays zero.

    The mask comes from ``torch.rand_like`` and tensor operations only: under
    ``torch.func.vmap(..., randomness="different")`` (rkfast's default) each task draws its own blocks.

    Args:
        drop_rate: the fraction of units to drop, in ``[0, 1)``.
        block_size: the side of the dropped squares (>= 1).
    """

    def __init__(self, drop_rate: float, block_size: int = 5) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"DropBlock drop_rate must be in [0, 1), got {drop_rate!r}")
        if block_size < 1:
            raise ValueError(f"DropBlock block_size must be >= 1, got {block_size!r}")
        self.drop_rate, self.block_size = float(drop_rate), int(block_size)

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        height, width = x.shape[-2:]
        block = min(self.block_size, height, width)
        fits_h, fits_w = height - block + 1, width - block + 1
        gamma = self.drop_rate / block**2 * (height * width) / (fits_h * fits_w)
        corners = (torch.rand_like(x[..., :fits_h, :fits_w]) < gamma).to(x.dtype)
        # a unit is dropped when a block whose top-left corner lies within block - 1 above / left of it is
        dropped = F.max_pool2d(F.pad(corners, (block - 1,) * 4), block, stride=1)
        keep = 1.0 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))


class ResidualBlock(nn.Module):
    """A ResNet-12 block: three [conv 3x3 (no bias), BatchNorm] with leaky ReLU 0.1 after the first two, a
    [conv 1x1, BatchNorm] shortcut, leaky ReLU 0.1 after the sum, a 2x2 max-pool, then ``drop`` (DropBlock
    or nothing). BatchNorm uses batch statistics (``track_running_stats=False``, as :func:`conv4`), or with
    ``per_step_norm=S`` MAML++'s per-step batch norm (as :func:`conv4`'s)."""

    def __init__(
        self, in_channels: int, out_channels: int, drop: DropBlock | None = None, per_step_norm: int | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = _batch_norm(out_channels, per_step_norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = _batch_norm(out_channels, per_step_norm)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = _batch_norm(out_channels, per_step_norm)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            _batch_norm(out_channels, per_step_norm),
        )
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Identity() if drop is None else drop

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        out = F.leaky_relu(out + self.shortcut(x), 0.1)
        return self.drop(self.pool(out))


def resnet12(
    in_channels: int = 3,
    num_classes: int = 5,
    channels: Sequence[int] = (64, 160, 320, 640),
    image_size: int = 84,
    drop_block: DropBlock | None = None,
    per_step_norm: int | None = None,
) -> nn.Sequential:
    """The ResNet-12 few-shot backbone (MetaOptNet, Lee et al. 2019; the ProtoNet-style ResNet-12):
    4 :class:`ResidualBlock` s of widths ``channels``, global average pooling (:class:`SpatialMean`) and a
    linear head to ``num_classes`` logits. 84-pixel images end as 5 x 5 maps before the pooling.

    With 3 input channels and 5 classes it has 12,427,525 parameters. The convolutions start as Kaiming
    normal (``fan_out``, leaky ReLU), the BatchNorm layers at weight 1 and bias 0. BatchNorm keeps no running
    statistics: every call normalizes with its own batch (see :func:`conv4`).

    Args:
        in_channels, num_classes: the image channels and the number of logits.
        channels: the widths of the four blocks.
        image_size: the side of the (square) input images; it must survive four halvings
            (>= :data:`RESNET12_MIN_IMAGE_SIZE`, 16). The model itself takes any size that large.
        drop_block: a :class:`DropBlock` applied (a copy each) after the last two blocks, as in MetaOptNet
            (``DropBlock(0.1, 5)``); ``None`` (default): none.
        per_step_norm: ``S`` rows of BatchNorm weights and biases per layer, MAML++'s per-step batch norm
            (:class:`~rkfast.norms.PerStepBatchNorm2d`, as :func:`conv4`'s); ``None`` (default): plain BatchNorm.

    Raises:
        ValueError: an image too small for four 2x2 max-pools, or not four positive widths.
    """
    if image_size < RESNET12_MIN_IMAGE_SIZE:
        raise ValueError(
            f"resnet12 needs images of at least {RESNET12_MIN_IMAGE_SIZE} pixels (four 2x2 max-pools), "
            f"got image_size {image_size}"
        )
    widths = tuple(channels)
    if len(widths) != 4 or min(widths) < 1:
        raise ValueError(f"resnet12 takes four positive block widths, got channels {channels!r}")
    blocks: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise((in_channels, *widths))):
        drop = copy.deepcopy(drop_block) if drop_block is not None and index >= 2 else None
        blocks.append(ResidualBlock(fan_in, fan_out, drop, per_step_norm))
    model = nn.Sequential(*blocks, SpatialMean(), nn.Linear(widths[-1], num_classes))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
    return model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in ``eval()`` mode within the block (dropout and :class:`DropBlock` off: they regularize
    meta-training, not meta-testing), every submodule's own mode restored after it, also on an exception.
    Norm layers are unaffected where rkfast calls them with batch statistics
    (:func:`rkfast.norms.batch_statistics`)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
