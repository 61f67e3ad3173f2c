"""flt_mol.attention: the attention core shared by every model.

* :class:`FLTAttention` (``mode = flt | performer | exact``);
* RPE families with learned spectra: :class:`GaussianBasisRPE`, :class:`GaussianMixtureRPE`,
  :class:`LocalRPE`, :class:`KernelRPE`;
* pure functions: kernel feature maps, bidirectional / causal linear attention, exact softmax
  attention with an explicit RPE mask (the reference).
"""

from flt_mol.attention.exact import softmax_attention, softmax_attention_weights
from flt_mol.attention.feature_maps import (
    EluFeatureMap,
    FavorPlusFeatureMap,
    LearnableReLUFeatureMap,
    ReLUFeatureMap,
    build_feature_map,
    elu_features,
    favor_plus_features,
    orthogonal_gaussian_matrix,
    relu_features,
)
from flt_mol.attention.layer import FLTAttention
from flt_mol.attention.linear import (
    causal_linear_attention,
    linear_attention,
    linear_attention_weights,
)
from flt_mol.attention.rpe import (
    GaussianBasisRPE,
    GaussianMixtureRPE,
    KernelRPE,
    LocalRPE,
    SpectralRPE,
    rpe_features,
)

__all__ = [
    "FLTAttention",
    "SpectralRPE",
    "GaussianBasisRPE",
    "GaussianMixtureRPE",
    "LocalRPE",
    "KernelRPE",
    "rpe_features",
    "favor_plus_features",
    "relu_features",
    "elu_features",
    "orthogonal_gaussian_matrix",
    "FavorPlusFeatureMap",
    "ReLUFeatureMap",
    "LearnableReLUFeatureMap",
    "EluFeatureMap",
    "build_feature_map",
    "linear_attention",
    "causal_linear_attention",
    "linear_attention_weights",
    "softmax_attention",
    "softmax_attention_weights",
]
