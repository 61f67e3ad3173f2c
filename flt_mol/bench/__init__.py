"""flt_mol.bench."""
