"""A tiny trained S2EF checkpoint (and its data) for the calculator, relax and task tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.helpers import make_lmdb, make_s2ef_lmdb


def tiny_s2ef_raw_config(train: Path, val: Path, **run) -> dict:
    return {
        "task": "s2ef",
        "data": {"train": str(train), "val": [str(val)], "batch_size": 4, "eval_batch_size": 4,
                 "energy_target": "y_adsorption", "random_translation": True},
        "model": {"attention": "flt", "num_layers": 1, "embed_dim": 16, "ffn_dim": 32, "num_heads": 2,
                  "num_kernel_features": 8, "num_rpe_features": 4, "num_kernels": 4, "blocks": 2,
                  "attention_dropout": 0.0, "context_channels": 4, "context_features": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "ema_decay": None},
        "run": {"steps": 4, "eval_interval": 0, "ckpt_interval": 0, "log_interval": 2, "seed": 0,
                "redraw_interval": 0, "device": "cpu", "progress": False, **run},
    }


@pytest.fixture(scope="session")
def s2ef_run(tmp_path_factory) -> dict[str, Path]:
    """``{"train", "val" (S2EF LMDBs), "is2re" (IS2RE LMDB with pos_relaxed / y_relaxed), "ckpt"}``."""
    from flt_mol.train.config import config_from_dict
    from flt_mol.train.loop import train

    root = tmp_path_factory.mktemp("s2ef")
    data = {"train": make_s2ef_lmdb(root / "train.lmdb", 12, seed=1),
            "val": make_s2ef_lmdb(root / "val.lmdb", 4, seed=2),
            "is2re": make_lmdb(root / "is2re.lmdb", 3, seed=4)}
    train(config_from_dict(tiny_s2ef_raw_config(data["train"], data["val"])), root / "run")
    data["ckpt"] = root / "run" / "checkpoint.pt"
    data["root"] = root
    return data
