"""The sequence tasks of :mod:`flt_mol.train.tasks`: causal language modelling and image classification.

``task: lm``  -> :class:`LMTask`  (data :class:`LMDataConfig`, model :class:`flt_mol.models.lm.LMConfig`);
metrics ``{"val": {"loss", "perplexity", "tokens"}}`` with ``loss`` the mean next-token
cross-entropy (nats) over every validation token and ``perplexity = exp(loss)``.

``task: vit`` -> :class:`ViTTask` (data :class:`ViTDataConfig`, model :class:`flt_mol.models.vit.ViTConfig`);
metrics ``{"val": {"loss", "accuracy", "n"}}``.

Both reduce totals (sum of losses, counts) across processes before forming ratios, and scale the
training loss with :func:`flt_mol.train.distributed.global_mean_scale` so N processes take the
same step as one on the same global batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset, default_collate

from flt_mol.models.lm import CausalLM, LMConfig
from flt_mol.models.vit import ViTConfig, VisionTransformer
from flt_mol.train import distributed
from flt_mol.train.config import ConfigError, TrainConfig
from flt_mol.train.tasks import Task

__all__ = [
    "LMDataConfig",
    "ViTDataConfig",
    "LMTask",
    "ViTTask",
    "config_types",
    "build_sequence_task",
]


@dataclass
class LMDataConfig:
    """Data of the LM task.

    ``source``: ``pydoc-topics`` (offline default, :func:`flt_mol.data.text.load_pydoc_topics`)
    or ``wikitext103`` (``root`` = folder of ``wiki.*.tokens``; validation on ``wiki.valid.tokens``).
    """

    source: str = "pydoc-topics"
    root: str | None = None
    level: str = "char"  # char | word (pydoc-topics); WikiText is word level
    block_size: int = 128  # tokens per training / evaluation block (no context across blocks)
    batch_size: int = 16  # global batch, split evenly across processes
    eval_batch_size: int = 32
    num_workers: int = 0
    max_val_blocks: int | None = None  # evaluate on the first N validation blocks (quick runs)

    def validate(self) -> None:
        if self.source not in ("pydoc-topics", "wikitext103"):
            raise ConfigError(f"data.source must be pydoc-topics or wikitext103, got {self.source!r}")
        if self.source == "wikitext103" and self.root is None:
            raise ConfigError("data.source=wikitext103 needs data.root (the folder of wiki.*.tokens)")
        if self.level not in ("char", "word"):
            raise ConfigError(f"data.level must be char or word, got {self.level!r}")
        if self.block_size < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("data.block_size, data.batch_size and data.eval_batch_size must be >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_val_blocks is not None and self.max_val_blocks < 1:
            raise ConfigError(f"data.max_val_blocks must be >= 1 or null, got {self.max_val_blocks}")


@dataclass
class ViTDataConfig:
    """Data of the ViT task.

    ``source``: ``glyph-digits`` (offline default, :func:`flt_mol.data.images.glyph_digits`;
    ``train_per_class`` / ``val_per_class`` images per class, seeds ``seed`` / ``seed + 1``),
    ``sklearn-digits`` (8x8, needs scikit-learn; set ``model.image_size: 8``) or ``idx``
    (MNIST / Fashion-MNIST IDX files in ``root``; validation = the t10k files).
    """

    source: str = "glyph-digits"
    root: str | None = None
    train_per_class: int = 500
    val_per_class: int = 100
    seed: int = 0
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    max_val_items: int | None = None

    def validate(self) -> None:
        if self.source not in ("glyph-digits", "sklearn-digits", "idx"):
            raise ConfigError(f"data.source must be glyph-digits, sklearn-digits or idx, got {self.source!r}")
        if self.source == "idx" and self.root is None:
            raise ConfigError("data.source=idx needs data.root (the folder of the IDX files)")
        if self.train_per_class < 1 or self.val_per_class < 1:
            raise ConfigError("data.train_per_class and data.val_per_class must be >= 1")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_val_items is not None and self.max_val_items < 1:
            raise ConfigError(f"data.max_val_items must be >= 1 or null, got {self.max_val_items}")


def config_types(task: str) -> tuple[type, type]:
    """(data dataclass, model dataclass) of ``task`` (``lm`` or ``vit``)."""
    if task == "lm":
        return LMDataConfig, LMConfig
    if task == "vit":
        return ViTDataConfig, ViTConfig
    raise ConfigError(f"sequence task must be lm or vit, got {task!r}")


def build_sequence_task(config: TrainConfig) -> Task:
    if config.task == "lm":
        return LMTask(config)
    if config.task == "vit":
        return ViTTask(config)
    raise ConfigError(f"sequence task must be lm or vit, got {config.task!r}")


def _first(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None or n >= len(dataset) else Subset(dataset, range(n))


# --------------------------------------------------------------------------------------------
# Language modelling
# --------------------------------------------------------------------------------------------


class LMTask(Task):
    """Next-token prediction on fixed-length blocks (no context carried across blocks).

    Loss: mean cross-entropy over the global batch's tokens. State: the vocabulary (so a
    checkpoint can be evaluated and visualised without rebuilding it).
    """

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        from flt_mol.data.text import load_corpus

        data: LMDataConfig = config.data
        model: LMConfig = config.model
        if data.block_size > model.max_len:
            raise ConfigError(f"data.block_size ({data.block_size}) exceeds model.max_len ({model.max_len})")
        self.data = data
        self.splits, self.vocab = load_corpus(data.source, root=data.root, level=data.level)
        if model.vocab_size not in (0, len(self.vocab)):
            raise ConfigError(f"model.vocab_size={model.vocab_size} but the corpus vocabulary has {len(self.vocab)} tokens")
        self.batch_size = data.batch_size
        self.eval_batch_size = data.eval_batch_size
        self.num_workers = data.num_workers

    def state_dict(self) -> dict[str, Any]:
        return {"vocab": list(self.vocab.tokens)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tokens = list(state.get("vocab", []))
        if tokens != list(self.vocab.tokens):
            raise ValueError(
                f"the checkpoint's vocabulary ({len(tokens)} tokens) differs from the corpus's "
                f"({len(self.vocab)}): the data changed since training"
            )

    def train_dataset(self) -> Dataset:
        from flt_mol.data.text import TokenBlocks

        return TokenBlocks(self.splits["train"], self.data.block_size)

    def val_datasets(self) -> dict[str, Dataset]:
        from flt_mol.data.text import TokenBlocks

        return {"val": _first(TokenBlocks(self.splits["valid"], self.data.block_size), self.data.max_val_blocks)}

    def collate_fn(self) -> Callable:
        return default_collate

    def model_config(self) -> LMConfig:
        return dataclasses.replace(self.config.model, vocab_size=len(self.vocab))

    def build_model(self) -> nn.Module:
        return CausalLM(self.model_config())

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, targets = batch
        logits = model(tokens)  # [B, L, V]
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        loss = ce * distributed.global_mean_scale(targets.numel()).to(ce.device)
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loaders: Mapping[str, Any]) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        metrics: dict[str, Any] = {}
        try:
            for name, loader in loaders.items():
                totals = torch.zeros(2, dtype=torch.float64)
                for tokens, targets in loader:
                    device = next(model.parameters()).device
                    logits = model(tokens.to(device))
                    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum")
                    totals += torch.tensor([float(ce), targets.numel()], dtype=torch.float64)
                totals = distributed.all_reduce_sum(totals)
                n = float(totals[1])
                loss = float(totals[0]) / n if n > 0 else float("nan")
                metrics[name] = {"loss": loss, "perplexity": math.exp(loss) if n > 0 else float("nan"), "tokens": int(n)}
        finally:
            model.train(was_training)
        return metrics

    def summary_metric(self, metrics: Mapping[str, Any]) -> float:
        return float(metrics["val"]["loss"])

    def progress_metric(self, metrics: Mapping[str, Any]) -> tuple[str, float]:
        return "validation perplexity", float(metrics["val"]["perplexity"])

    def format_metrics(self, metrics: Mapping[str, Any]) -> str:
        return "\n".join(
            f"{name}: loss {m['loss']:.4f}  perplexity {m['perplexity']:.3f}  ({m['tokens']} tokens)"
            for name, m in metrics.items()
        )


# --------------------------------------------------------------------------------------------
# Image classification
# --------------------------------------------------------------------------------------------


class ViTTask(Task):
    """Classification with cross-entropy; accuracy on the validation split."""

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        data: ViTDataConfig = config.data
        self.data = data
        self.batch_size = data.batch_size
        self.eval_batch_size = data.eval_batch_size
        self.num_workers = data.num_workers
        self._train: Dataset | None = None
        self._val: Dataset | None = None

    def _load(self, split: str) -> Dataset:
        from flt_mol.data.images import load_image_split

        d = self.data
        per_class = d.train_per_class if split == "train" else d.val_per_class
        ds = load_image_split(d.source, split, root=d.root, num_per_class=per_class, seed=d.seed)
        m: ViTConfig = self.config.model
        h, w = ds.images.shape[1:]
        if (h, w) != (m.image_size, m.image_size) or m.in_channels != 1:
            raise ConfigError(
                f"data gives 1 x {h} x {w} images but model expects {m.in_channels} x {m.image_size} x {m.image_size}"
            )
        return ds

    def train_dataset(self) -> Dataset:
        if self._train is None:
            self._train = self._load("train")
        return self._train

    def val_datasets(self) -> dict[str, Dataset]:
        if self._val is None:
            self._val = _first(self._load("val"), self.data.max_val_items)
        return {"val": self._val}

    def collate_fn(self) -> Callable:
        return default_collate

    def build_model(self) -> nn.Module:
        return VisionTransformer(self.config.model)

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch
        logits = model(images)
        ce = F.cross_entropy(logits.float(), labels, reduction="sum")
        loss = ce * distributed.global_mean_scale(labels.numel()).to(ce.device)
        acc = float((logits.argmax(-1) == labels).float().mean())
        return loss, {"loss": float(loss.detach()), "accuracy": acc}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loaders: Mapping[str, Any]) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        metrics: dict[str, Any] = {}
        try:
            for name, loader in loaders.items():
                totals = torch.zeros(3, dtype=torch.float64)
                device = next(model.parameters()).device
                for images, labels in loader:
                    logits = model(images.to(device)).float()
                    labels = labels.to(device)
                    ce = F.cross_entropy(logits, labels, reduction="sum")
                    correct = (logits.argmax(-1) == labels).sum()
                    totals += torch.tensor([float(ce), float(correct), labels.numel()], dtype=torch.float64)
                totals = distributed.all_reduce_sum(totals)
                n = float(totals[2])
                metrics[name] = {
                    "loss": float(totals[0]) / n if n > 0 else float("nan"),
                    "accuracy": float(totals[1]) / n if n > 0 else float("nan"),
                    "n": int(n),
                }
        finally:
            model.train(was_training)
        return metrics

    def summary_metric(self, metrics: Mapping[str, Any]) -> float:
        return float(metrics["val"]["loss"])

    def progress_metric(self, metrics: Mapping[str, Any]) -> tuple[str, float]:
        return "validation accuracy", float(metrics["val"]["accuracy"])

    def format_metrics(self, metrics: Mapping[str, Any]) -> str:
        return "\n".join(
            f"{name}: loss {m['loss']:.4f}  accuracy {m['accuracy']:.4f}  ({m['n']} images)"
            for name, m in metrics.items()
        )
