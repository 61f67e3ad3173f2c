"""The IS2RE model: linear forms vs their O(L^2) references, invariances, padding, overfitting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flt_mol.data.collate import PeriodicImages, collate_atoms
from flt_mol.models.is2re import (
    IS2REModel,
    IS2REModelConfig,
    cell_frame,
    displacement_sum,
    displacement_sum_exact,
    gaussian_context,
    gaussian_context_exact,
)
from tests.train.helpers import make_items

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
IMAGES = PeriodicImages(cutoff=4.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def items():
    return make_items(5, seed=11)


def tiny(attention: str = "flt", **kw) -> IS2REModel:
    cfg = dict(attention=attention, num_layers=1, embed_dim=16, ffn_dim=32, num_heads=2,
               num_kernel_features=16, num_rpe_features=8, num_kernels=4, blocks=2,
               attention_dropout=0.0, context_channels=4)
    cfg.update(kw)
    model = IS2REModel(IS2REModelConfig(**cfg)).eval()
    # The displacement query starts at zero (a training choice); give it weights so the
    # displacement checks below are not vacuous.
    torch.nn.init.normal_(model.disp_query.weight, std=0.5)
    return model


def _rand_pos(B=2, L=7, pad_last=2, scale=2.0):
    pos = torch.randn(B, L, 3) * scale
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, L - pad_last:] = True
    return pos, pad


# --------------------------------------------------------------------------------------------
# Linear forms vs references
# --------------------------------------------------------------------------------------------


def test_context_linear_form_is_exact_algebra():
    """With the mask taken to be n1 . n2 itself, the O(L) sum equals the O(L^2) sum (fp64)."""
    from flt_mol.attention import GaussianBasisRPE

    rpe = GaussianBasisRPE(3, 4).double()
    pos, pad = _rand_pos()
    pos = pos.double()
    n1, n2 = rpe.features(pos, 8, generator=torch.Generator().manual_seed(1))
    n1, n2 = n1.double(), n2.double()
    est = torch.einsum("bcif,bcjf->bijc", n1, n2)  # [B, L, L, C] materialised estimate
    keep = ~pad
    pair = keep[:, :, None] & keep[:, None, :] & ~torch.eye(pos.shape[1], dtype=torch.bool)
    ref = (est * pair[..., None]).sum(2)
    torch.testing.assert_close(gaussian_context(n1, n2, padding_mask=pad), ref, rtol=1e-10, atol=1e-10)


def test_displacement_linear_form_is_exact_algebra():
    from flt_mol.attention import GaussianBasisRPE

    rpe = GaussianBasisRPE(3, 4).double()
    pos, pad = _rand_pos()
    pos = pos.double()
    n1, n2 = rpe.features(pos, 8, generator=torch.Generator().manual_seed(2))
    n1, n2 = n1.double(), n2.double()
    q, k = torch.randn(2, 7, 3, dtype=torch.float64), torch.randn(2, 7, 3, dtype=torch.float64)
    est = torch.einsum("bcif,bcjf->bijc", n1, n2)
    mask_fn = lambda delta: est  # noqa: E731  (the estimate as an explicit matrix)
    ref = displacement_sum_exact(mask_fn, pos=pos, query=q, key=k, padding_mask=pad)
    out = displacement_sum(n1, n2, pos=pos, query=q, key=k, padding_mask=pad)
    torch.testing.assert_close(out, ref * (~pad)[..., None], rtol=1e-9, atol=1e-9)


def test_context_is_unbiased():
    """Mean of the random-feature context over draws -> exact context, within 5 standard errors."""
    from flt_mol.attention import GaussianBasisRPE

    rpe = GaussianBasisRPE(2, 3, sampler="mixture")
    pos, pad = _rand_pos(scale=1.5)
    exact = gaussian_context_exact(rpe.mask, pos, padding_mask=pad)
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([
        gaussian_context(*rpe.features(pos, 16, generator=g), padding_mask=pad) for _ in range(400)
    ]).detach()
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert bool(((mean - exact).abs() <= 5 * se + 1e-6).all()), float(((mean - exact).abs() / (se + 1e-12)).max())


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["flt", "performer", "exact"])
def test_forward_shapes_and_gradients(items, attention):
    model = tiny(attention).train()
    batch = collate_atoms(items[:3], images=IMAGES)
    out = model(batch)
    assert out["energy"].shape == (3,)
    assert out["displacement"].shape == batch.pos.shape
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["displacement"]).all()
    (out["energy"].sum() + out["displacement"].square().sum()).backward()
    for name, p in model.named_parameters():
        if attention == "exact" and name == "rpe.sigma_raw":
            continue  # the exact mask does not sample frequencies
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if attention == "performer":
        assert model.rpe is None  # the Performer baseline has no RPE at all
    else:
        assert model.rpe.log_scale.grad.abs().sum() > 0  # the RPE is learned


def test_attention_switch_changes_nothing_else():
    names = {a: {n for n, _ in tiny(a).named_parameters() if not n.startswith(("rpe.", "layers.0.attention.rpe."))}
             for a in ("flt", "performer", "exact")}
    # FLT's kernel map has 2r more inputs than the Performer's; the parameter *names* are the same.
    assert names["flt"] == names["exact"] == names["performer"]


def test_padding_and_batch_composition_invariance(items):
    """A structure's prediction does not depend on the other structures in the batch."""
    for attention in ("flt", "performer", "exact"):
        model = tiny(attention)
        alone = model(collate_atoms([items[0]], images=IMAGES))
        mixed = model(collate_atoms([items[2], items[0], items[4]], images=IMAGES))
        torch.testing.assert_close(mixed["energy"][1], alone["energy"][0], rtol=1e-4, atol=1e-5)
        n = int(alone["displacement"].shape[1])
        torch.testing.assert_close(mixed["displacement"][1, :n], alone["displacement"][0], rtol=1e-4, atol=1e-5)
        assert mixed["displacement"][1, n:].abs().max() == 0  # padded rows are zero


def test_energy_excludes_images_padding_and_subsurface(items):
    """Readout only over real atoms with tag > 0: zeroing the head elsewhere changes nothing."""
    model = tiny("exact")
    batch = collate_atoms(items[:2], images=IMAGES)
    captured = {}
    head = model.energy_head
    h = head.register_forward_hook(lambda m, i, o: captured.setdefault("e", o))
    energy = model(batch)["energy"]
    h.remove()
    e = captured["e"].squeeze(-1)
    readout = batch.real_mask & (batch.tags > 0)
    assert bool(batch.is_image.any()) and bool(((batch.tags == 0) & batch.real_mask).any())
    torch.testing.assert_close(energy, (e * readout).sum(1), rtol=1e-5, atol=1e-6)


def _rotate_translate(item, rot: torch.Tensor, shift: torch.Tensor):
    out = item.clone()
    out.pos = item.pos @ rot.T + shift
    out.pos_relaxed = item.pos_relaxed @ rot.T + shift
    out.cell = item.cell @ rot.T  # rows are lattice vectors
    return out


def test_exact_model_is_rotation_and_translation_invariant(items):
    """With exact attention and exact context, invariance holds per evaluation (no noise)."""
    from e3nn.o3 import rand_matrix

    model = tiny("exact", context="exact").double()
    rot, shift = rand_matrix().double(), torch.randn(3).double() * 3
    batch = collate_atoms(items[:2], images=IMAGES)
    moved = collate_atoms([_rotate_translate(d, rot.float(), shift.float()) for d in items[:2]], images=IMAGES)
    batch.pos, moved.pos = batch.pos.double(), moved.pos.double()
    a, b = model(batch), model(moved)
    torch.testing.assert_close(b["energy"], a["energy"], rtol=1e-4, atol=1e-5)
    # Displacements rotate with the structure (equivariant head).
    torch.testing.assert_close(b["displacement"], a["displacement"] @ rot.T, rtol=1e-3, atol=1e-5)


def test_cell_frame_is_orthonormal_right_handed_and_rotates_with_the_cell():
    from e3nn.o3 import rand_matrix

    cell = torch.randn(5, 3, 3, dtype=torch.float64)
    frame = cell_frame(cell)
    eye = torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    torch.testing.assert_close(frame.transpose(1, 2) @ frame, eye)
    torch.testing.assert_close(torch.linalg.det(frame), torch.ones(5, dtype=torch.float64))
    a, b = cell[:, 0], cell[:, 1]
    torch.testing.assert_close(frame[:, :, 0], a / a.norm(dim=-1, keepdim=True))  # e1 along a
    normal = torch.einsum("bx,bx->b", frame[:, :, 2], a).abs() + torch.einsum("bx,bx->b", frame[:, :, 2], b).abs()
    assert float(normal.max()) < 1e-12  # e3 is the a-b plane's normal
    rot = rand_matrix(dtype=torch.float64)
    torch.testing.assert_close(cell_frame(cell @ rot.T), rot @ frame)
    # No cell (zeros) or a degenerate one: the identity, never NaN.
    flat = torch.zeros(2, 3, 3, dtype=torch.float64)
    flat[1, 0] = flat[1, 1] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(cell_frame(flat), torch.eye(3, dtype=torch.float64).expand(2, 3, 3))


@pytest.mark.parametrize("attention", ["flt", "performer", "exact"])
def test_cell_frame_makes_every_mode_rotation_invariant_per_draw(items, attention):
    """With ``frame="cell"`` one fixed feature draw already gives invariant energies and
    equivariant displacements (rotating the structure with its cell, and translating it)."""
    from e3nn.o3 import rand_matrix

    model = tiny(attention).double()
    assert model.config.frame == "cell"
    rot, shift = rand_matrix(), torch.randn(3) * 3
    batch = collate_atoms(items[:3], images=IMAGES)
    moved = collate_atoms([_rotate_translate(d, rot, shift) for d in items[:3]], images=IMAGES)
    for b in (batch, moved):
        b.pos, b.cell = b.pos.double(), b.cell.double()
    with torch.no_grad():
        a, m = model(batch), model(moved)
    torch.testing.assert_close(m["energy"], a["energy"], rtol=1e-4, atol=1e-5)
    real = batch.real_mask
    torch.testing.assert_close(m["displacement"][real], (a["displacement"] @ rot.double().T)[real], rtol=1e-3, atol=1e-5)
    # Without the frame the same model is not invariant for one draw (the frame does the work).
    model.config.frame = "none"
    with torch.no_grad():
        e0, e1 = model(batch)["energy"], model(moved)["energy"]
    assert not torch.allclose(e0, e1, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("attention", ["flt", "performer"])
def test_invariance_up_to_feature_noise(items, attention):
    """Without the cell frame, averaged over K feature draws, rotated+translated predictions match
    the originals within the noise measured across draws: |mean_rot - mean| <= 5 sqrt(var/K + var_rot/K)."""
    from e3nn.o3 import rand_matrix

    model = tiny(attention, num_kernel_features=32, num_rpe_features=16, frame="none")
    rot, shift = rand_matrix(), torch.randn(3) * 3
    batch = collate_atoms(items[:3], images=IMAGES)
    moved = collate_atoms([_rotate_translate(d, rot, shift) for d in items[:3]], images=IMAGES)
    g = torch.Generator().manual_seed(5)
    a, b = [], []
    with torch.no_grad():
        for _ in range(48):
            model.redraw_features(generator=g)
            a.append(model(batch)["energy"])
            b.append(model(moved)["energy"])
    a, b = torch.stack(a), torch.stack(b)
    K = a.shape[0]
    tol = 5 * torch.sqrt(a.var(0) / K + b.var(0) / K) + 1e-6
    assert bool(((a.mean(0) - b.mean(0)).abs() <= tol).all()), (a.mean(0) - b.mean(0), tol)
    assert float(a.std(0).max()) > 0  # the noise is real (features are redrawn)


def test_redraw_is_explicit_and_seeded(items):
    model = tiny("flt")
    batch = collate_atoms(items[:2], images=IMAGES)
    with torch.no_grad():
        e0 = model(batch)["energy"]
        torch.testing.assert_close(model(batch)["energy"], e0)  # forward never redraws
        model.redraw_features(generator=torch.Generator().manual_seed(7))
        e1 = model(batch)["energy"]
        model.redraw_features(generator=torch.Generator().manual_seed(7))
        e2 = model(batch)["energy"]
    assert not torch.allclose(e0, e1)
    torch.testing.assert_close(e1, e2)


def test_overfits_a_tiny_batch(items):
    model = tiny("flt", embed_dim=32, ffn_dim=64, num_heads=4).train()
    batch = collate_atoms(items[:4], images=IMAGES)
    target = torch.tensor([0.7, -1.2, 0.3, 1.5])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 250)
    first = None
    for _ in range(250):
        loss = (model(batch)["energy"] - target).abs().mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert float(loss) < 0.02 * first, (first, float(loss))


def test_bad_config():
    from flt_mol.train.config import ConfigError

    with pytest.raises(ConfigError, match="model.attention"):
        IS2REModel(IS2REModelConfig(attention="softmax", num_layers=1, embed_dim=8, num_heads=2))
    with pytest.raises(ConfigError, match="divisible"):
        IS2REModel(IS2REModelConfig(num_layers=1, embed_dim=10, num_heads=4))


@pytest.mark.parametrize("name", ["oc20_is2re_flt12l", "oc20_is2re_flt10l", "oc20_is2re_performer12l"])
def test_paper_models_take_one_step(items, name):
    """Each paper model builds and takes one optimiser step on a tiny batch (no images)."""
    from flt_mol.train.config import load_config
    from flt_mol.train.loop import build_optimizer

    config = load_config(RECIPES / f"{name}.yaml")
    model = IS2REModel(config.model).train()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 40e6  # 768-wide, 10-12 layers
    batch = collate_atoms(items[:1])
    opt = build_optimizer(model, config.optim)
    before = model.energy_head[0].weight.detach().clone()
    out = model(batch)
    loss = out["energy"].abs().sum() + out["displacement"].square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.energy_head[0].weight)
