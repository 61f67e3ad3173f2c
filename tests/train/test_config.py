"""Typed configs: recipes load, overrides apply, unknown or mistyped keys are errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flt_mol.models.is2re import IS2REModelConfig
from flt_mol.train.config import ConfigError, apply_overrides, config_from_dict, load_config
from flt_mol.train.tasks import IS2REDataConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("name", ["emt_is2re_flt", "emt_is2re_performer", "emt_is2re_exact",
                                  "oc20_is2re_flt12l", "oc20_is2re_flt10l", "oc20_is2re_performer12l"])
def test_recipes_load(name):
    config = load_config(RECIPES / f"{name}.yaml")
    assert config.task == "is2re"
    assert isinstance(config.data, IS2REDataConfig)
    assert isinstance(config.model, IS2REModelConfig)


def test_emt_recipes_differ_only_in_attention_and_periodicity():
    """performer / exact differ only in the attention; the FLT default also in the periodic
    geometry (reciprocal-lattice RPE instead of image tokens), nothing else."""
    raws = {a: yaml.safe_load((RECIPES / f"emt_is2re_{a}.yaml").read_text()) for a in ("flt", "performer", "exact")}
    for a, raw in raws.items():
        assert raw["model"].pop("attention") == a
    assert raws["performer"] == raws["exact"]
    flt = raws["flt"]
    assert flt["model"].pop("periodic") == "reciprocal" and flt["data"].pop("periodic_images") is False
    assert raws["performer"]["data"].pop("periodic_images") is True and "periodic" not in raws["performer"]["model"]
    assert flt == raws["performer"]


def test_paper_recipes_match_the_paper():
    for name, layers, attention in (("flt12l", 12, "flt"), ("flt10l", 10, "flt"), ("performer12l", 12, "performer")):
        m = load_config(RECIPES / f"oc20_is2re_{name}.yaml").model
        assert (m.num_layers, m.attention) == (layers, attention)
        assert (m.embed_dim, m.ffn_dim, m.num_heads, m.num_kernel_features, m.num_rpe_features,
                m.num_kernels, m.blocks) == (768, 2048, 48, 64, 16, 32, 4)


def test_overrides_are_typed(raw_config):
    raw = apply_overrides(raw_config, ["optim.lr=1e-2", "model.blocks=3", "data.val=[a.lmdb, b.lmdb]",
                                       "optim.ema_decay=0.99", "optim.grad_clip=null", "optim.betas=[0.8, 0.9]"])
    config = config_from_dict(raw)
    assert config.optim.lr == pytest.approx(1e-2) and isinstance(config.optim.lr, float)
    assert config.model.blocks == 3
    assert config.data.val == ["a.lmdb", "b.lmdb"]
    assert config.optim.ema_decay == pytest.approx(0.99)
    assert config.optim.grad_clip is None
    assert config.optim.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1e-3", "optim.lrr"),
        ("model.num_layer=2", "model.num_layer"),
        ("runn.steps=3", "runn"),
        ("model.num_layers=2.5", "model.num_layers"),
        ("model.num_layers=two", "model.num_layers"),
        ("run.bf16=3", "run.bf16"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("data.val=emt:val_id", "data.val"),
        ("model.attention=softmax", "model.attention"),
    ],
)
def test_bad_overrides_name_the_key(raw_config, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(apply_overrides(raw_config, [override]))


def test_missing_task_and_unknown_task(raw_config):
    raw = dict(raw_config)
    raw.pop("task")
    with pytest.raises(ConfigError, match="task"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="task must be one of"):
        config_from_dict({**raw_config, "task": "qm9"})


def test_override_syntax_and_missing_recipe(raw_config, tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(raw_config, ["optim.lr"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_steps_or_epochs(raw_config):
    with pytest.raises(ConfigError, match="run.steps"):
        config_from_dict(apply_overrides(raw_config, ["run.epochs=2"]))
    config = config_from_dict(apply_overrides(raw_config, ["run.epochs=2", "run.steps=null"]))
    assert config.run.epochs == 2
