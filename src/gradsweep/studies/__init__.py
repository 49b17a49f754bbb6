"""The studies layer: re-runs the ready studies over seeds (``train.py -m experiment=<study>`` as
real processes) and regenerates docs/studies.md from their report (``gradsweep studies``).

Owns: which studies and comparisons there are, running their sweeps, and the document's
generated blocks. Tables and figures are the report layer's; presets are composed by the sweep layer.
May import: the training, tracking, report, run and sweep layers — never a library directly
(matplotlib, MLflow, Hydra, Optuna: through the layers that own them); only the cli layer imports it.
"""
