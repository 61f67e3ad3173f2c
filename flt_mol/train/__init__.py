"""flt_mol.train: typed configs, the task-agnostic loop, tasks, metrics, checkpoints, DDP.

* :mod:`~flt_mol.train.config`: dataclass configs from YAML recipes + ``key=value`` overrides;
* :mod:`~flt_mol.train.loop`: :func:`~flt_mol.train.loop.train` (one flat loop, exact resume);
* :mod:`~flt_mol.train.tasks`: the :class:`~flt_mol.train.tasks.Task` contract, ``build_task``
  and the IS2RE task (LM / ViT in :mod:`~flt_mol.train.sequence_tasks`);
* :mod:`~flt_mol.train.metrics`, :mod:`~flt_mol.train.checkpoint`,
  :mod:`~flt_mol.train.distributed`, :mod:`~flt_mol.train.plots`;
* :mod:`~flt_mol.train.commands`: ``flt-mol train | evaluate | predict``.

Nothing is imported here, so ``flt-mol --help`` stays fast.
"""
