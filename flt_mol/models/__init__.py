"""flt_mol.models: the networks built on the shared attention core.

* :mod:`flt_mol.models.blocks`: the pre-LN block with the attention injected;
* :mod:`flt_mol.models.is2re`: :class:`IS2REModel` (Graphormer-3D style, FLT attention) and its
  :class:`IS2REModelConfig`;
* :mod:`flt_mol.models.s2ef`: :class:`S2EFModel`, the same model as a potential (total energy,
  conservative forces ``-dE/dr``) and its :class:`S2EFModelConfig`;
* :mod:`flt_mol.models.lm` and :mod:`flt_mol.models.vit`: the sequence models (import them from
  their modules).
"""

from flt_mol.models.blocks import FeedForward, TransformerBlock
from flt_mol.models.is2re import IS2REModel, IS2REModelConfig
from flt_mol.models.s2ef import S2EFModel, S2EFModelConfig

__all__ = ["FeedForward", "TransformerBlock", "IS2REModel", "IS2REModelConfig", "S2EFModel", "S2EFModelConfig"]
