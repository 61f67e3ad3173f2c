"""The names DESIGN.md section 6 promises under ``flt_mol.data``."""

import pytest

import flt_mol.data as data
from flt_mol.data import collate, emt, oc20, pbc, references, s2ef


def test_public_names_are_the_implementations():
    assert data.OC20LMDB is oc20.OC20LMDB and data.write_lmdb is oc20.write_lmdb
    assert data.emt_is2re is emt.emt_is2re
    assert data.emt_s2ef is s2ef.emt_s2ef and data.S2EFConfig is s2ef.S2EFConfig
    assert data.PeriodicImages is pbc.PeriodicImages and data.collate_atoms is collate.collate_atoms
    assert data.TrivialBaselines is references.TrivialBaselines
    assert set(data.__all__) <= set(dir(data))


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'OC20Lmdb'"):
        data.OC20Lmdb  # noqa: B018
