"""IDX loaders against files the tests write (good, gzip, corrupt, short), and the offline glyphs."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from flt_mol.data.images import (
    ImageClassification,
    glyph_digits,
    load_image_split,
    load_mnist_idx,
    read_idx,
)


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype({0x08: ">u1", 0x0C: ">i4"}[code]).tobytes()


def write_mnist(root, images, labels, *, split="train", gz=False):
    root.mkdir(parents=True, exist_ok=True)
    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[split]
    for name, arr in zip(names, (images, labels)):
        data = idx_bytes(arr)
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return root


@pytest.fixture
def sample():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (5, 6, 7), dtype=np.uint8), np.array([3, 1, 4, 1, 5], dtype=np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip(tmp_path, sample, gz):
    images, labels = sample
    root = write_mnist(tmp_path / "fashion", images, labels, gz=gz)
    got_images, got_labels = load_mnist_idx(root, "train")
    assert np.array_equal(got_images, images) and got_labels.dtype == np.int64
    assert got_labels.tolist() == labels.tolist()
    ds = load_image_split("idx", "train", root=str(root))
    x, y = ds[2]
    assert x.shape == (1, 6, 7) and x.dtype == torch.float32 and y.item() == 4
    assert torch.allclose(x[0], torch.from_numpy(images[2]).float() / 255)


def test_other_type_codes(tmp_path):
    arr = np.arange(-3, 9, dtype=np.int32).reshape(3, 4)
    (tmp_path / "ints").write_bytes(idx_bytes(arr, code=0x0C))
    assert np.array_equal(read_idx(tmp_path / "ints"), arr)


def test_corrupt_files_raise_naming_the_file(tmp_path, sample):
    images, labels = sample
    good = idx_bytes(images)
    cases = {
        "magic": b"\x01" + good[1:],
        "typecode": good[:2] + b"\x07" + good[3:],
        "truncated": good[:-3],
        "trailing": good + b"\x00\x00",
        "short": good[:2],
        "header": good[:4] + good[4:9],
    }
    messages = {"magic": "magic", "typecode": "type code", "truncated": "truncated", "trailing": "trailing",
                "short": "too short", "header": "truncated IDX header"}
    for name, data in cases.items():
        path = tmp_path / f"{name}-idx3-ubyte"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}-idx3-ubyte.*{messages[name]}"):
            read_idx(path)
    bad_gz = tmp_path / "broken.gz"
    bad_gz.write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(ValueError, match="broken.gz.*gzip"):
        read_idx(bad_gz)
    (tmp_path / "labels").write_bytes(idx_bytes(labels))
    with pytest.raises(ValueError, match="labels.*3-dimensional"):
        read_idx(tmp_path / "labels", expect_ndim=3)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_idx(tmp_path / "missing")


def test_split_level_checks(tmp_path, sample):
    images, labels = sample
    root = write_mnist(tmp_path / "count", images, labels[:4])
    with pytest.raises(ValueError, match="5 images.*4 labels"):
        load_mnist_idx(root)
    root = write_mnist(tmp_path / "range", images, np.array([0, 1, 2, 3, 12], dtype=np.uint8))
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        load_mnist_idx(root)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist_idx(root, "test")
    with pytest.raises(ValueError, match="split"):
        load_mnist_idx(root, "dev")
    with pytest.raises(ValueError, match="root"):
        load_image_split("idx", "train")
    with pytest.raises(ValueError, match="source"):
        load_image_split("cifar", "train")


def test_glyph_digits_deterministic_balanced_and_seeded():
    a, la = glyph_digits(3, seed=5)
    b, lb = glyph_digits(3, seed=5)
    c, _ = glyph_digits(3, seed=6)
    assert a.shape == (30, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert np.bincount(la).tolist() == [3] * 10
    # A digit is drawn: bright strokes on a dark, noisy background.
    # (noise: sigma 0.05 * 255 ~ 13 grey levels, so 150 is > 10 sigma above the background)
    assert (a.reshape(30, -1).max(1) > 150).all() and np.median(a) < 40
    ds = ImageClassification(a, la)
    x, y = ds[7]
    assert x.shape == (1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0 and y.item() == 7
    with pytest.raises(ValueError, match="num_per_class"):
        glyph_digits(0, seed=0)
    with pytest.raises(ValueError, match="splits"):
        load_image_split("glyph-digits", "test")


def test_sklearn_digits_split():
    pytest.importorskip("sklearn")
    from flt_mol.data.images import sklearn_digits

    train_x, train_y = sklearn_digits("train")
    val_x, val_y = sklearn_digits("val")
    assert train_x.shape[1:] == (8, 8) and train_x.dtype == np.uint8 and train_x.max() == 255
    assert len(train_y) + len(val_y) == 1797 and len(val_y) == 1797 // 5
    assert set(val_y.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="splits"):
        sklearn_digits("test")
