"""flt_mol: 3D geometric transformers with linear attention and learned Fourier RPEs.

The attention core lives in :mod:`flt_mol.attention`; models in :mod:`flt_mol.models`; the OC20
data path and the embedded EMT-IS2RE data set in :mod:`flt_mol.data`; training and evaluation in
:mod:`flt_mol.train`; benchmarks in :mod:`flt_mol.bench`. :class:`flt_mol.FLTCalculator` (in
:mod:`flt_mol.calculator`) is a trained S2EF checkpoint as an ASE calculator; relaxations and
MD checks are in :mod:`flt_mol.relax`.
"""

__version__ = "0.1.0"

__all__ = ["FLTCalculator", "__version__"]


def __getattr__(name: str):
    # Imported on first use: `import flt_mol` (and `flt-mol --help`) stay free of ASE and torch.
    if name == "FLTCalculator":
        from flt_mol.calculator import FLTCalculator

        return FLTCalculator
    raise AttributeError(f"module 'flt_mol' has no attribute {name!r}")
