"""flt_mol.optim."""
