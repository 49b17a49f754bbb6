"""The training layer: schemas of the training parts, data, models, optimizers, clippers,
gradient telemetry, the loop, checkpoints and the gradient-health diagnosis of a history.

Owns: everything that happens inside a training process up to "records emitted to a sink".
May import: torch, numpy, scikit-learn, and ``gradsweep.errors|names|checks`` — never MLflow,
Hydra, OmegaConf, Optuna or another gradsweep layer. A part registers its schema and builder in
:mod:`gradsweep.train.registry`.
"""
