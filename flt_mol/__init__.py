"""flt_mol: 3D geometric transformers with linear attention and learned Fourier RPEs.

The attention core lives in :mod:`flt_mol.attention`; models in :mod:`flt_mol.models`; the OC20
data path and the embedded EMT-IS2RE data set in :mod:`flt_mol.data`; training and evaluation in
:mod:`flt_mol.train`; benchmarks in :mod:`flt_mol.bench`.
"""

__version__ = "0.1.0"
