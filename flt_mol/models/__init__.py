"""flt_mol.models."""
