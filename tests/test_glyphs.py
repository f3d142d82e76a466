"""The built-in ``glyphs`` benchmark: catalog, splits, drawings, determinism, meta and the cache.

Renders are small (a few classes, a few drawings); the catalog is built once per process (about 2 s).
"""

from __future__ import annotations

import unicodedata
from collections import Counter

import matplotlib
import numpy as np
import pytest

from rkfast.data import glyphs
from rkfast.data.glyphs import (ALPHABET_SPLITS, ALPHABETS, SPLITS, balanced_split, glyph_catalog, load_glyphs,
                                render_glyphs, split_classes)
from rkfast.data.images import ClassImages, DataError


def code_points(data: ClassImages) -> list[int]:
    return [int(name.removeprefix("U+"), 16) for name in data.classes]


# ----------------------------------------------------------------------------------------- catalog and splits

def test_catalog_classes_are_distinct_drawable_characters():
    catalog = glyph_catalog()
    assert len(catalog) >= 1000
    assert len({glyph.code_point for glyph in catalog}) == len(catalog)
    for glyph in catalog:
        char = chr(glyph.code_point)
        assert unicodedata.category(char)[0] in ALPHABETS[glyph.alphabet][1]  # no marks, spaces, controls
        assert not unicodedata.decomposition(char)  # no accented or compatibility copies
        assert glyph.faces and set(glyph.faces) <= set(glyphs.FONT_FACES)
        assert glyph.name == f"U+{glyph.code_point:04X}"


def test_lookalikes_are_one_class_but_details_keep_classes_apart():
    kept = {glyph.code_point for glyph in glyph_catalog()}
    # Latin A, Greek Alpha, Cyrillic A: one class, the first (Latin)
    assert 0x41 in kept and 0x391 not in kept and 0x410 not in kept
    # a dot tells Arabic sad from dad, a broken line one hexagram from another, a dot's place Braille patterns
    assert {0x635, 0x636} <= kept
    assert {0x4DC0, 0x4DC1} <= kept
    assert {0x2801, 0x2802, 0x2804, 0x2808} <= kept


def test_splits_are_disjoint_by_alphabet_and_class_and_large_enough():
    assert set(ALPHABET_SPLITS) == set(ALPHABETS) and set(ALPHABET_SPLITS.values()) == set(SPLITS)
    classes = {split: split_classes(split) for split in SPLITS}
    for split, members in classes.items():
        assert {glyph.alphabet for glyph in members} == {a for a, s in ALPHABET_SPLITS.items() if s == split}
        assert len(members) >= 20 * 5  # 20-way tasks with room to spare
    code_points_of = {split: {glyph.code_point for glyph in members} for split, members in classes.items()}
    assert sum(map(len, code_points_of.values())) == len(set().union(*code_points_of.values())) == len(glyph_catalog())
    total = len(glyph_catalog())
    assert len(classes["train"]) >= 600
    for split, share in glyphs.SPLIT_SHARES.items():
        assert abs(len(classes[split]) / total - share) < 0.05, (split, len(classes[split]), total)


def test_balanced_split_rule():
    sizes = {"e": 5, "d": 5, "c": 10, "b": 30, "a": 50}  # 100 classes; shortfalls relative to the shares:
    # a: all 100, the first split wins -> train (50); b: train 20/.7, val 10/.1, test 20/.2 -> val (first of
    # the tie); c: val now -20/.1 -> test; d (ties by name): train 28.6, test 10/.2 = 50 -> test; e: train
    # 28.6, test 5/.2 = 25 -> train
    split = balanced_split(sizes)
    assert split == {"a": "train", "b": "val", "c": "test", "d": "test", "e": "train"}
    assert split == balanced_split(dict(reversed(sizes.items())))  # order of the dict does not matter


# ----------------------------------------------------------------------------------------- drawings

@pytest.fixture(scope="module")
def sample() -> dict[str, ClassImages]:
    """Every split, 40 classes evenly spaced through it, 4 drawings each."""
    return {split: render_glyphs(split, seed=0, drawings=4, max_classes=40) for split in SPLITS}


def test_shapes_dtype_and_names(sample):
    for split, data in sample.items():
        assert data.images.shape == (40, 4, 1, 28, 28)
        assert data.images.dtype == np.uint8 and data.images.flags.c_contiguous
        assert len(set(data.classes)) == 40
        assert {glyph.name for glyph in split_classes(split)} >= set(data.classes)
        # evenly spaced: several alphabets, not the first 40 classes of one
        assert len(data.meta["alphabets"]) >= 3


def test_drawings_have_sane_ink_and_differ(sample):
    for data in sample.values():
        ink = data.images.astype(np.float64).mean(axis=(2, 3, 4)) / 255  # [classes, drawings]
        assert ink.min() > 0.003 and ink.max() < 0.8
        assert (data.images.max(axis=(2, 3, 4)) == 255).all()  # each drawing's strongest ink is full ink
        flat = data.images.reshape(data.num_classes, data.per_class, -1).astype(np.int16)
        for drawings in flat:  # every two drawings of a class differ
            differences = np.abs(drawings[:, None] - drawings[None, :]).sum(-1)
            assert (differences + np.eye(len(drawings), dtype=np.int64) > 0).all()


def test_every_class_of_every_split_has_ink():
    for split in SPLITS:
        data = render_glyphs(split, drawings=2, image_size=16)
        assert data.num_classes == len(split_classes(split))
        assert (data.images.max(axis=(2, 3, 4)) == 255).all()
        assert (data.images.astype(np.float64).mean(axis=(2, 3, 4)) / 255).min() > 0.003


def test_classes_differ(sample):
    for data in sample.values():
        means = data.images.astype(np.float64).mean(axis=1).reshape(data.num_classes, -1) / 255
        distance = np.abs(means[:, None] - means[None, :]).mean(-1)
        np.fill_diagonal(distance, np.inf)
        assert distance.min() > 0.005


def test_same_seed_same_arrays_other_seed_other_drawings(sample):
    again = render_glyphs("test", seed=0, drawings=4, max_classes=40)
    assert np.array_equal(again.images, sample["test"].images) and again.classes == sample["test"].classes
    other = render_glyphs("test", seed=1, drawings=4, max_classes=40)
    assert other.classes == sample["test"].classes
    assert all(not np.array_equal(a, b) for a, b in zip(other.images, sample["test"].images))


def test_drawings_depend_only_on_seed_code_point_and_index():
    full = render_glyphs("val", seed=5, drawings=3)
    subset = render_glyphs("val", seed=5, drawings=5, max_classes=17, chunk=7)
    rows = [full.classes.index(name) for name in subset.classes]
    assert np.array_equal(full.images[rows], subset.images[:, :3])


def test_image_size_option():
    small = render_glyphs("val", drawings=2, max_classes=5, image_size=16)
    large = render_glyphs("val", drawings=2, max_classes=5, image_size=48)
    assert small.images.shape == (5, 2, 1, 16, 16) and large.images.shape == (5, 2, 1, 48, 48)
    assert small.meta["image_size"] == 16 and small.classes == large.classes
    # the same drawings at another resolution: the ink sits in the same places
    downsized = large.images.reshape(5, 2, 1, 16, 3, 16, 3).astype(np.float64).mean(axis=(4, 6))
    correlation = np.corrcoef(downsized.ravel(), small.images.astype(np.float64).ravel())[0, 1]
    assert correlation > 0.8


def test_meta(sample):
    meta = sample["val"].meta
    assert meta["dataset"] == "glyphs" and meta["split"] == "val" and meta["seed"] == 0
    assert meta["image_size"] == 28 and meta["drawings"] == 4 and meta["classes"] == 40
    assert meta["matplotlib"] == matplotlib.__version__ and meta["pixels"].startswith("uint8")
    assert set(meta["fonts"]) <= set(glyphs.FONT_FACES) and meta["split_rule"] == glyphs.SPLIT_RULE
    counted = Counter(glyph.alphabet for glyph in split_classes("val") if glyph.name in sample["val"].classes)
    assert meta["alphabets"] == dict(counted)


@pytest.mark.parametrize("arguments", [{"split": "training"}, {"split": "val", "image_size": 4},
                                       {"split": "val", "drawings": 0}, {"split": "val", "seed": -1},
                                       {"split": "val", "max_classes": 0}])
def test_bad_arguments(arguments):
    with pytest.raises(DataError):
        render_glyphs(**arguments)


def test_load_glyphs_renders_once_then_reads_the_cache(tmp_path):
    first = load_glyphs("val", seed=2, drawings=2, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("glyphs-val-28px-*.npy"))) == 1
    again = load_glyphs("val", seed=2, drawings=2, cache_dir=tmp_path)
    assert isinstance(again.images, np.memmap) and np.array_equal(first.images, again.images)
    assert again.classes == first.classes and again.meta["seed"] == 2
    assert np.array_equal(again.images, render_glyphs("val", seed=2, drawings=2).images)
    with pytest.raises(DataError):
        load_glyphs("training", cache_dir=tmp_path)
