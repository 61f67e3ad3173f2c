"""flt_mol.attention."""
