"""Hydra entry point: compose -> gradsweep job -> return the objective (best dev accuracy).

    python src/train.py                                   # the default study (SRN, digit-sum)
    python src/train.py -m clip.max_norm=1,5,20           # a sweep: one parent run, three children
    python src/train.py experiment=mlp_vanishing          # a ready study
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from gradsweep.cli.plan import print_plan, start_delivery  # light: no torch, no MLflow

if __name__ == "__main__":  # not when a test imports this module for `main`
    print_plan(sys.argv[1:])  # before PyTorch and MLflow load (seconds): README, "How long you wait"
    start_delivery(sys.argv[1:])  # its MLflow import overlaps ours of PyTorch

import hydra
from omegaconf import DictConfig

from gradsweep.cli.hydra_main import run_as_process
from gradsweep.sweep.hydra_adapter import job_from_hydra, register_schemas

register_schemas()
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


# only our own code may be named as a _target_ in configs (callbacks, sweeper subclasses)
@hydra.main(config_path=CONFIG_DIR, config_name="config", execution_whitelist=["gradsweep.*"])
def main(cfg: DictConfig) -> float:
    return job_from_hydra(cfg)


if __name__ == "__main__":
    run_as_process(main, CONFIG_DIR, "config")
