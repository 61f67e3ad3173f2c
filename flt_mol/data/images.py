"""Image classification data for the ViT: MNIST / Fashion-MNIST IDX files and an offline default.

* **IDX files** (the format of MNIST and Fashion-MNIST: ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally ``.gz``). Header: two zero bytes, a type code (0x08 = uint8, ...), the number of
  dimensions, then one big-endian uint32 per dimension, then the data. Every field is checked and a
  bad file raises ``ValueError`` naming it (wrong magic, truncated, trailing bytes, image/label
  count mismatch, labels out of range).
* **glyph-digits**, the offline default: the digits 0-9 rendered with the 21 TrueType fonts that
  matplotlib ships (DejaVu, STIX, Computer Modern), randomly scaled, rotated, shifted, thickened,
  blurred and noised into 28x28 grey images, MNIST-style (white digit on black). Deterministic by
  seed; train and validation use different seeds. No download, no extra package (Pillow and the
  fonts come with matplotlib). It is synthetic: accuracies on it are not comparable with MNIST.
* **sklearn-digits**: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download;
  needs scikit-learn), split deterministically: every fifth image (index % 5 == 4) is validation.

:class:`ImageClassification` wraps ``uint8 [N, H, W]`` images and labels as a Dataset of
``(image [1, H, W] float in [0, 1], label)``.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from flt_mol.errors import InputError

__all__ = [
    "read_idx",
    "load_mnist_idx",
    "MNIST_FILES",
    "GLYPH_FONTS",
    "glyph_digits",
    "ImageClassification",
    "load_image_split",
    "sklearn_digits",
]

# IDX type code -> numpy big-endian dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise InputError(f"{path}: corrupt gzip stream ({err})") from err
    return raw


def read_idx(path: str | os.PathLike, *, expect_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a numpy array, validating header and size.

    Args:
        path: the file.
        expect_ndim: if given, the number of dimensions the header must declare (3 for images,
            1 for labels).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise InputError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise InputError(f"{path}: bad IDX magic number {raw[:4].hex()} (must start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise InputError(f"{path}: unknown IDX type code 0x{code:02x} (magic {raw[:4].hex()})")
    if ndim == 0:
        raise InputError(f"{path}: IDX header declares 0 dimensions")
    if expect_ndim is not None and ndim != expect_ndim:
        raise InputError(f"{path}: expected a {expect_ndim}-dimensional IDX file, header says {ndim} (magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    shape = tuple(int(x) for x in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) < expected:
        raise InputError(f"{path}: truncated: header declares shape {shape} ({expected} bytes), file has {len(raw)}")
    if len(raw) > expected:
        raise InputError(f"{path}: {len(raw) - expected} trailing bytes after the declared shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        p = os.path.join(root, candidate)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"neither {name} nor {name}.gz found in {root}")


def load_mnist_idx(root: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST or Fashion-MNIST split (same file names) from ``root``.

    Returns ``(images uint8 [N, H, W], labels int64 [N])``.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(MNIST_FILES)}, got {split!r}")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    img_path, lab_path = (_find(root, n) for n in MNIST_FILES[split])
    images = read_idx(img_path, expect_ndim=3)
    labels = read_idx(lab_path, expect_ndim=1)
    if images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected uint8 images, got {images.dtype}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{lab_path}: labels must be in 0..9, found {labels.min()}..{labels.max()}")
    return images, labels


GLYPH_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf",
    "cmti10.ttf", "cmtt10.ttf",
)


def glyph_digits(num_per_class: int, *, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Render ``10 * num_per_class`` digit images (the offline default data set).

    Each image: a random font from :data:`GLYPH_FONTS`, glyph height 45-75% of the frame, rotation
    within +-20 degrees, shift within +-12% of the frame, stroke widening 0-1 px at 2x resolution,
    a light blur and Gaussian pixel noise (sigma 0.05). Classes are interleaved (label
    ``n % 10``). Deterministic for a given seed, Pillow version and matplotlib font files.

    Returns ``(images uint8 [N, size, size], labels int64 [N])``.
    """
    import matplotlib
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    if num_per_class < 1:
        raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
    font_dir = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    rng = np.random.default_rng(seed)
    big = 2 * size  # render at 2x then downsample: smoother strokes
    fonts: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}
    n = 10 * num_per_class
    images = np.empty((n, size, size), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % 10
    for i in range(n):
        name = GLYPH_FONTS[int(rng.integers(len(GLYPH_FONTS)))]
        px = int(round(big * rng.uniform(0.45, 0.75)))
        key = (name, px)
        if key not in fonts:
            fonts[key] = ImageFont.truetype(os.path.join(font_dir, name), px)
        canvas = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(canvas)
        text = str(labels[i])
        stroke = int(rng.integers(0, 2))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=fonts[key], stroke_width=stroke)
        x = (big - (right - left)) / 2 - left + rng.uniform(-0.12, 0.12) * big
        y = (big - (bottom - top)) / 2 - top + rng.uniform(-0.12, 0.12) * big
        draw.text((x, y), text, fill=255, font=fonts[key], stroke_width=stroke, stroke_fill=255)
        canvas = canvas.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0)))
        small = np.asarray(canvas.resize((size, size), resample=Image.BILINEAR), dtype=np.float32) / 255.0
        small = small + rng.normal(0.0, 0.05, size=small.shape)
        images[i] = np.clip(np.round(small * 255.0), 0, 255).astype(np.uint8)
    return images, labels


def sklearn_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as ``(uint8 [N, 8, 8] scaled from 0..16 to 0..255, int64 [N])``;
    ``split`` train (4 of every 5 images) or val (index % 5 == 4)."""
    if split not in ("train", "val"):
        raise ValueError(f"sklearn-digits splits are 'train' and 'val', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("image source 'sklearn-digits' needs scikit-learn (pip install scikit-learn)") from err
    data = load_digits()
    images = np.round(np.asarray(data.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(data.target, dtype=np.int64)
    val = np.arange(len(labels)) % 5 == 4
    keep = val if split == "val" else ~val
    return images[keep], labels[keep]


class ImageClassification(Dataset):
    """``(image [1, H, W] float32 in [0, 1], label int64)`` from uint8 ``images [N, H, W]``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, num_classes: int = 10):
        if images.ndim != 3:
            raise ValueError(f"images must be [N, H, W], got shape {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [{images.shape[0]}], got shape {labels.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].unsqueeze(0).float() / 255.0, self.labels[i]

    def __repr__(self) -> str:
        h, w = self.images.shape[1:]
        return f"ImageClassification(n={len(self)}, size={h}x{w}, num_classes={self.num_classes})"


def load_image_split(
    source: str,
    split: str,
    *,
    root: str | None = None,
    num_per_class: int = 500,
    seed: int = 0,
) -> ImageClassification:
    """``source="glyph-digits"`` (offline default; ``split`` train|val, seeds ``seed`` and
    ``seed + 1``), ``"sklearn-digits"`` (8x8; train|val) or ``"idx"`` (MNIST / Fashion-MNIST files
    in ``root``; ``split`` train|test, ``val`` is an alias of ``test``)."""
    if source == "glyph-digits":
        if split not in ("train", "val"):
            raise ValueError(f"glyph-digits splits are 'train' and 'val', got {split!r}")
        images, labels = glyph_digits(num_per_class, seed=seed if split == "train" else seed + 1)
        return ImageClassification(images, labels)
    if source == "sklearn-digits":
        images, labels = sklearn_digits(split)
        return ImageClassification(images, labels)
    if source == "idx":
        if root is None:
            raise ValueError("image source 'idx' needs root= the folder holding the IDX files")
        images, labels = load_mnist_idx(root, "test" if split == "val" else split)
        return ImageClassification(images, labels)
    raise ValueError(f"unknown image source {source!r}; expected 'glyph-digits', 'sklearn-digits' or 'idx'")
