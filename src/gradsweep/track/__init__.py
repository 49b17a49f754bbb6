"""The tracking layer: the run-logger seam (:mod:`~gradsweep.track.logger`) and its backends.

Owns: the ``tracking`` schema, tracking URIs and password masking, the run journal on local disk,
the delivery process that sends journals to MLflow with ``log_batch``, store access (experiments,
runs left by dead processes), and the ``mlflow server`` command.
May import: MLflow and ``gradsweep.errors|names|checks|paths`` — never torch, Hydra, Optuna or
the training layer. MLflow is imported only by the ``mlflow`` backend's modules.
"""
