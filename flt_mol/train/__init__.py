"""flt_mol.train."""
