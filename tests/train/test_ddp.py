"""A 2-process DDP run (gloo, CPU) equals a 1-process run at the same global batch."""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp

from flt_mol.train.checkpoint import load_checkpoint
from flt_mol.train.config import config_from_dict
from flt_mol.train.loop import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, raw: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from flt_mol.train import distributed

    try:
        distributed.init_from_env("cpu")
        grads = _first_step_gradients(raw, rank=rank, world=world)
        if rank == 0:
            torch.save(grads, os.path.join(out + "_grads.pt"))
        train(config_from_dict(raw), out)
    finally:
        distributed.cleanup()


def _first_step_gradients(raw: dict, *, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Gradients of the task loss on this rank's share of 4 training structures."""
    from torch import nn

    from flt_mol.train.loop import seed_everything
    from flt_mol.train.tasks import build_task

    task = build_task(config_from_dict(raw))
    task.setup()
    task.begin_training(4)
    seed_everything(0)
    model = task.build_model()
    ds = task.train_dataset()
    chosen = [0, 1, 4, 5]  # the two halves hold different numbers of free atoms (26 and 22)
    batch = task.collate_fn()([ds[i] for i in chosen[rank::world]])
    wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    loss, _ = task.loss(wrapped, batch, 1)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_processes_match_one(tiny_data, tmp_path):
    from tests.train.conftest import tiny_raw_config

    raw = tiny_raw_config(tiny_data, steps=4, eval_interval=4, ckpt_interval=4)
    raw["model"]["dropout"] = 0.0
    raw["data"]["batch_size"] = 4  # global: 4 on one process, 2 + 2 on two
    train(config_from_dict(raw), tmp_path / "one")
    mp.spawn(_worker, args=(2, _free_port(), raw, str(tmp_path / "two")), nprocs=2, join=True)

    # The loss is normalised by global counts: the averaged gradient is the global-batch gradient
    # even though the two halves hold different numbers of atoms.
    g1 = _first_step_gradients(raw, rank=0, world=1)
    g2 = torch.load(str(tmp_path / "two") + "_grads.pt")
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)

    a = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        # Same arithmetic up to the order of the gradient sums (float32 round-off).
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # And the parameters did move, so the comparison is not vacuous.
    init = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["history"]
    assert any("loss" in h for h in init)
    ma = json.loads((tmp_path / "one" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert ma["val"]["n"] == mb["val"]["n"] == 8  # every structure counted once across ranks
    for key in ("energy_mae", "energy_mse", "energy_within_threshold"):
        assert abs(ma["val"][key] - mb["val"][key]) <= 1e-4 * max(1.0, abs(ma["val"][key])), key
