"""Text loaders: WikiText token files the tests write, the offline corpus, fixed-length blocks."""

from __future__ import annotations

import pytest
import torch

from flt_mol.data.text import (
    EOS,
    UNK,
    TokenBlocks,
    Vocab,
    build_vocab,
    load_corpus,
    load_pydoc_topics,
    load_wikitext103,
    pydoc_topics_text,
    read_wikitext_tokens,
)


def write_wikitext(root, train="the cat sat\n\n the dog sat down\n", valid="the bird sat\n", test="a cat\n"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "wiki.train.tokens").write_text(train, encoding="utf-8")
    (root / "wiki.valid.tokens").write_text(valid, encoding="utf-8")
    (root / "wiki.test.tokens").write_text(test, encoding="utf-8")
    return root


def test_wikitext_words_eos_and_train_vocabulary(tmp_path):
    root = write_wikitext(tmp_path / "wikitext-103")
    assert read_wikitext_tokens(root / "wiki.train.tokens") == [
        "the", "cat", "sat", EOS, EOS, "the", "dog", "sat", "down", EOS,
    ]
    splits, vocab = load_wikitext103(root)
    assert vocab.tokens[:2] == [UNK, EOS]
    # Counts: the 2, sat 2, then cat/dog/down once each, alphabetical.
    assert vocab.tokens[2:] == ["sat", "the", "cat", "dog", "down"]
    assert vocab.decode(splits["train"]) == read_wikitext_tokens(root / "wiki.train.tokens")
    # "bird" never occurs in train -> <unk>.
    assert vocab.decode(splits["valid"]) == ["the", UNK, "sat", EOS]
    assert splits["test"].tolist() == [0, vocab.index["cat"], vocab.index[EOS]]


def test_wikitext_errors_name_the_file(tmp_path):
    root = write_wikitext(tmp_path / "w")
    (root / "wiki.valid.tokens").unlink()
    with pytest.raises(FileNotFoundError, match="wiki.valid.tokens"):
        load_wikitext103(root)
    root = write_wikitext(tmp_path / "e", train="  \n\n")
    with pytest.raises(ValueError, match="wiki.train.tokens.*empty"):
        load_wikitext103(root)
    root = write_wikitext(tmp_path / "b")
    (root / "wiki.test.tokens").write_bytes(b"ok \xff\xfe broken\n")
    with pytest.raises(ValueError, match="wiki.test.tokens.*UTF-8"):
        load_wikitext103(root)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_wikitext103(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        load_wikitext103(root, splits=("dev",))


def test_vocab_rules():
    vocab = build_vocab(["b", "a", "b", "c", "a", "b"])
    assert vocab.tokens == [UNK, EOS, "b", "a", "c"]
    assert vocab.encode(["c", "zzz"]).tolist() == [4, 0]
    assert build_vocab(["x", "y", "y"], min_freq=2).tokens == [UNK, EOS, "y"]
    with pytest.raises(ValueError, match="<unk>"):
        Vocab(["a", UNK])
    with pytest.raises(ValueError, match="duplicates"):
        Vocab([UNK, "a", "a"])


def test_offline_corpus_is_deterministic_and_split_without_overlap():
    text, sha = pydoc_topics_text()
    assert len(text) > 100_000 and len(sha) == 64
    splits, vocab = load_pydoc_topics(level="char")
    again, vocab2 = load_pydoc_topics(level="char")
    assert vocab.tokens == vocab2.tokens and torch.equal(splits["valid"], again["valid"])
    n_train, n_valid = splits["train"].numel(), splits["valid"].numel()
    assert n_train + n_valid == len(text)  # char level: every character in exactly one split
    assert 0.08 < n_valid / len(text) < 0.12
    # Contiguous split: train is the text's beginning, valid its end.
    assert "".join(vocab.decode(splits["train"][:200])) == text[:200]
    assert "".join(vocab.decode(splits["valid"][-200:])).replace(UNK, "?") == "".join(
        c if c in vocab.index else "?" for c in text[-200:]
    )
    words, wvocab = load_pydoc_topics(level="word")
    assert wvocab.tokens[:2] == [UNK, EOS] and words["train"].numel() > 50_000
    with pytest.raises(ValueError, match="level"):
        load_pydoc_topics(level="byte")
    with pytest.raises(ValueError, match="source"):
        load_corpus("ptb")
    with pytest.raises(ValueError, match="root"):
        load_corpus("wikitext103")


def test_token_blocks_shift_by_one():
    ids = torch.arange(23)
    ds = TokenBlocks(ids, 5)
    assert len(ds) == 4  # needs 5 + 1 ids per block: starts 0, 5, 10, 15
    x, y = ds[3]
    assert x.tolist() == [15, 16, 17, 18, 19] and y.tolist() == [16, 17, 18, 19, 20]
    assert torch.equal(ds[-1][0], x)
    strided = TokenBlocks(ids, 5, stride=2)
    assert len(strided) == 9 and strided[8][1][-1].item() == 21
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError, match="shorter"):
        TokenBlocks(torch.arange(5), 5)
    with pytest.raises(ValueError, match="1D"):
        TokenBlocks(torch.zeros(2, 10, dtype=torch.long), 3)
