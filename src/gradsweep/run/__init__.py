"""The job layer: one typed, validated :class:`~gradsweep.run.spec.JobSpec` -> parts built from
the registry -> the training loop -> one run recorded through the run-logger seam.

Owns: inputs checked before a run exists (data files, checkpoints), resume, run status and tags.
May import: the training, tracking and report layers — never Hydra, OmegaConf or Optuna.
"""
