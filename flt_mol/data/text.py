"""Text corpora for the causal language model.

Two sources, one output shape (a 1D ``LongTensor`` of token ids per split plus a :class:`Vocab`):

* **WikiText-103** token files (``wiki.train.tokens``, ``wiki.valid.tokens``, ``wiki.test.tokens``)
  for users who have them: word level, every line's whitespace-separated words followed by
  ``<eos>`` (the convention of PyTorch's word-language-model example and of the papers that
  report WikiText-103 perplexity); the vocabulary is built from the training split, words seen
  only in valid/test map to ``<unk>`` (the files already use ``<unk>`` for rare words).
* **pydoc-topics**, the offline default: the English prose of the Python language reference that
  CPython ships as ``pydoc_data.topics`` (~465k characters under CPython 3.11; PSF licence).
  It needs no download. Topics are taken in sorted-key order and concatenated; the first 90%
  of the characters are train, the rest validation (a contiguous, deterministic split). Character
  or word level. Its exact content follows the Python version: :func:`pydoc_topics_text` returns
  the text's SHA-256 so runs can record which one they used.

:class:`TokenBlocks` cuts a token stream into fixed-length ``(input, target)`` blocks, target
shifted by one, as every model in the paper's Table 1 is trained and evaluated (no context
carried across blocks).
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from flt_mol.errors import InputError, UsageError

__all__ = [
    "Vocab",
    "build_vocab",
    "read_wikitext_tokens",
    "load_wikitext103",
    "pydoc_topics_text",
    "load_pydoc_topics",
    "load_corpus",
    "TokenBlocks",
    "WIKITEXT_FILES",
]

UNK = "<unk>"
EOS = "<eos>"
WIKITEXT_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}


@dataclass
class Vocab:
    """Token <-> id table. ``tokens[0]`` is ``<unk>``; unknown tokens encode to it."""

    tokens: list[str]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.tokens or self.tokens[0] != UNK:
            raise ValueError(f"Vocab.tokens must start with {UNK!r}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("Vocab.tokens contains duplicates")
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Iterable[str]) -> torch.Tensor:
        """Ids of ``tokens`` (``<unk>`` = 0 for unknown ones) as a 1D LongTensor."""
        idx = self.index
        return torch.tensor([idx.get(t, 0) for t in tokens], dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[int(i)] for i in ids]


def build_vocab(tokens: Iterable[str], *, specials: Sequence[str] = (UNK, EOS), min_freq: int = 1) -> Vocab:
    """Vocabulary of ``tokens``: specials first, then by decreasing count, ties alphabetical
    (deterministic), dropping tokens seen fewer than ``min_freq`` times."""
    if not specials or specials[0] != UNK:
        raise ValueError(f"specials must start with {UNK!r}, got {list(specials)}")
    counts = collections.Counter(tokens)
    rest = sorted((t for t, c in counts.items() if c >= min_freq and t not in specials), key=lambda t: (-counts[t], t))
    return Vocab(list(specials) + rest)


def _read_text(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err


def read_wikitext_tokens(path: str | os.PathLike) -> list[str]:
    """Words of a WikiText token file, ``<eos>`` after every line (blank lines included)."""
    text = _read_text(path)
    if not text.strip():
        raise InputError(f"{os.fspath(path)}: token file is empty")
    words: list[str] = []
    for line in text.splitlines():
        words.extend(line.split())
        words.append(EOS)
    return words


def load_wikitext103(root: str | os.PathLike, *, splits: Sequence[str] = ("train", "valid", "test")) -> tuple[dict[str, torch.Tensor], Vocab]:
    """Token ids per split from a WikiText-103 folder; vocabulary from ``wiki.train.tokens``.

    Args:
        root: folder holding ``wiki.{train,valid,test}.tokens`` (the ``wikitext-103`` folder
            of the official archive).
        splits: which splits to return ("train" is always read, for the vocabulary).

    Returns ``({split: LongTensor [N]}, vocab)``.
    """
    for s in splits:
        if s not in WIKITEXT_FILES:
            raise ValueError(f"unknown WikiText split {s!r}; expected one of {sorted(WIKITEXT_FILES)}")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"WikiText folder not found: {root}")
    train_words = read_wikitext_tokens(os.path.join(root, WIKITEXT_FILES["train"]))
    vocab = build_vocab(train_words)
    out = {}
    for s in splits:
        words = train_words if s == "train" else read_wikitext_tokens(os.path.join(root, WIKITEXT_FILES[s]))
        out[s] = vocab.encode(words)
    return out, vocab


def pydoc_topics_text() -> tuple[str, str]:
    """The offline corpus: ``pydoc_data.topics`` in sorted-key order, and its SHA-256 (hex)."""
    from pydoc_data import topics  # stdlib; imported here so the module stays light

    text = "\n\n".join(topics.topics[k].strip("\n") for k in sorted(topics.topics))
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


_WORD_RE = re.compile(r"\w+|[^\w\s]")


def _tokenize(text: str, level: str) -> list[str]:
    if level == "char":
        return list(text)
    if level == "word":
        words: list[str] = []
        for line in text.splitlines():
            words.extend(_WORD_RE.findall(line))
            words.append(EOS)
        return words
    raise ValueError(f"level must be 'char' or 'word', got {level!r}")


def load_pydoc_topics(*, level: str = "char", val_fraction: float = 0.1) -> tuple[dict[str, torch.Tensor], Vocab]:
    """Offline default corpus split into ``{"train", "valid"}`` token ids and its vocabulary.

    The split is by position in the text (the last ``val_fraction`` of characters is validation),
    so it is deterministic and the two splits share no passage. Word level splits words and
    punctuation (``\\w+|[^\\w\\s]``) and ends each line with ``<eos>``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    text, _ = pydoc_topics_text()
    cut = int(len(text) * (1.0 - val_fraction))
    line_start = text.rfind("\n", 0, cut)
    if line_start >= 0:
        cut = line_start + 1  # split at a line start so no word is cut in two
    train, valid = _tokenize(text[:cut], level), _tokenize(text[cut:], level)
    vocab = build_vocab(train, specials=(UNK, EOS) if level == "word" else (UNK,))
    return {"train": vocab.encode(train), "valid": vocab.encode(valid)}, vocab


def load_corpus(source: str, *, root: str | None = None, level: str = "char") -> tuple[dict[str, torch.Tensor], Vocab]:
    """``source="pydoc-topics"`` (offline default, ``level`` char|word) or ``"wikitext103"``
    (``root`` = folder of token files, word level). Returns splits with at least train/valid."""
    if source == "pydoc-topics":
        return load_pydoc_topics(level=level)
    if source == "wikitext103":
        if root is None:
            raise UsageError("data source 'wikitext103' needs root= the folder holding wiki.*.tokens")
        if level != "word":
            raise UsageError(f"WikiText-103 is word level; got level={level!r}")
        return load_wikitext103(root)
    raise UsageError(f"unknown text source {source!r}; expected 'pydoc-topics' or 'wikitext103'")


class TokenBlocks(Dataset):
    """Fixed-length blocks of a token stream: item ``n`` is ``(ids[s:s+L], ids[s+1:s+L+1])`` with
    ``s = n * stride``. The tail that does not fill a block is dropped.

    Shapes: item ``(input [L], target [L])`` LongTensors.
    """

    def __init__(self, ids: torch.Tensor, block_size: int, *, stride: int | None = None):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1D, got shape {tuple(ids.shape)}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.stride = stride if stride is not None else block_size
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if ids.numel() < block_size + 1:
            raise InputError(f"token stream of {ids.numel()} ids is shorter than one block ({block_size} + 1)")
        self.ids = ids.long()
        self.block_size = block_size

    def __len__(self) -> int:
        return (self.ids.numel() - 1 - self.block_size) // self.stride + 1

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= n < len(self):
            raise IndexError(f"block {n} out of range for {len(self)} blocks")
        n = n % len(self)
        s = n * self.stride
        chunk = self.ids[s : s + self.block_size + 1]
        return chunk[:-1], chunk[1:]

    def __repr__(self) -> str:
        return f"TokenBlocks(num_tokens={self.ids.numel()}, block_size={self.block_size}, stride={self.stride}, len={len(self)})"
