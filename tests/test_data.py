"""Omniglot and MiniImageNet loaders and the decoded-image cache, on tiny fixtures in the published layouts.

The fixtures are drawn here (no download): Omniglot characters are random polylines (one shape per
character, jittered per drawing, so classes and rotations differ), MiniImageNet classes are colour
gradients (JPEG) or random pixels (pickle).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from rkfast.data import _source
from rkfast.data import miniimagenet as miniimagenet_module
from rkfast.data.cache import CacheWarning, cache_dir, cache_files, cached, fingerprint
from rkfast.data.images import ClassImages, DataError
from rkfast.data.miniimagenet import load_miniimagenet
from rkfast.data.omniglot import load_omniglot

# 10 characters in 3 background and 2 evaluation alphabets; the "finn" split takes 6 / 2 / 2 of them
BACKGROUND = (("Alpha", 2), ("Beta", 2), ("Gamma", 2))
EVALUATION = (("Delta", 2), ("Epsilon", 2))
DRAWINGS = 20
FINN = {"train_characters": 6, "val_characters": 2}
WNIDS = ("n01532829", "n01558993", "n01704323")
PER_CLASS = 4


# ----------------------------------------------------------------------------------------- fixtures

def draw_character(path: Path, character: int, drawing: int, size: int = 105) -> None:
    """A 1-bit black-on-white PNG like Omniglot's: the character's polyline, jittered per drawing."""
    points = np.random.RandomState(character).randint(12, size - 12, (5, 2))
    jitter = np.random.RandomState(1000 * character + drawing).randint(-3, 4, points.shape)
    image = Image.new("1", (size, size), 1)
    ImageDraw.Draw(image).line([tuple(p) for p in (points + jitter).tolist()], fill=0, width=5)
    image.save(path)


def make_omniglot(root: Path, background=BACKGROUND, evaluation=EVALUATION, drawings=DRAWINGS) -> Path:
    """``root/images_background/<Alphabet>/characterNN/NNNN_DD.png`` and ``images_evaluation/...``."""
    character = 0
    for folder, alphabets in (("images_background", background), ("images_evaluation", evaluation)):
        for alphabet, count in alphabets:
            for number in range(1, count + 1):
                character += 1
                character_dir = root / folder / alphabet / f"character{number:02d}"
                character_dir.mkdir(parents=True)
                for drawing in range(1, drawings + 1):
                    draw_character(character_dir / f"{character:04d}_{drawing:02d}.png", character, drawing)
    return root


def class_colour(class_index: int, image_index: int, height: int = 84, width: int = 84) -> np.ndarray:
    """A smooth RGB image (JPEG keeps it nearly exact): a per-class colour plus a per-image gradient."""
    base = np.array([60 + 70 * class_index, 200 - 50 * class_index, 40 + 30 * image_index], dtype=float)
    ramp = np.linspace(0, 30, width)[None, :, None]
    return np.clip(base + ramp + np.zeros((height, 1, 1)), 0, 255).astype(np.uint8)


def make_miniimagenet_csv(root: Path, split: str = "train", per_class: int = PER_CLASS,
                          size: tuple[int, int] = (84, 84)) -> Path:
    """``root/<split>.csv`` (``filename,label``) and ``root/images/<wnid><NNNNNNNN>.jpg``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["filename,label"]
    for class_index, wnid in enumerate(WNIDS):
        for image_index in range(per_class):
            filename = f"{wnid}{image_index + 1:08d}.jpg"
            Image.fromarray(class_colour(class_index, image_index, *size)).save(root / "images" / filename,
                                                                                quality=95)
            lines.append(f"{filename},{wnid}")
    (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def make_miniimagenet_pickle(root: Path, split: str = "train", per_class: int = PER_CLASS
                             ) -> tuple[Path, dict]:
    """``root/mini-imagenet-cache-<split>.pkl``, the classes' images interleaved (as any order may be)."""
    root.mkdir(parents=True, exist_ok=True)
    count = len(WNIDS) * per_class
    content = {"image_data": np.random.RandomState(0).randint(0, 256, (count, 84, 84, 3)).astype(np.uint8),
               "class_dict": {wnid: list(range(c, count, len(WNIDS))) for c, wnid in enumerate(WNIDS)}}
    with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as file:
        pickle.dump(content, file)
    return root, content


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory) -> Path:
    """Read-only Omniglot fixture shared by the tests that do not change it."""
    return make_omniglot(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture(scope="module")
def mini_csv_root(tmp_path_factory) -> Path:
    return make_miniimagenet_csv(tmp_path_factory.mktemp("mini_csv"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """No test writes to the user's cache, even one that forgets cache_dir=."""
    monkeypatch.setenv("RKFAST_CACHE", str(tmp_path / "default-cache"))


def count_decodes(monkeypatch) -> list[Path]:
    """The paths :func:`_source.decode_image` is called with, from now on."""
    calls: list[Path] = []
    decode = _source.decode_image

    def counting(path, *args, **kwargs):
        calls.append(path)
        return decode(path, *args, **kwargs)

    monkeypatch.setattr(_source, "decode_image", counting)
    return calls


def forbid_decoding(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("decoded although the cache holds the data")

    monkeypatch.setattr(_source, "decode_image", fail)


def assert_data_error(call, cache: Path, *fragments) -> DataError:
    """``call()`` raises a DataError whose message holds every fragment, and nothing was cached."""
    with pytest.raises(DataError) as caught:
        call()
    for fragment in fragments:
        assert str(fragment) in str(caught.value)
    assert not cache.exists() or not any(cache.iterdir()), "written to the cache before the error"
    return caught.value


def base_character(name: str) -> str:
    """``"Alpha/character01/rot90"`` -> ``"Alpha/character01"``."""
    return name.rsplit("/", 1)[0]


# ------------------------------------------------------------------------------------------ Omniglot

def test_omniglot_shapes_classes_and_meta(omniglot_root, tmp_path):
    splits = {s: load_omniglot(omniglot_root, s, cache_dir=tmp_path / "cache", **FINN)
              for s in ("train", "val", "test")}
    for name, characters in (("train", 6), ("val", 2), ("test", 2)):
        data = splits[name]
        assert isinstance(data, ClassImages)
        assert data.images.dtype == np.uint8 and data.images.shape == (4 * characters, DRAWINGS, 1, 28, 28)
        assert not data.images.flags.writeable
        first_character = base_character(data.classes[0])
        assert data.classes[:4] == tuple(f"{first_character}/rot{d}" for d in (0, 90, 180, 270))
        meta = data.meta
        assert meta["dataset"] == "omniglot" and meta["split"] == name and meta["split_rule"] == "finn"
        assert meta["seed"] == 1 and meta["characters"] == {"train": 6, "val": 2, "test": 2}
        assert meta["classes"] == 4 * characters and meta["image_size"] == 28
        assert meta["root"] == str(omniglot_root.resolve())
        json.dumps(meta)  # goes into the run's results JSON


def test_omniglot_pixels_ink_high_and_rotations_are_classes(omniglot_root, tmp_path):
    data = load_omniglot(omniglot_root, "train", image_size=105, cache_dir=tmp_path / "cache", **FINN)
    name = data.classes[0]
    alphabet, character = name.split("/")[:2]
    drawing = sorted((omniglot_root / "images_background" / alphabet / character).glob("*.png"))[0]
    png = np.asarray(Image.open(drawing).convert("L"))
    np.testing.assert_array_equal(data.images[0, 0, 0], 255 - png)  # 105: no resize, just inverted
    assert data.images[0, :, :, 0, 0].max() == 0 and data.images[0].max() == 255  # paper 0, ink 255
    base = data.images[data.classes.index(f"{alphabet}/{character}/rot0")]
    for degrees in (90, 180, 270):
        rotated = data.images[data.classes.index(f"{alphabet}/{character}/rot{degrees}")]
        np.testing.assert_array_equal(rotated, np.rot90(base, k=degrees // 90, axes=(-2, -1)))
        assert not np.array_equal(rotated, base)
    # rotations of a character are separate classes, in turn
    assert [data.classes.index(f"{alphabet}/{character}/rot{d}") for d in (0, 90, 180, 270)] == [0, 1, 2, 3]


def test_omniglot_resize(omniglot_root, tmp_path):
    small = load_omniglot(omniglot_root, "test", image_size=14, cache_dir=tmp_path / "cache", **FINN)
    assert small.images.shape == (8, DRAWINGS, 1, 14, 14) and small.meta["image_size"] == 14
    assert small.images.max() > 100 and small.images[:, :, :, 0, 0].max() == 0


def test_omniglot_finn_split_is_deterministic_and_disjoint(omniglot_root, tmp_path):
    def characters(split, cache, seed=1):
        data = load_omniglot(omniglot_root, split, cache_dir=tmp_path / cache, seed=seed, **FINN)
        return {base_character(name) for name in data.classes}

    first = {s: characters(s, "one") for s in ("train", "val", "test")}
    again = {s: characters(s, "two") for s in ("train", "val", "test")}  # a fresh cache: decoded again
    assert first == again
    assert [len(first[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert not (first["train"] & first["val"]) and not (first["train"] & first["test"])
    assert not (first["val"] & first["test"])
    everything = {f"{alphabet}/character{n:02d}"
                  for alphabet, count in BACKGROUND + EVALUATION for n in range(1, count + 1)}
    assert first["train"] | first["val"] | first["test"] == everything
    assert characters("train", "one", seed=2) != first["train"]  # the seed is the split's


def test_omniglot_alphabet_split(omniglot_root, tmp_path):
    kwargs = {"split_rule": "alphabets", "val_alphabets": 1, "cache_dir": tmp_path / "cache"}
    splits = {s: load_omniglot(omniglot_root, s, **kwargs) for s in ("train", "val", "test")}
    alphabets = {s: {name.split("/")[0] for name in data.classes} for s, data in splits.items()}
    assert alphabets["test"] == {"Delta", "Epsilon"}
    assert len(alphabets["val"]) == 1 and alphabets["val"] | alphabets["train"] == {"Alpha", "Beta", "Gamma"}
    assert not alphabets["val"] & alphabets["train"]
    meta = splits["val"].meta
    assert meta["split_rule"] == "alphabets" and meta["val_alphabets"] == sorted(alphabets["val"])
    assert meta["characters"] == {"train": 4, "val": 2, "test": 4}
    assert meta["alphabets"] == {"train": 2, "val": 1, "test": 2}


def test_omniglot_torchvision_folder(tmp_path):
    root = tmp_path / "data"
    make_omniglot(root / "omniglot-py", drawings=2)
    data = load_omniglot(root, "train", cache_dir=tmp_path / "cache", **FINN)
    assert data.images.shape == (24, 2, 1, 28, 28)


def test_omniglot_cache_hit_does_not_decode(omniglot_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_omniglot(omniglot_root, "train", cache_dir=cache, **FINN)
    assert len(list(cache.glob("omniglot-28px-*.npy"))) == 1 and len(list(cache.glob("*.json"))) == 1
    forbid_decoding(monkeypatch)
    for split in ("train", "val", "test"):  # one decoded array serves every split
        again = load_omniglot(omniglot_root, split, cache_dir=cache, **FINN)
        if split == "train":
            np.testing.assert_array_equal(again.images, first.images)
            assert again.classes == first.classes and again.meta == first.meta


def test_omniglot_cache_key_follows_image_size_and_source_files(tmp_path, monkeypatch):
    root, cache = make_omniglot(tmp_path / "omniglot", drawings=3), tmp_path / "cache"
    decodes = count_decodes(monkeypatch)
    first = load_omniglot(root, "train", cache_dir=cache, **FINN)
    assert len(decodes) == 30
    load_omniglot(root, "train", cache_dir=cache, **FINN)
    assert len(decodes) == 30  # hit
    load_omniglot(root, "train", image_size=20, cache_dir=cache, **FINN)
    assert len(decodes) == 60 and len(list(cache.glob("*.npy"))) == 2
    # redraw one drawing of a train character as another character's shape: a new key, new pixels
    alphabet, character = first.classes[0].split("/")[:2]
    drawing = sorted((root / "images_background" / alphabet / character).glob("*.png"))[0]
    edited_ns = drawing.stat().st_mtime_ns + 10**9  # a coarse-clock file system could keep the old time
    draw_character(drawing, character=99, drawing=1)
    os.utime(drawing, ns=(edited_ns, edited_ns))
    changed = load_omniglot(root, "train", cache_dir=cache, **FINN)
    assert len(decodes) == 90 and len(list(cache.glob("*.npy"))) == 3
    assert not np.array_equal(changed.images[0, 0], first.images[0, 0])
    np.testing.assert_array_equal(changed.images[4:], first.images[4:])


@pytest.mark.parametrize("damage", ["truncate array", "empty array", "garbage index", "no array"])
def test_corrupt_cache_file_is_rebuilt(omniglot_root, tmp_path, monkeypatch, damage):
    cache = tmp_path / "cache"
    first = load_omniglot(omniglot_root, "val", cache_dir=cache, **FINN)
    (array_file,), (index_file,) = cache.glob("*.npy"), cache.glob("*.json")
    if damage == "truncate array":
        array_file.write_bytes(array_file.read_bytes()[: array_file.stat().st_size // 2])
    elif damage == "empty array":
        array_file.write_bytes(b"")
    elif damage == "garbage index":
        index_file.write_text('{"format": "rkfast-ima')
    else:
        array_file.unlink()
    decodes = count_decodes(monkeypatch)
    with pytest.warns(CacheWarning, match="rebuilding"):
        again = load_omniglot(omniglot_root, "val", cache_dir=cache, **FINN)
    assert decodes, "not rebuilt"
    np.testing.assert_array_equal(again.images, first.images)
    forbid_decoding(monkeypatch)  # the rebuilt file is a good cache file
    np.testing.assert_array_equal(load_omniglot(omniglot_root, "val", cache_dir=cache, **FINN).images,
                                  first.images)


def test_unwritable_cache_warns_once_and_returns_data(omniglot_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = blocker / "cache"  # cannot be created (root could write to a chmod-ed folder; not here)
    with pytest.warns(CacheWarning, match="cannot write the image cache") as caught:
        data = load_omniglot(omniglot_root, "train", cache_dir=cache, **FINN)
        load_omniglot(omniglot_root, "test", cache_dir=cache, **FINN)
    assert len([w for w in caught if issubclass(w.category, CacheWarning)]) == 1
    assert data.images.shape == (24, DRAWINGS, 1, 28, 28) and not cache.exists()


def test_omniglot_errors_name_the_path(tmp_path):
    cache = tmp_path / "cache"
    missing = tmp_path / "nowhere"
    assert_data_error(lambda: load_omniglot(missing, "train", cache_dir=cache), cache, missing,
                      "does not exist", "images_background")
    a_file = tmp_path / "omniglot.zip"
    a_file.write_bytes(b"PK")
    assert_data_error(lambda: load_omniglot(a_file, "train", cache_dir=cache), cache, a_file, "is a file")
    half = tmp_path / "half"
    make_omniglot(half, evaluation=(), drawings=1)
    (half / "images_background.zip").write_bytes(b"PK")
    assert_data_error(lambda: load_omniglot(half, "train", cache_dir=cache), cache, half,
                      "no images_evaluation/ folder", "images_background/<Alphabet>/<characterNN>/*.png")
    (half / "images_evaluation").mkdir()
    assert_data_error(lambda: load_omniglot(half, "train", cache_dir=cache), cache,
                      half / "images_evaluation", "no <Alphabet>/<characterNN>/ folders")
    assert_data_error(lambda: load_omniglot(half.parent, "train", cache_dir=cache), cache,
                      "no images_background/ folder")


def test_omniglot_bad_drawings(tmp_path):
    cache = tmp_path / "cache"
    root = make_omniglot(tmp_path / "omniglot", drawings=3)
    empty = root / "images_background" / "Beta" / "character07"
    empty.mkdir()
    (empty / "notes.txt").write_text("no drawings here")
    assert_data_error(lambda: load_omniglot(root, "train", cache_dir=cache, **FINN), cache, empty,
                      "no .png drawings")
    (empty / "notes.txt").unlink()
    empty.rmdir()

    uneven = root / "images_evaluation" / "Delta" / "character02"
    extra = uneven / "9999_99.png"
    draw_character(extra, 5, 5)
    assert_data_error(lambda: load_omniglot(root, "train", cache_dir=cache, **FINN), cache, uneven,
                      "4 drawings", "9 other characters have 3")
    extra.unlink()

    truncated = sorted((root / "images_background" / "Alpha" / "character01").glob("*.png"))[1]
    truncated.write_bytes(truncated.read_bytes()[:120])
    assert_data_error(lambda: load_omniglot(root, "train", cache_dir=cache, **FINN), cache, truncated,
                      "unreadable or truncated image")


def test_omniglot_too_few_characters_or_alphabets(omniglot_root, tmp_path):
    cache = tmp_path / "cache"
    assert_data_error(lambda: load_omniglot(omniglot_root, "train", cache_dir=cache), cache,
                      omniglot_root.resolve(), "10 characters", "1100 for train", "100 for val")
    assert_data_error(lambda: load_omniglot(omniglot_root, "test", cache_dir=cache, split_rule="alphabets"),
                      cache, omniglot_root.resolve() / "images_background", "3 alphabets", "holds out 5")


def test_omniglot_bad_arguments(omniglot_root):
    with pytest.raises(ValueError, match="split 'dev'"):
        load_omniglot(omniglot_root, "dev")
    with pytest.raises(ValueError, match="split_rule"):
        load_omniglot(omniglot_root, "train", split_rule="lake")
    with pytest.raises(ValueError, match="image_size"):
        load_omniglot(omniglot_root, "train", image_size=0)


# ------------------------------------------------------------------------------------- MiniImageNet

def test_miniimagenet_csv_layout(mini_csv_root, tmp_path):
    data = load_miniimagenet(mini_csv_root, "train", cache_dir=tmp_path / "cache")
    assert data.images.dtype == np.uint8 and data.images.shape == (3, PER_CLASS, 3, 84, 84)
    assert data.classes == WNIDS
    for class_index in range(3):
        for image_index in range(PER_CLASS):
            expected = class_colour(class_index, image_index).transpose(2, 0, 1).astype(int)
            assert np.abs(data.images[class_index, image_index].astype(int) - expected).mean() < 3  # JPEG
    meta = data.meta
    assert meta["layout"] == "csv" and meta["source_file"] == "train.csv" and meta["split"] == "train"
    assert meta["classes"] == 3 and meta["images_per_class"] == PER_CLASS and meta["image_size"] == 84
    assert meta["source"]["files"] == 1 + 3 * PER_CLASS
    json.dumps(meta)


def test_miniimagenet_resizes_bigger_images(tmp_path):
    root = make_miniimagenet_csv(tmp_path / "mini", size=(100, 120))
    data = load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")
    assert data.images.shape == (3, PER_CLASS, 3, 84, 84)
    small = load_miniimagenet(root, "train", image_size=32, cache_dir=tmp_path / "cache")
    assert small.images.shape == (3, PER_CLASS, 3, 32, 32)
    assert np.abs(small.images.mean(axis=(1, 3, 4)) - data.images.mean(axis=(1, 3, 4))).max() < 3


def test_miniimagenet_pickle_layout(tmp_path):
    root, content = make_miniimagenet_pickle(tmp_path / "mini")
    data = load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")
    assert data.images.shape == (3, PER_CLASS, 3, 84, 84) and data.classes == WNIDS
    for class_index, wnid in enumerate(WNIDS):
        for position, index in enumerate(content["class_dict"][wnid]):
            np.testing.assert_array_equal(data.images[class_index, position],
                                          content["image_data"][index].transpose(2, 0, 1))
    assert data.meta["layout"] == "pickle" and data.meta["source_file"] == "mini-imagenet-cache-train.pkl"
    # pickles written by numpy 1.x name numpy.core (numpy 2: numpy._core): both load
    pickle_file = root / "mini-imagenet-cache-train.pkl"
    old_numpy = pickle.dumps(content, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in old_numpy
    pickle_file.write_bytes(old_numpy)
    np.testing.assert_array_equal(load_miniimagenet(root, "train", cache_dir=tmp_path / "cache2").images,
                                  data.images)
    assert load_miniimagenet(root, "train", image_size=42, cache_dir=tmp_path / "cache").images.shape == (
        3, PER_CLASS, 3, 42, 42)


def test_miniimagenet_prefers_csv_when_both_layouts_are_there(tmp_path):
    root = make_miniimagenet_csv(tmp_path / "mini")
    make_miniimagenet_pickle(root)
    assert load_miniimagenet(root, "train", cache_dir=tmp_path / "cache").meta["layout"] == "csv"


def test_miniimagenet_cache_hit_maps_the_file(mini_csv_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_miniimagenet(mini_csv_root, "train", cache_dir=cache)
    forbid_decoding(monkeypatch)
    again = load_miniimagenet(mini_csv_root, "train", cache_dir=cache)
    assert isinstance(again.images, np.memmap) and not again.images.flags.writeable
    np.testing.assert_array_equal(again.images, first.images)
    assert again.classes == first.classes and again.meta == first.meta


def test_miniimagenet_pickle_cache_hit(tmp_path, monkeypatch):
    root, _ = make_miniimagenet_pickle(tmp_path / "mini")
    first = load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")
    monkeypatch.setattr(miniimagenet_module, "_read_pickle", lambda *a: pytest.fail("read the pickle again"))
    np.testing.assert_array_equal(load_miniimagenet(root, "train", cache_dir=tmp_path / "cache").images,
                                  first.images)


def test_miniimagenet_root_and_layout_errors(tmp_path):
    cache = tmp_path / "cache"
    missing = tmp_path / "nowhere"
    assert_data_error(lambda: load_miniimagenet(missing, "train", cache_dir=cache), cache, missing,
                      "does not exist")
    a_file = tmp_path / "mini.tar"
    a_file.write_bytes(b"tar")
    assert_data_error(lambda: load_miniimagenet(a_file, "val", cache_dir=cache), cache, a_file, "is a file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_data_error(lambda: load_miniimagenet(empty, "test", cache_dir=cache), cache, empty,
                      "test.csv", "images/", "mini-imagenet-cache-test.pkl")
    (empty / "test.csv").write_text("filename,label\n")
    assert_data_error(lambda: load_miniimagenet(empty, "test", cache_dir=cache), cache, empty,
                      "test.csv is there but no images/ folder")


def test_miniimagenet_csv_errors(tmp_path):
    cache = tmp_path / "cache"
    root = make_miniimagenet_csv(tmp_path / "mini")
    split_file = root / "train.csv"
    good = split_file.read_text()

    split_file.write_text(good.replace("filename,label", "file,class", 1))
    assert_data_error(lambda: load_miniimagenet(root, "train", cache_dir=cache), cache, split_file,
                      "'file,class'", "expected 'filename,label'")
    split_file.write_text("filename,label\n")
    assert_data_error(lambda: load_miniimagenet(root, "train", cache_dir=cache), cache, split_file,
                      "no images listed")
    split_file.write_text(good + "n0000000000000001.jpg,n00000000,extra\n")
    assert_data_error(lambda: load_miniimagenet(root, "train", cache_dir=cache), cache, split_file,
                      f"line {len(WNIDS) * PER_CLASS + 2}")
    split_file.write_text(good + "n9999999900000001.jpg,n99999999\nn9999999900000002.jpg,n99999999\n")
    assert_data_error(lambda: load_miniimagenet(root, "train", cache_dir=cache), cache, split_file,
                      root / "images" / "n9999999900000001.jpg", "does not exist", "1 more")

    split_file.write_text(good)
    (root / "images" / f"{WNIDS[1]}00000001.jpg").unlink()
    split_file.write_text("\n".join(line for line in good.splitlines() if f"{WNIDS[1]}00000001" not in line))
    assert_data_error(lambda: load_miniimagenet(root, "train", cache_dir=cache), cache, split_file,
                      f"class '{WNIDS[1]}' has {PER_CLASS - 1} images", f"2 other classes have {PER_CLASS}")

    split_file.write_text(good.replace(f"{WNIDS[1]}00000001.jpg", f"{WNIDS[1]}00000002.jpg"))
    truncated = root / "images" / f"{WNIDS[2]}00000003.jpg"
    truncated.write_bytes(truncated.read_bytes()[:400])
    assert_data_error(lambda: load_miniimagenet(root, "train", cache_dir=cache), cache, truncated,
                      "unreadable or truncated image")


def test_miniimagenet_pickle_errors(tmp_path):
    cache = tmp_path / "cache"
    root, content = make_miniimagenet_pickle(tmp_path / "mini")
    pickle_file = root / "mini-imagenet-cache-train.pkl"
    good = pickle_file.read_bytes()

    pickle_file.write_bytes(good[: len(good) // 2])
    assert_data_error(lambda: load_miniimagenet(root, "train", cache_dir=cache), cache, pickle_file,
                      "not a readable pickle")
    pickle_file.write_bytes(pickle.dumps({"images": content["image_data"]}))
    assert_data_error(lambda: load_miniimagenet(root, "train", cache_dir=cache), cache, pickle_file,
                      "holds ['images']", "'image_data'")
    pickle_file.write_bytes(pickle.dumps({**content, "image_data": content["image_data"].astype(np.float32)}))
    assert_data_error(lambda: load_miniimagenet(root, "train", cache_dir=cache), cache, pickle_file,
                      "'image_data' is float32")
    one_short = content["class_dict"][WNIDS[0]][:-1]
    uneven = {**content, "class_dict": {**content["class_dict"], WNIDS[0]: one_short}}
    pickle_file.write_bytes(pickle.dumps(uneven))
    assert_data_error(lambda: load_miniimagenet(root, "train", cache_dir=cache), cache, pickle_file,
                      f"class '{WNIDS[0]}' has {PER_CLASS - 1} images")
    out_of_range = {**content, "class_dict": {WNIDS[0]: [0, 10_000]}}
    pickle_file.write_bytes(pickle.dumps(out_of_range))
    assert_data_error(lambda: load_miniimagenet(root, "train", cache_dir=cache), cache, pickle_file,
                      f"class_dict['{WNIDS[0]}']")


class _RunsCode:
    """Unpickles into a call of os.mkdir: what a hostile pickle could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_miniimagenet_pickle_cannot_run_code(tmp_path):
    cache, root, marker = tmp_path / "cache", tmp_path / "mini", tmp_path / "ran"
    root.mkdir()
    pickle_file = root / "mini-imagenet-cache-val.pkl"
    pickle_file.write_bytes(pickle.dumps({"image_data": _RunsCode(marker), "class_dict": {}}))
    assert_data_error(lambda: load_miniimagenet(root, "val", cache_dir=cache), cache, pickle_file,
                      "refusing to load")
    assert not marker.exists()


# -------------------------------------------------------------------------------------------- cache

def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("RKFAST_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert cache_dir() == tmp_path / "env"
    monkeypatch.setenv("RKFAST_CACHE", "")
    assert cache_dir() == tmp_path / "xdg" / "rkfast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "rkfast"


def tiny_images(value: int = 7) -> ClassImages:
    return ClassImages(np.full((2, 3, 1, 4, 4), value, np.uint8), ("a", "b"), {"made_by": ("test", 1)})


def test_cached_builds_once_and_writes_array_then_index(tmp_path):
    builds = []

    def build():
        builds.append(1)
        return tiny_images()

    key = {"dataset": "tiny", "root": tmp_path, "size": 4}
    first = cached("tiny", key, build, tmp_path)
    again = cached("tiny", key, build, tmp_path)
    assert len(builds) == 1 and isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(again.images, first.images)
    assert again.classes == first.classes and again.meta == first.meta == {"made_by": ["test", 1]}
    array_file, index_file = cache_files("tiny", key, tmp_path)
    assert array_file.stat().st_mtime_ns <= index_file.stat().st_mtime_ns
    assert json.loads(index_file.read_text())["shape"] == [2, 3, 1, 4, 4]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left
    cached("tiny", {**key, "size": 5}, build, tmp_path)
    assert len(builds) == 2  # another key, another file


def test_cached_array_without_index_is_a_quiet_miss(tmp_path, recwarn):
    key = {"dataset": "tiny"}
    array_file, index_file = cache_files("tiny", key, tmp_path)
    tmp_path.mkdir(exist_ok=True)
    np.save(array_file, np.zeros((2, 3, 1, 4, 4), np.uint8))  # a writer stopped before the index
    assert cached("tiny", key, tiny_images, tmp_path).images.max() == 7
    assert not [w for w in recwarn if issubclass(w.category, CacheWarning)]


def test_cached_propagates_build_errors_and_writes_nothing(tmp_path):
    def build():
        raise DataError("bad data")

    with pytest.raises(DataError, match="bad data"):
        cached("tiny", {"dataset": "tiny"}, build, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_fingerprint_sees_edits_and_renames(tmp_path):
    one = tmp_path / "one.png"
    one.write_bytes(b"x")
    stat = one.stat()
    base = fingerprint([("one.png", stat)])
    assert base["files"] == 1 and base["bytes"] == 1
    assert fingerprint([("renamed.png", stat)]) != base
    one.write_bytes(b"xy")
    assert fingerprint([("one.png", one.stat())]) != base
    with pytest.raises(ValueError, match="cache name"):
        cache_files("no/slashes", {}, tmp_path)


def test_cached_index_write_failure_leaves_no_array(tmp_path, monkeypatch):
    from rkfast.data import cache as cache_module

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module, "write_json", full_disk)
    with pytest.warns(CacheWarning, match="No space left"):
        data = cached("tiny", {"dataset": "tiny"}, tiny_images, tmp_path / "cache")
    assert data.images.max() == 7 and not list((tmp_path / "cache").iterdir())
