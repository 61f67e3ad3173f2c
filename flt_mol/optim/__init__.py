"""Learned optimisers with FLT memory (the paper's section 5.4, after Mnemosyne, Jain et al. 2023).

- :mod:`~flt_mol.optim.memory`  per-coordinate sequence memories: FLT / Performer / exact
  attention over the step index (bounded window) and an LSTM baseline, one interface;
- :mod:`~flt_mol.optim.learned` gradient preprocessing, the learned update rule and the
  ``torch.optim.Optimizer`` wrapper;
- :mod:`~flt_mol.optim.swarm`   the population variant with an RPE over member positions;
- :mod:`~flt_mol.optim.tasks`   the task distribution (quadratics, Rastrigin, small MLPs, digits);
- :mod:`~flt_mol.optim.meta`    truncated-unroll meta-training, recipes, checkpoints;
- :mod:`~flt_mol.optim.evaluate` comparisons against tuned Adam, plots.

Heavy submodules are imported explicitly by their users (the attention core is imported only
when an attention memory is built).
"""

from flt_mol.optim.learned import (
    LearnedOptimizer,
    LearnedOptimizerConfig,
    LearnedUpdateRule,
    MemoryConfig,
    preprocess_gradient,
)
from flt_mol.optim.memory import AttentionMemory, LSTMMemory, OptimizerMemory
from flt_mol.optim.swarm import SwarmConfig, SwarmUpdateRule

__all__ = [
    "LearnedOptimizer",
    "LearnedOptimizerConfig",
    "LearnedUpdateRule",
    "MemoryConfig",
    "preprocess_gradient",
    "AttentionMemory",
    "LSTMMemory",
    "OptimizerMemory",
    "SwarmConfig",
    "SwarmUpdateRule",
]
