"""The report layer: figures (matplotlib) and tables from run histories and from the store.

Owns: the per-run gradient figure, the one sweep summary (used by the sweep's parent run, the
Optuna sweeper and ``gradsweep report``), and ``gradsweep report``.
May import: matplotlib, the tracking and training layers — never Hydra, Optuna, run, sweep or cli.
"""
