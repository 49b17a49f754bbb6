"""The sweep layer: Hydra and Optuna.

Owns: the Hydra adapter (schemas in the ConfigStore, compose and validate once, preflight of a
command line, a Hydra job run as a job), the sweep context handed to jobs, the sweep callback
(parent run), gradsweep's Optuna sweeper (pruning, continuation, failures), the ``sweeps/`` config
source, and scheduled sweeps.
May import: Hydra, OmegaConf, Optuna and every lower layer — never the cli layer.
"""
