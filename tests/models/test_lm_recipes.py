"""The CPU LM recipes compare attentions: they load, and differ only where declared."""

from __future__ import annotations

from pathlib import Path

import yaml

from flt_mol.models.lm import LMConfig
from flt_mol.train.config import load_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
NAMES = ("flt_local", "flt_gm", "performer", "loglinear", "linear", "cosformer", "exact")
# Declared differences besides model.attention / model.rpe: the local FLT's RPE split and its
# (and the exact reference's, which uses the same local RPE) initial amplitude and widths.
DECLARED = ("attention", "rpe", "rpe_split", "rpe_init_peak", "rpe_init_max_width")


def test_lm_recipes_load_and_differ_only_in_the_declared_keys():
    raws = {}
    for name in NAMES:
        config = load_config(RECIPES / f"lm_{name}.yaml")
        assert config.task == "lm" and isinstance(config.model, LMConfig)
        assert config.run.redraw_interval == 0 and config.model.abs_pos is True
        raw = yaml.safe_load((RECIPES / f"lm_{name}.yaml").read_text())
        for key in DECLARED:
            raw["model"].pop(key, None)
        raws[name] = raw
    first = raws[NAMES[0]]
    for name in NAMES[1:]:
        assert raws[name] == first, name


def test_exact_reference_uses_the_local_flt_rpe():
    local = load_config(RECIPES / "lm_flt_local.yaml").model
    exact = load_config(RECIPES / "lm_exact.yaml").model
    assert (exact.rpe, exact.rpe_init_peak, exact.rpe_init_max_width) == (
        local.rpe, local.rpe_init_peak, local.rpe_init_max_width)
