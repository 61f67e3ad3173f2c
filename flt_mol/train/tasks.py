"""Tasks: what the task-agnostic loop trains (data, model, loss, metrics) and how tasks are chosen.

Task selection is explicit and lives in two functions only: :func:`task_config_types` (the data
and model dataclasses of a recipe) and :func:`build_task`. ``task: is2re`` and ``task: s2ef``
(energies and conservative forces, :class:`S2EFTask`) are defined here;
``task: lm`` and ``task: vit`` are imported lazily from :mod:`flt_mol.train.sequence_tasks`, which
must provide ``config_types(task) -> (DataConfig, ModelConfig)`` and
``build_sequence_task(config) -> Task``.

A :class:`Task` gives the loop:

* ``setup()`` fits statistics of the training split (run once, on rank 0, then shared through
  ``state_dict`` / ``load_state_dict`` and saved in every checkpoint);
* ``train_dataset()``, ``val_datasets()``, ``collate_fn()``, ``batch_size`` (global),
  ``eval_batch_size``, ``num_workers``;
* ``build_model()``, ``loss(model, batch, step) -> (loss, logs)`` (a loss whose DDP-averaged
  gradient equals the gradient of the global-batch mean), ``evaluate(model, loaders)`` (metrics
  from totals reduced across ranks), ``summary_metric(metrics)`` (lower is better; picks best.pt)
  and ``format_metrics(metrics)`` (a table).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from flt_mol.errors import InputError, UsageError
from flt_mol.models.is2re import IS2REModel, IS2REModelConfig
from flt_mol.train import distributed
from flt_mol.train.config import ConfigError, TrainConfig
from flt_mol.train.metrics import average_entry, energy_totals, format_table, metrics_from_totals

EMT_VAL_SPLITS = ("val_id", "val_ood_ads", "val_ood_cat", "val_ood_both")


class Task(abc.ABC):
    """The contract between a task and :func:`flt_mol.train.loop.train` (module docstring)."""

    batch_size: int  # global batch (summed over processes)
    eval_batch_size: int
    num_workers: int

    def __init__(self, config: TrainConfig):
        self.config = config
        self.total_steps = 1

    def setup(self) -> None:
        """Fit training-split statistics (normalisers, baselines). Default: nothing."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def begin_training(self, total_steps: int) -> None:
        """Called by the loop before the first step (loss schedules need the run length)."""
        self.total_steps = total_steps

    @abc.abstractmethod
    def train_dataset(self) -> Dataset: ...

    @abc.abstractmethod
    def val_datasets(self) -> dict[str, Dataset]: ...

    @abc.abstractmethod
    def collate_fn(self) -> Callable: ...

    @abc.abstractmethod
    def build_model(self) -> nn.Module: ...

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loaders: Mapping[str, Any]) -> dict[str, Any]: ...

    @abc.abstractmethod
    def summary_metric(self, metrics: Mapping[str, Any]) -> float: ...

    def progress_metric(self, metrics: Mapping[str, Any]) -> tuple[str, float]:
        """``(name with unit, value)`` of the validation metric a person follows: logged after
        each in-training evaluation and drawn on the learning curve's validation axis."""
        return "validation summary metric", self.summary_metric(metrics)

    def format_metrics(self, metrics: Mapping[str, Any]) -> str:
        return "\n".join(f"{k}: {v}" for k, v in metrics.items())


# --------------------------------------------------------------------------------------------
# Selection (the only place that knows every task)
# --------------------------------------------------------------------------------------------

TASKS = ("is2re", "s2ef", "lm", "vit")


def task_config_types(task: str) -> tuple[type, type]:
    """(data dataclass, model dataclass) of ``task``."""
    if task == "is2re":
        return IS2REDataConfig, IS2REModelConfig
    if task == "s2ef":
        from flt_mol.models.s2ef import S2EFModelConfig

        return S2EFDataConfig, S2EFModelConfig
    if task in ("lm", "vit"):
        from flt_mol.train import sequence_tasks

        return sequence_tasks.config_types(task)
    raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def build_task(config: TrainConfig) -> Task:
    """The :class:`Task` for ``config.task``."""
    if config.task == "is2re":
        return IS2RETask(config)
    if config.task == "s2ef":
        return S2EFTask(config)
    if config.task in ("lm", "vit"):
        from flt_mol.train.sequence_tasks import build_sequence_task

        return build_sequence_task(config)
    raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {config.task!r}")


# --------------------------------------------------------------------------------------------
# IS2RE
# --------------------------------------------------------------------------------------------


@dataclass
class IS2REDataConfig:
    """Data and targets of the IS2RE task.

    Paths are an ``.lmdb`` file, a folder of shards, or ``emt:SPLIT`` for the embedded EMT-IS2RE
    data set (built on first use). Validation split names are ``SPLIT`` for ``emt:SPLIT`` and the
    file / folder stem otherwise.
    """

    train: str = "emt:train"
    val: list[str] = field(default_factory=lambda: [f"emt:{s}" for s in EMT_VAL_SPLITS])
    batch_size: int = 16  # global batch, split evenly across processes
    eval_batch_size: int = 32
    num_workers: int = 0
    max_train_items: int | None = None  # use the first N training structures (quick runs)
    periodic_images: bool = True  # add in-plane periodic images near the adsorbate as tokens
    image_cutoff: float = 8.0  # Angstrom, distance to the nearest adsorbate atom
    max_images: int | None = None  # keep at most this many images per structure (nearest first)
    element_references: bool = True  # subtract a per-element linear fit before normalising
    normalize_energy: bool = True  # then divide (y - mean) by the train std
    displacement_weight: tuple[float, float] = (15.0, 1.0)  # aux loss weight, start -> end (linear)
    # Rotate every training structure (with its cell and displacements) by a uniform random
    # rotation. The random-feature attention and context are rotation invariant only in
    # expectation over the frequencies; with one fixed draw a model can learn the orientation
    # of the slabs instead of the geometry, and then fails on rotated inputs.
    random_rotation: bool = False

    def validate(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.image_cutoff <= 0:
            raise ConfigError(f"data.image_cutoff must be > 0, got {self.image_cutoff}")
        if self.max_train_items is not None and self.max_train_items < 1:
            raise ConfigError(f"data.max_train_items must be >= 1 or null, got {self.max_train_items}")
        names = [split_name(v) for v in self.val]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.val split names must be unique, got {names}")


def split_name(spec: str) -> str:
    """``emt:val_id`` (or ``emt_s2ef:val_id``) -> ``val_id``; ``/data/is2re/val_id/data.lmdb`` -> ``val_id``."""
    if spec.startswith("emt:"):
        return spec[4:]
    if spec.startswith("emt_s2ef:"):
        return spec[len("emt_s2ef:"):]
    p = Path(spec)
    return p.parent.name if p.stem == "data" else p.stem


def resolve_path(spec: str) -> Path:
    """``emt:SPLIT`` / ``emt_s2ef:SPLIT`` -> the embedded EMT-IS2RE / EMT-S2EF LMDB (built on
    first use); anything else -> a path."""
    if spec.startswith("emt:"):
        from flt_mol.data.emt import emt_is2re

        return Path(emt_is2re(spec[4:]))
    if spec.startswith("emt_s2ef:"):
        from flt_mol.data.s2ef import emt_s2ef

        return Path(emt_s2ef(spec[len("emt_s2ef:"):]))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"data {spec!r} does not exist")
    return path


def open_split(spec: str, *, max_items: int | None = None) -> Dataset:
    """The split ``spec`` names (an LMDB, a folder of shards, ``emt:SPLIT``), its first
    ``max_items`` structures when given."""
    from flt_mol.data.oc20 import OC20LMDB

    ds = OC20LMDB(resolve_path(spec))
    if max_items is not None and max_items < len(ds):
        ds = torch.utils.data.Subset(ds, range(max_items))
    return ds


def random_rotations(keys: torch.Tensor, *, seed: int, step: int) -> torch.Tensor:
    """Uniform rotations ``[B, 3, 3]``, the ``b``-th drawn from a generator seeded by
    ``(seed, step, keys[b])`` alone.

    Keyed by structure id (not by position in the batch), so a structure gets the same rotation
    whatever the number of processes and however the global batch is split; a structure without
    an id (key < 0) is keyed by its position in this process's batch instead. A normalised 4D
    Gaussian is a uniform unit quaternion, i.e. a Haar-distributed rotation.
    """
    import numpy as np

    quats = []
    for pos, key in enumerate(keys.tolist()):
        entropy = [int(seed), int(step), int(key)] if key >= 0 else [int(seed), int(step), 1 << 40, pos]
        state = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1
        g = torch.Generator().manual_seed(state)
        quats.append(torch.randn(4, generator=g, dtype=torch.float64))
    q = torch.stack(quats)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=1)
    return rot.view(-1, 3, 3)


def rotate_batch(batch: Any, rot: torch.Tensor) -> Any:
    """The batch with positions, cells and displacements rotated: ``v -> R v`` per structure.

    Row vectors, so ``pos @ R^T``. Periodic images are translated copies of atoms by lattice
    vectors, so rotating the collated tokens equals collating the rotated structure.

    Shapes: ``rot [B, 3, 3]``; ``batch.pos [B, L, 3]``, ``batch.cell [B, 3, 3]``.
    """
    from dataclasses import replace

    r = rot.to(device=batch.pos.device, dtype=batch.pos.dtype)

    def turn(v: torch.Tensor | None) -> torch.Tensor | None:
        return None if v is None else torch.einsum("blx,byx->bly", v, r.to(v.dtype))

    return replace(batch, pos=turn(batch.pos), cell=turn(batch.cell), displacement=turn(batch.displacement))


def displacement_weight(step: int, *, total_steps: int, start: float, end: float) -> float:
    """Linear decay of the auxiliary loss weight from ``start`` (step 1) to ``end`` (last step)."""
    frac = min(max((step - 1) / max(total_steps - 1, 1), 0.0), 1.0)
    return start + (end - start) * frac


class EnergyNormalizer(nn.Module):
    """``y_norm = (y - ref(z) - mean) / std`` and its inverse.

    ``ref(z) = sum_i coef[z_i] + intercept`` over the real atoms (a per-element linear fit on the
    training split, fairchem's "element references"); all zero when references are disabled.
    An element absent from the training split has coefficient 0 (its energy is left to the model).
    """

    def __init__(self, coef: torch.Tensor, intercept: float, mean: float, std: float):
        super().__init__()
        self.register_buffer("coef", coef.double().clone())
        self.intercept = float(intercept)
        self.mean = float(mean)
        self.std = float(std)

    def reference(self, atomic_numbers: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` long, ``[B, L]`` bool -> ``[B]`` float64 reference energies."""
        z = atomic_numbers.long().clamp(0, self.coef.numel() - 1)
        return (self.coef.to(atomic_numbers.device)[z] * real.double()).sum(1) + self.intercept

    def normalize(self, y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return ((y.double() - ref - self.mean) / self.std).float()

    def denormalize(self, y_norm: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return y_norm.double() * self.std + self.mean + ref


def _fit_normalizer(items: list[Any], *, references: bool, normalize: bool,
                    target: str = "y_relaxed") -> EnergyNormalizer:
    """Fit the element references (optional) and the mean / std of what they leave (of the
    energy field ``target``)."""
    import numpy as np

    from flt_mol.data.references import MAX_Z, fit_element_references, targets

    y = targets(items, target=target)
    coef = torch.zeros(MAX_Z + 1, dtype=torch.float64)
    intercept = 0.0
    resid = y
    if references:
        refs = fit_element_references(items, target=target)
        coef = torch.as_tensor(refs.coef, dtype=torch.float64)
        intercept = float(refs.bias)
        resid = y - refs.predict(items)
    mean = float(np.mean(resid)) if normalize else 0.0
    std = float(np.std(resid)) if normalize and len(resid) > 1 else 1.0
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"the training energies have no spread to normalise by (std = {std})")
    return EnergyNormalizer(coef, intercept, mean, std)


class IS2RETask(Task):
    """Initial structure -> relaxed energy, with the auxiliary displacement loss (DESIGN §3)."""

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        data: IS2REDataConfig = config.data
        if config.model.periodic == "reciprocal" and data.periodic_images:
            raise ConfigError(
                "data.periodic_images must be false with model.periodic: reciprocal "
                "(the lattice sums replace the image tokens: one token per atom)"
            )
        self.data = data
        self.batch_size = data.batch_size
        self.eval_batch_size = data.eval_batch_size
        self.num_workers = data.num_workers
        self.normalizer: EnergyNormalizer | None = None
        self.displacement_std = 1.0
        self.baselines: dict[str, Any] | None = None  # TrivialBaselines.to_dict(), fitted on train
        self._baseline_cache: dict[str, dict[str, float]] = {}

    # -- data ---------------------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        return open_split(self.data.train, max_items=self.data.max_train_items)

    def val_datasets(self) -> dict[str, Dataset]:
        return {split_name(spec): open_split(spec) for spec in self.data.val}

    def collate_fn(self) -> Callable:
        from flt_mol.data.collate import Collater, PeriodicImages

        images = (
            PeriodicImages(cutoff=self.data.image_cutoff, max_images=self.data.max_images)
            if self.data.periodic_images
            else None
        )
        return Collater(images=images)

    # -- statistics of the training split -------------------------------------------------------
    def setup(self) -> None:
        from flt_mol.data.references import TrivialBaselines

        ds = self.train_dataset()
        items = [ds[i] for i in range(len(ds))]
        if any(getattr(d, "y_relaxed", None) is None for d in items):
            raise InputError(f"training data {self.data.train!r} has structures without y_relaxed")
        self.normalizer = _fit_normalizer(items, references=self.data.element_references,
                                          normalize=self.data.normalize_energy)
        sq, n = 0.0, 0
        for d in items:
            if getattr(d, "pos_relaxed", None) is None:
                continue
            free = torch.as_tensor(d.fixed) == 0
            disp = (d.pos_relaxed - d.pos)[free]
            sq += float((disp.double() ** 2).sum())
            n += int(disp.numel())
        self.displacement_std = math.sqrt(sq / n) if n > 0 and sq > 0 else 1.0
        self.baselines = TrivialBaselines.fit(items).to_dict()

    def state_dict(self) -> dict[str, Any]:
        if self.normalizer is None:
            raise RuntimeError("IS2RETask.setup() (or load_state_dict) must run before state_dict()")
        n = self.normalizer
        return {
            "coef": n.coef.clone(), "intercept": n.intercept, "mean": n.mean, "std": n.std,
            "displacement_std": self.displacement_std, "baselines": self.baselines,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.normalizer = EnergyNormalizer(state["coef"], state["intercept"], state["mean"], state["std"])
        self.displacement_std = float(state["displacement_std"])
        self.baselines = state["baselines"]

    # -- model and loss ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return IS2REModel(self.config.model)

    def _reference(self, batch: Any) -> torch.Tensor:
        return self.normalizer.reference(batch.atomic_numbers, batch.real_mask)

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """``|E_pred - E_norm|`` (L1, mean over structures) ``+ w(step) * |d_pred - d/sigma_d|^2``
        (mean over free real atoms and xyz); both means are over the global batch."""
        if batch.y_relaxed is None:
            raise ValueError("training batch has no y_relaxed targets")
        if self.data.random_rotation:
            batch = rotate_batch(batch, random_rotations(batch.sid, seed=self.config.run.seed, step=step))
        out = model(batch)
        target = self.normalizer.normalize(batch.y_relaxed, self._reference(batch)).to(out["energy"].dtype)
        err = (out["energy"].float() - target).abs()
        loss_e = err.sum() * distributed.global_mean_scale(err.numel()).to(err.device)
        logs = {"energy_l1": float(loss_e.detach())}
        loss = loss_e
        if out.get("displacement") is not None and batch.displacement is not None:
            free = batch.real_mask & (batch.fixed == 0)
            d_t = batch.displacement / self.displacement_std
            sq = ((out["displacement"].float() - d_t) ** 2).sum(-1) * free.float()
            count = free.sum() * 3
            loss_d = sq.sum() * distributed.global_mean_scale(count.cpu()).to(sq.device)
            w = displacement_weight(step, total_steps=self.total_steps, start=self.data.displacement_weight[0],
                                    end=self.data.displacement_weight[1])
            loss = loss + w * loss_d
            logs["displacement_mse"] = float(loss_d.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, loader: Any, *, chunk_atoms: int | None = None
                ) -> tuple[list[Any], torch.Tensor, torch.Tensor | None]:
        """This rank's ``(ids, predicted energies [N] eV, targets [N] or None)`` over ``loader``.

        Batches with more than :data:`flt_mol.models.chunked.CHUNK_ABOVE` tokens go through
        :func:`flt_mol.models.chunked.chunked_energy`, ``chunk_atoms`` atoms at a time (default
        :data:`~flt_mol.models.chunked.DEFAULT_CHUNK_ATOMS`), when the model supports it
        (reciprocal periodicity, linear attention): the same energies up to float rounding, in
        memory linear in the atoms with a small constant (no per-atom random-feature tensors).
        """
        from flt_mol.models.chunked import CHUNK_ABOVE, DEFAULT_CHUNK_ATOMS, chunked_energy, supports_chunked

        chunk = chunk_atoms if chunk_atoms is not None else DEFAULT_CHUNK_ATOMS
        chunkable = supports_chunked(model)
        was_training = model.training
        model.eval()
        ids: list[Any] = []
        preds, targets = [], []
        has_targets = True
        device = next(model.parameters()).device
        for batch in loader:
            batch = batch.to(device)
            if chunkable and batch.padding_mask.numel() > CHUNK_ABOVE:
                energy = chunked_energy(model, batch, chunk_size=chunk)
            else:
                energy = model(batch)["energy"]
            preds.append(self.normalizer.denormalize(energy.float(), self._reference(batch)).cpu())
            if batch.y_relaxed is None:
                has_targets = False
            else:
                targets.append(batch.y_relaxed.double().cpu())
            sid = batch.sid
            ids.extend(sid.tolist() if torch.is_tensor(sid) else list(sid))
        model.train(was_training)
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.float64)
        target = torch.cat(targets) if has_targets and targets else None
        if not has_targets:
            target = None
        return ids, pred, target

    def split_baselines(self, name: str, dataset: Dataset) -> dict[str, float]:
        """Trivial-baseline MAEs on a split (fitted on train at setup), cached per split name."""
        if name not in self._baseline_cache:
            from flt_mol.data.references import TrivialBaselines

            items = [dataset[i] for i in range(len(dataset))]
            if any(getattr(d, "y_relaxed", None) is None for d in items):
                self._baseline_cache[name] = {}
            else:
                fitted = TrivialBaselines.from_dict(self.baselines)
                self._baseline_cache[name] = {k: float(v) for k, v in fitted.evaluate(items).items()}
        return self._baseline_cache[name]

    def evaluate(self, model: nn.Module, loaders: Mapping[str, Any], *,
                 predictions: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
        """``{split: {energy_mae, energy_mse, energy_within_threshold, n, baselines}, "average": ...}``.

        Totals are summed over ranks before the ratios are formed. ``predictions``, when given,
        receives this rank's ``(targets, predictions)`` per split (numpy) for parity plots.

        Raises:
            UsageError: (a ``ValueError``) a split has no ``y_relaxed`` targets (use
                ``flt-mol predict`` for those).
        """
        metrics: dict[str, Any] = {}
        for name, loader in loaders.items():
            _, pred, target = self.predict(model, loader)
            missing = torch.tensor([1.0 if target is None and len(pred) > 0 else 0.0])
            if float(distributed.all_reduce_sum(missing)) > 0:
                raise UsageError(
                    f"split {name!r} has no energy targets (y_relaxed): it cannot be evaluated; "
                    "use `flt-mol predict CHECKPOINT --data PATH --out FILE.npz` for predictions"
                )
            if target is None:
                target = torch.zeros(0, dtype=torch.float64)
            totals = distributed.all_reduce_sum(energy_totals(pred.double(), target))
            entry: dict[str, Any] = metrics_from_totals(totals)
            entry["baselines"] = self.split_baselines(name, loader.dataset)
            metrics[name] = entry
            if predictions is not None:
                predictions[name] = (target.numpy(), pred.numpy())
        if len(metrics) > 1:
            metrics["average"] = average_entry(metrics)
        return metrics

    def summary_metric(self, metrics: Mapping[str, Any]) -> float:
        key = "average" if "average" in metrics else next(iter(metrics))
        return float(metrics[key]["energy_mae"])

    def progress_metric(self, metrics: Mapping[str, Any]) -> tuple[str, float]:
        key = "average" if "average" in metrics else next(iter(metrics))
        name = "average energy MAE (eV)" if key == "average" else f"{key} energy MAE (eV)"
        return name, self.summary_metric(metrics)

    def format_metrics(self, metrics: Mapping[str, Any]) -> str:
        return format_table(metrics)


# --------------------------------------------------------------------------------------------
# S2EF
# --------------------------------------------------------------------------------------------

EMT_S2EF_VAL_SPLITS = EMT_VAL_SPLITS


@dataclass
class S2EFDataConfig:
    """Data, targets and loss of the S2EF task (structure -> energy and forces).

    Paths are an ``.lmdb`` file, a folder of shards, or ``emt_s2ef:SPLIT`` for the embedded
    EMT-S2EF data set (built on first use). Entries need the energy field ``energy_target`` and
    ``force [N, 3]``.

    The loss is fairchem's default for S2EF (its OC20 configs: energy ``mae`` with coefficient 1,
    forces ``l2mae`` with coefficient 100, forces on free atoms only, forces normalised by the
    energy's std): ``energy_coefficient * |E - E_t| + force_coefficient * mean_atoms |F - F_t|_2``,
    both in normalised units (``E_t = (y - ref - mean) / std``, ``F_t = force / std``). With
    ``adsorbate_force_weight = w != 1`` the force term is the weighted mean
    ``sum_i w_i |F_i - F_t,i|_2 / sum_i w_i`` (``w_i = w`` on adsorbate atoms, 1 elsewhere).
    """

    train: str = "emt_s2ef:train"
    val: list[str] = field(default_factory=lambda: [f"emt_s2ef:{s}" for s in EMT_S2EF_VAL_SPLITS])
    batch_size: int = 16  # global batch, split evenly across processes
    eval_batch_size: int = 32
    num_workers: int = 0
    max_train_items: int | None = None  # use the first N training frames (quick runs)
    max_val_items: int | None = None  # evaluate on the first N frames of each validation split
    # The energy field: "y" (EMT-S2EF: total energy) or "y_adsorption" (referenced to the clean
    # slab and the gas-phase adsorbate, as OC20's S2EF LMDBs store; relax-then-predict then gives
    # IS2RE adsorption energies directly).
    energy_target: str = "y"
    element_references: bool = True  # subtract a per-element linear fit before normalising
    normalize_energy: bool = True  # then divide (y - ref - mean) by the train std (forces too)
    energy_coefficient: float = 1.0
    force_coefficient: float = 100.0
    train_on_free_atoms: bool = True  # force loss on free atoms only (fairchem's OC20 default)
    # Weight of adsorbate atoms (tag 2) in the force loss's mean (1: fairchem's plain mean). The
    # adsorbate's forces are ~3x the surface's and its soft modes decide the relaxed geometry.
    adsorbate_force_weight: float = 1.0
    # Move every training structure by a random in-plane lattice translation (fractions of a and
    # b). FLT's FAVOR+ kernel makes one feature draw invariant to wrapping but not to
    # translations that are not lattice vectors (README: forces); this teaches the invariance.
    random_translation: bool = False

    def validate(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        for name in ("max_train_items", "max_val_items"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"data.{name} must be >= 1 or null, got {v}")
        if self.energy_target not in ("y", "y_adsorption"):
            raise ConfigError(f"data.energy_target must be 'y' or 'y_adsorption', got {self.energy_target!r}")
        if self.energy_coefficient < 0 or self.force_coefficient < 0:
            raise ConfigError("data.energy_coefficient and data.force_coefficient must be >= 0")
        if not self.adsorbate_force_weight > 0:
            raise ConfigError(f"data.adsorbate_force_weight must be > 0, got {self.adsorbate_force_weight}")
        names = [split_name(v) for v in self.val]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.val split names must be unique, got {names}")


def random_translations(batch: Any, *, seed: int, step: int) -> torch.Tensor:
    """``[B, 1, 3]`` shifts ``s_a a + s_b b`` (``s ~ U(0, 1)``) along each structure's periodic
    cell rows ``a``, ``b``, from a generator seeded by ``(seed, step)``."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + 54_321) % (2**63 - 1))
    frac = torch.rand(batch.cell.shape[0], 3, generator=g, dtype=torch.float64)
    pbc = batch.pbc if batch.pbc is not None else torch.tensor([[True, True, False]]).expand(frac.shape[0], 3)
    frac = frac * pbc.to(frac.dtype).cpu()
    shift = torch.einsum("bi,bix->bx", frac.to(batch.cell.device), batch.cell.double())
    return shift[:, None, :].to(batch.pos.dtype)


@dataclass(frozen=True)
class EnergyFieldCollater:
    """Picklable ``collate_fn``: :func:`~flt_mol.data.collate.collate_atoms` without images, with the
    items' ``field`` energy (``y`` or ``y_adsorption``) as the batch's ``y``."""

    field: str = "y"

    def __call__(self, items: list[Any]) -> Any:
        from flt_mol.data.collate import collate_atoms

        if self.field != "y":
            items = [_with_energy(d, getattr(d, self.field, None)) for d in items]
        return collate_atoms(items)


def _with_energy(data: Any, value: Any) -> Any:
    import copy

    out = copy.copy(data)
    out.y = value
    return out


class S2EFTask(Task):
    """Structure -> total (or referenced) energy and conservative forces (:mod:`flt_mol.models.s2ef`).

    Metrics are OC20's S2EF metrics (:func:`flt_mol.train.metrics.s2ef_totals`: energy MAE, force
    MAE, force cosine, EFwT; forces scored on free atoms) beside the trivial baselines of
    :class:`flt_mol.data.references.S2EFBaselines` (train-mean or composition-linear energy, zero
    forces), fitted on the training split.
    """

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        data: S2EFDataConfig = config.data
        self.data = data
        self.batch_size = data.batch_size
        self.eval_batch_size = data.eval_batch_size
        self.num_workers = data.num_workers
        self.normalizer: EnergyNormalizer | None = None
        self.baselines: dict[str, Any] | None = None  # S2EFBaselines.to_dict(), fitted on train
        self._baseline_cache: dict[str, dict[str, Any]] = {}

    # -- data ---------------------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        return open_split(self.data.train, max_items=self.data.max_train_items)

    def val_datasets(self) -> dict[str, Dataset]:
        return {split_name(spec): open_split(spec, max_items=self.data.max_val_items) for spec in self.data.val}

    def collate_fn(self) -> Callable:
        return EnergyFieldCollater(self.data.energy_target)

    # -- statistics of the training split -------------------------------------------------------
    def setup(self) -> None:
        from flt_mol.data.references import S2EFBaselines

        ds = self.train_dataset()
        items = [ds[i] for i in range(len(ds))]
        target = self.data.energy_target
        for i, d in enumerate(items):
            if getattr(d, target, None) is None or getattr(d, "force", None) is None:
                raise InputError(f"training data {self.data.train!r}: frame {i} has no {target!r} or no 'force' "
                                 "(S2EF needs energies and forces)")
        self.normalizer = _fit_normalizer(items, references=self.data.element_references,
                                          normalize=self.data.normalize_energy, target=target)
        self.baselines = S2EFBaselines.fit(items, target=target).to_dict()

    def state_dict(self) -> dict[str, Any]:
        if self.normalizer is None:
            raise RuntimeError("S2EFTask.setup() (or load_state_dict) must run before state_dict()")
        n = self.normalizer
        return {"coef": n.coef.clone(), "intercept": n.intercept, "mean": n.mean, "std": n.std,
                "baselines": self.baselines}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.normalizer = EnergyNormalizer(state["coef"], state["intercept"], state["mean"], state["std"])
        self.baselines = state["baselines"]

    # -- model and loss ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from flt_mol.models.s2ef import S2EFModel

        return S2EFModel(self.config.model)

    def _reference(self, batch: Any) -> torch.Tensor:
        return self.normalizer.reference(batch.atomic_numbers, batch.real_mask)

    def _energy_field(self, batch: Any) -> torch.Tensor:
        # EnergyFieldCollater put the items' ``energy_target`` field into ``batch.y``.
        if batch.y is None:
            raise InputError(f"batch has no {self.data.energy_target!r} energies")
        return batch.y

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """``c_E |E - E_t| + c_F |F - F_t|_2`` (S2EFDataConfig); means over the global batch's
        structures and (free) atoms."""
        if batch.force is None:
            raise ValueError("training batch has no force targets")
        if self.data.random_translation:
            from dataclasses import replace

            batch = replace(batch, pos=batch.pos + random_translations(batch, seed=self.config.run.seed, step=step))
        out = model(batch)
        target = self.normalizer.normalize(self._energy_field(batch), self._reference(batch)).to(out["energy"].dtype)
        err = (out["energy"] - target).abs()
        loss_e = err.sum() * distributed.global_mean_scale(err.numel()).to(err.device)
        scored = batch.real_mask
        if self.data.train_on_free_atoms:
            scored = scored & (batch.fixed == 0)
        f_t = batch.force.to(out["forces"].dtype) / self.normalizer.std
        weight = scored.to(f_t.dtype)  # [B, L]
        if self.data.adsorbate_force_weight != 1.0:
            weight = weight * torch.where(batch.tags == 2, self.data.adsorbate_force_weight, 1.0).to(f_t.dtype)
        l2 = ((out["forces"] - f_t).square().sum(-1) + 1e-12).sqrt() * weight  # [B, L]
        loss_f = l2.sum() * distributed.global_mean_scale(weight.sum().detach().cpu()).to(l2.device)
        loss = self.data.energy_coefficient * loss_e + self.data.force_coefficient * loss_f
        logs = {"energy_l1": float(loss_e.detach()), "force_l2": float(loss_f.detach()), "loss": float(loss.detach())}
        return loss, logs

    # -- inference ----------------------------------------------------------------------------------
    def predict_batch(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(energies [B] eV float64, forces [B, L, 3] eV/A float64)`` of one batch (no graph kept)."""
        out = model(batch, forces=True, create_graph=False)
        energy = self.normalizer.denormalize(out["energy"].detach(), self._reference(batch))
        forces = out["forces"].detach().double() * self.normalizer.std
        return energy, forces

    def split_baselines(self, name: str, dataset: Dataset) -> dict[str, Any]:
        """S2EF metrics of the trivial baselines on a split (fitted on train), cached per split."""
        if name not in self._baseline_cache:
            from flt_mol.data.references import S2EFBaselines

            items = [dataset[i] for i in range(len(dataset))]
            fitted = S2EFBaselines.from_dict(self.baselines)
            ok = all(getattr(d, fitted.target, None) is not None and getattr(d, "force", None) is not None
                     for d in items)
            self._baseline_cache[name] = fitted.evaluate(items) if ok and items else {}
        return self._baseline_cache[name]

    def evaluate(self, model: nn.Module, loaders: Mapping[str, Any], *,
                 predictions: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
        """``{split: {energy_mae, energy_mse, energy_within_threshold, forces_mae, forces_mse,
        forces_cos, energy_forces_within_threshold, n, n_atoms, baselines}, "average": ...}``
        (forces on free atoms; totals summed over ranks before the ratios).

        Raises:
            UsageError: a split lacks energies or forces.
        """
        from flt_mol.train.metrics import s2ef_metrics_from_totals, s2ef_totals

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        metrics: dict[str, Any] = {}
        for name, loader in loaders.items():
            totals = torch.zeros(10, dtype=torch.float64)
            preds, targets = [], []
            for batch in loader:
                batch = batch.to(device)
                if batch.force is None or batch.y is None:
                    raise UsageError(f"split {name!r} has no S2EF targets ({self.data.energy_target!r} and 'force')")
                energy, forces = self.predict_batch(model, batch)
                y = self._energy_field(batch).double()
                real = batch.real_mask
                totals += s2ef_totals(energy.cpu(), y.cpu(), forces[real].cpu(), batch.force[real].double().cpu(),
                                      batch.natoms.cpu(), fixed=batch.fixed[real].cpu()).cpu()
                preds.append(energy.cpu())
                targets.append(y.cpu())
            totals = distributed.all_reduce_sum(totals)
            entry: dict[str, Any] = s2ef_metrics_from_totals(totals)
            entry["baselines"] = self.split_baselines(name, loader.dataset)
            metrics[name] = entry
            if predictions is not None and preds:
                predictions[name] = (torch.cat(targets).numpy(), torch.cat(preds).numpy())
        model.train(was_training)
        if len(metrics) > 1:
            metrics["average"] = average_entry(metrics)
        return metrics

    def summary_metric(self, metrics: Mapping[str, Any]) -> float:
        """Force MAE (OC20's primary S2EF metric) plus energy MAE: best.pt wants both."""
        key = "average" if "average" in metrics else next(iter(metrics))
        return float(metrics[key]["forces_mae"]) + float(metrics[key]["energy_mae"])

    def progress_metric(self, metrics: Mapping[str, Any]) -> tuple[str, float]:
        key = "average" if "average" in metrics else next(iter(metrics))
        where = "average" if key == "average" else key
        return f"{where} force MAE (eV/A)", float(metrics[key]["forces_mae"])

    def format_metrics(self, metrics: Mapping[str, Any]) -> str:
        return format_table(metrics)
