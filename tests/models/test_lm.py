"""Causal LM: no variant sees the future; padding is invisible; each variant can fit a tiny batch."""

from __future__ import annotations

import json

import pytest
import torch

from flt_mol.models.lm import CausalLM, LMConfig
from flt_mol.train.config import ConfigError

VARIANTS = [
    ("flt", "gaussian_mixture"),
    ("flt", "local"),
    ("performer", "none"),
    ("linear", "none"),
    ("cosformer", "none"),
    ("loglinear", "none"),
    ("exact", "local"),
]
IDS = [f"{a}-{r}" for a, r in VARIANTS]

# float32 logits of O(1): rounding ~1e-7 per operation through 2 layers stays below 1e-5.
TOL: dict[str, dict[str, float]] = {}
DEFAULT_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(attention: str, rpe: str, **kw) -> CausalLM:
    cfg = LMConfig(attention=attention, rpe=rpe, num_layers=2, num_heads=2, dim=32, ffn_dim=64,
                   num_kernel_features=16, num_rpe_features=8, rpe_terms=3, max_len=64, dropout=0.0,
                   vocab_size=13, **kw)
    return CausalLM(cfg)


@pytest.mark.parametrize("attention,rpe", VARIANTS, ids=IDS)
def test_never_sees_the_future(attention, rpe):
    model = tiny(attention, rpe).eval()
    tokens = torch.randint(0, 13, (2, 40))
    cut = 23
    changed = tokens.clone()
    changed[:, cut:] = (tokens[:, cut:] + 1 + torch.randint(0, 11, (2, 40 - cut))) % 13  # every later token differs
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(b[:, :cut], a[:, :cut], **TOL.get(attention, DEFAULT_TOL))
    assert (b[:, cut:] - a[:, cut:]).abs().max() > 1e-3  # the test can fail: later logits do move


@pytest.mark.parametrize("attention,rpe", VARIANTS, ids=IDS)
def test_prefix_alone_gives_the_same_logits(attention, rpe):
    """Stronger than content causality: not even the number of later tokens leaks backwards."""
    model = tiny(attention, rpe).eval()
    tokens = torch.randint(0, 13, (2, 40))
    torch.testing.assert_close(model(tokens[:, :19]), model(tokens)[:, :19], **TOL.get(attention, DEFAULT_TOL))


@pytest.mark.parametrize("attention,rpe", VARIANTS, ids=IDS)
def test_right_padding_is_invisible(attention, rpe):
    model = tiny(attention, rpe).eval()
    tokens = torch.randint(0, 13, (1, 17))
    padded = torch.cat([tokens, torch.randint(0, 13, (1, 6))], dim=1)
    mask = torch.zeros(1, 23, dtype=torch.bool)
    mask[:, 17:] = True
    torch.testing.assert_close(model(padded, mask)[:, :17], model(tokens), **TOL.get(attention, DEFAULT_TOL))


@pytest.mark.parametrize("attention,rpe", VARIANTS, ids=IDS)
def test_overfits_a_tiny_batch(attention, rpe):
    model = tiny(attention, rpe)
    tokens = torch.randint(0, 13, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # From ~log(13) = 2.56 nats; memorising 32 tokens must get well below a unigram fit.
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_rpe_is_shared_across_layers_and_redraw_is_explicit():
    model = tiny("flt", "local")
    a0, a1 = model.blocks[0].attention, model.blocks[1].attention
    assert a0.rpe is a1.rpe is model.rpe
    x = torch.randint(0, 13, (1, 10))
    model.eval()
    assert torch.equal(model(x), model(x))
    noise = a0.rpe_noise.clone()
    model.redraw_features(torch.Generator().manual_seed(3))
    assert not torch.equal(noise, a0.rpe_noise)


def test_absolute_positions_only_where_no_other_positional_signal():
    assert tiny("performer", "none").pos_embed is not None
    assert tiny("linear", "none").pos_embed is not None
    assert tiny("flt", "local").pos_embed is None
    assert tiny("loglinear", "none").pos_embed is None
    assert tiny("flt", "local", abs_pos=True).pos_embed is not None


def test_attention_maps_rows_are_distributions():
    model = tiny("flt", "local").eval()
    maps = model.attention_maps(torch.randint(0, 13, (1, 12)), layer=1)
    assert maps.shape == (1, 2, 12, 12)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 2, 12))
    assert torch.all(maps.triu(1) == 0)  # causal


def test_bad_config_and_input():
    with pytest.raises(ConfigError, match="attention"):
        LMConfig(attention="nope").validate()
    with pytest.raises(ConfigError, match="rpe"):
        LMConfig(attention="flt", rpe="none").validate()
    with pytest.raises(ValueError, match="vocab_size"):
        CausalLM(LMConfig())
    model = tiny("cosformer", "none")
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        model(torch.zeros(65, dtype=torch.long))
    with pytest.raises(TypeError, match="FLTAttention"):
        model.attention_maps(torch.zeros(1, 5, dtype=torch.long))


def test_lm_task_trains_and_writes_perplexity(tmp_path):
    from flt_mol.train.config import config_from_dict
    from flt_mol.train.loop import train

    config = config_from_dict({
        "task": "lm",
        "data": {"block_size": 16, "batch_size": 4, "eval_batch_size": 8, "max_val_blocks": 8},
        "model": {"attention": "flt", "rpe": "local", "num_layers": 1, "num_heads": 2, "dim": 16,
                  "ffn_dim": 32, "num_kernel_features": 8, "num_rpe_features": 4, "max_len": 16},
        "optim": {"warmup_steps": 1},
        "run": {"steps": 3, "eval_interval": 0, "ckpt_interval": 0, "log_interval": 1, "progress": False,
                "device": "cpu"},
    })
    metrics = train(config, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved) == {"val"} and set(saved["val"]) >= {"loss", "perplexity"}
    assert saved["val"]["tokens"] == 8 * 16
    assert abs(saved["val"]["perplexity"] - torch.tensor(saved["val"]["loss"]).exp().item()) < 1e-6 * saved["val"]["perplexity"]
    assert metrics["val"]["loss"] == saved["val"]["loss"]
    ckpt = torch.load(tmp_path / "best.pt", weights_only=False)
    assert ckpt["task"]["vocab"][0] == "<unk>"


def test_lm_task_config_errors():
    from flt_mol.train.config import config_from_dict

    base = {"task": "lm", "model": {"max_len": 64}, "run": {"steps": 1, "device": "cpu"}}
    with pytest.raises(ConfigError, match="block_size"):
        config = config_from_dict({**base, "data": {"block_size": 128}})
        from flt_mol.train.sequence_tasks import LMTask

        LMTask(config)
    with pytest.raises(ConfigError, match="data.source"):
        config_from_dict({**base, "data": {"source": "ptb"}})
    with pytest.raises(ConfigError, match="root"):
        config_from_dict({**base, "data": {"source": "wikitext103"}})
    with pytest.raises(ConfigError, match="unknown config key data.blocksize"):
        config_from_dict({**base, "data": {"blocksize": 12}})


def test_loglinear_algorithms_give_the_same_model():
    """The log-linear LM's dense (short-sequence) and FFT evaluations are one function."""
    dense = tiny("loglinear", "none", loglinear_algorithm="dense").eval()
    fft = tiny("loglinear", "none", loglinear_algorithm="fft").eval()
    fft.load_state_dict(dense.state_dict())
    with torch.no_grad():
        for block in dense.blocks:
            block.attention.rel_bias.normal_(0.0, 0.5)
        fft.load_state_dict(dense.state_dict())
        tokens = torch.randint(0, 13, (2, 40))
        torch.testing.assert_close(fft(tokens), dense(tokens), rtol=1e-4, atol=1e-4)


def test_signed_balanced_local_rpe_is_causal_and_valid_config():
    model = tiny("flt", "local", rpe_split="signed_balanced").eval()
    assert all(block.attention.rpe_split == "signed_balanced" for block in model.blocks)
    tokens = torch.randint(0, 13, (2, 30))
    torch.testing.assert_close(model(tokens[:, :11]), model(tokens)[:, :11], **DEFAULT_TOL)
    with pytest.raises(ConfigError, match="rpe_split"):
        LMConfig(rpe_split="sideways").validate()
    with pytest.raises(ConfigError, match="loglinear_algorithm"):
        LMConfig(loglinear_algorithm="direct").validate()
