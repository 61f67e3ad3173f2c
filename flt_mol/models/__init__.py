"""flt_mol.models: the networks built on the shared attention core.

* :mod:`flt_mol.models.blocks`: the pre-LN block with the attention injected;
* :mod:`flt_mol.models.is2re`: :class:`IS2REModel` (Graphormer-3D style, FLT attention) and its
  :class:`IS2REModelConfig`;
* :mod:`flt_mol.models.lm` and :mod:`flt_mol.models.vit`: the sequence models (import them from
  their modules).
"""

from flt_mol.models.blocks import FeedForward, TransformerBlock
from flt_mol.models.is2re import IS2REModel, IS2REModelConfig

__all__ = ["FeedForward", "TransformerBlock", "IS2REModel", "IS2REModelConfig"]
