"""flt_mol.data."""
