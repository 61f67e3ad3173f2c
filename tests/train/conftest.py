"""Shared fixtures of the training tests: tiny OC20-style LMDBs and a tiny IS2RE config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.train.helpers import make_lmdb

# Spawned DDP workers import the tests package from the repository root.
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """train (24 structures), val (8), and a val split without targets (6)."""
    root = tmp_path_factory.mktemp("is2re_data")
    return {
        "train": make_lmdb(root / "train.lmdb", 24, seed=1),
        "val": make_lmdb(root / "val.lmdb", 8, seed=2),
        "test": make_lmdb(root / "test.lmdb", 6, seed=3, with_targets=False),
    }


def tiny_raw_config(data: dict[str, Path], **run) -> dict:
    """A plain config mapping for a model small enough for CPU tests (every part exercised)."""
    return {
        "task": "is2re",
        "data": {
            "train": str(data["train"]),
            "val": [str(data["val"])],
            "batch_size": 4,
            "eval_batch_size": 4,
            "periodic_images": True,
            "image_cutoff": 4.0,
        },
        "model": {
            "attention": "flt",
            "num_layers": 1,
            "embed_dim": 16,
            "ffn_dim": 32,
            "num_heads": 2,
            "num_kernel_features": 8,
            "num_rpe_features": 4,
            "num_kernels": 4,
            "blocks": 2,
            "attention_dropout": 0.0,
            "context_channels": 4,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 2, "ema_decay": None},
        "run": {"steps": 6, "eval_interval": 3, "ckpt_interval": 3, "log_interval": 2, "seed": 0,
                "device": "cpu", "progress": False, **run},
    }


@pytest.fixture
def raw_config(tiny_data):
    return tiny_raw_config(tiny_data)


def slow() -> pytest.MarkDecorator:
    return pytest.mark.skipif(os.environ.get("FLT_MOL_SLOW") != "1", reason="slow; set FLT_MOL_SLOW=1")
