"""The training loop: forward -> loss -> backward -> gradient norms -> clip -> step -> evaluate.

It emits plain records to a :class:`~gradsweep.train.sinks.Sink` and knows nothing of MLflow or Hydra.
Per step the host receives one vector (loss, accuracy, norms, clip factor, what an adaptive clipping
rule decided, every parameter's norm) in a single device-to-host transfer, and passes it on as one
float32 row (``Sink.log_steps``): no dict, no Python float per value.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gradsweep.train.checkpoints import CheckpointStore
from gradsweep.train.clipping import Clipper
from gradsweep.train.data import DataSet, Split
from gradsweep.checks import choice, require
from gradsweep.errors import NonFiniteError
from gradsweep.names import (CLIP_CLIPPED_FRAC, CLIP_COEF, CLIP_THRESHOLD, GRAD_TOTAL, GRAD_TOTAL_CLIPPED, TRAIN_ACC,
                             TRAIN_LOSS)
from gradsweep.train.sinks import Sink
from gradsweep.train.telemetry import GradientNorms, ParamStats, epoch_stat_names, metric_names, step_vector

log = logging.getLogger("gradsweep")
EVAL_CHUNK = 4096
REDUCTIONS = ("sum", "mean")
#: the task decides the loss: classes (cross_entropy), binary (bce, one logit), regression (mse: no
#: accuracy; the best checkpoint and the objective are by dev loss), next-token language modelling
#: (lm: logits (batch, time, vocab), targets (batch, time), IGNORE_INDEX skipped; dev/ppl logged)
LOSSES = ("cross_entropy", "bce", "mse", "lm")
IGNORE_INDEX = -100
DEVICES = ("auto", "cpu", "cuda")


HEAD = (TRAIN_LOSS, TRAIN_ACC, GRAD_TOTAL, GRAD_TOTAL_CLIPPED, CLIP_COEF)  #: a step vector's first values
CONSOLE_LINES = 10  # progress lines per run: about this many, at evaluations
CONSOLE_MAX_GAP_S = 30.0  # and never longer than this without one


@dataclass
class TrainerConfig:
    epochs: int = 50
    batch_size: int = 64  # 0 = full batch
    loss: str = "cross_entropy"  # cross_entropy|bce|mse|lm (bce: binary data, one output unit; see LOSSES)
    reduction: str = "sum"  # sum|mean
    eval_every_steps: int = 10  # also after the last step; 25 dev/acc points in the default job (costs ~1%)
    log_every_steps: int = 1
    checkpoint_every_steps: int = 0  # 0 = only best (at evaluations) and last
    seed: int = 0
    device: str = "auto"  # auto|cpu|cuda
    #: torch CPU threads of the job. 1 by default: this product's models are small, their ops do
    #: not scale across threads, and a sweep runs several jobs beside a delivery process, where
    #: more threads than cores made the first steps up to 10x slower. 0 = torch's default (all cores).
    cpu_threads: int = 1
    resume_from: Optional[str] = None  # checkpoint path or MLflow run id
    #: at the last step of each epoch also log weight_mean/<param>, weight_std/<param> (after the
    #: update) and grad_mean/<param>, grad_std/<param> (that step's gradient, before clipping)
    epoch_stats: bool = False

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "trainer.epochs", self.epochs, "an integer >= 1")
        require(self.batch_size >= 0, "trainer.batch_size", self.batch_size, "an integer >= 0 (0 = full batch)")
        choice("trainer.loss", self.loss, LOSSES)
        choice("trainer.reduction", self.reduction, REDUCTIONS)
        require(self.eval_every_steps >= 1, "trainer.eval_every_steps", self.eval_every_steps, "an integer >= 1")
        require(self.log_every_steps >= 1, "trainer.log_every_steps", self.log_every_steps, "an integer >= 1")
        require(self.checkpoint_every_steps >= 0, "trainer.checkpoint_every_steps",
                 self.checkpoint_every_steps, "an integer >= 0")
        choice("trainer.device", self.device, DEVICES)
        require(self.cpu_threads >= 0, "trainer.cpu_threads", self.cpu_threads,
                 "an integer >= 0 (0 = torch's default)")


@dataclass
class TrainResult:
    best_dev_acc: float
    best_step: int
    last_step: int
    test_acc: float
    test_loss: float


def batch_loss(logits: torch.Tensor, y: torch.Tensor, loss: str,
               reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss with the configured reduction, correct predictions, predictions counted): examples,
    or tokens for ``lm``; none for ``mse`` (no accuracy)."""
    if loss == "bce":
        z = logits.reshape(-1)
        return (F.binary_cross_entropy_with_logits(z, y.float(), reduction=reduction),
                ((z > 0).long() == y).sum(), torch.tensor(len(y), device=z.device))
    if loss == "mse":
        pred = logits.reshape(y.shape).float()
        zero = torch.zeros((), device=pred.device, dtype=torch.long)
        return F.mse_loss(pred, y.float(), reduction=reduction), zero, zero
    if loss == "lm":
        flat, target = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        counted = target != IGNORE_INDEX
        return (F.cross_entropy(flat, target, reduction=reduction, ignore_index=IGNORE_INDEX),
                ((flat.argmax(-1) == target) & counted).sum(), counted.sum())
    return F.cross_entropy(logits, y, reduction=reduction), (logits.argmax(-1) == y).sum(), \
        torch.tensor(len(y), device=logits.device)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, loss: str, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean loss per prediction: per example, per token for ``lm``) over a whole split;
    accuracy NaN where the task has none (``mse``)."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    counted = torch.zeros((), device=device, dtype=torch.long)
    for i in range(0, len(split), EVAL_CHUNK):
        x, y = split.x[i:i + EVAL_CHUNK].to(device), split.y[i:i + EVAL_CHUNK].to(device)
        lsum, c, n = batch_loss(model(x), y, loss, "sum")
        total_loss += lsum
        correct += c
        counted += n
    model.train(was_training)
    acc, lsum, n = torch.stack([correct.float(), total_loss, counted.float()]).tolist()
    per = n if loss == "lm" else len(split)
    return (acc / n if n else math.nan), lsum / max(per, 1)


class Trainer:
    def __init__(self, model: nn.Module, data: DataSet, optimizer: torch.optim.Optimizer, clipper: Clipper,
                 cfg: TrainerConfig, sink: Sink, device: torch.device, store: Optional[CheckpointStore] = None,
                 config_dict: Optional[dict] = None, on_eval: Optional[Callable[[int, float], None]] = None):
        self.model, self.data, self.optimizer, self.clipper = model, data, optimizer, clipper
        self.cfg, self.sink, self.device, self.store = cfg, sink, device, store
        self.config_dict = config_dict or {}
        self.on_eval = on_eval  # e.g. report to an Optuna trial; may raise to stop the run
        self.norms = GradientNorms(model)
        self.has_acc = cfg.loss != "mse"  # regression: no accuracy; best checkpoint and objective by dev loss
        self.clip_metrics = tuple(getattr(clipper, "metrics", ()))
        self.names = metric_names(self.norms.names, self.clip_metrics)
        self.param_stats = ParamStats(self.norms.params) if getattr(cfg, "epoch_stats", False) else None
        self.stat_names = epoch_stat_names(self.norms.names)
        self.epoch_stats: Optional[torch.Tensor] = None  # set by train_step(stats=True)
        n = len(data.train)
        self.batch_size = cfg.batch_size or n
        self.steps_per_epoch = math.ceil(n / self.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        # a console line at about CONSOLE_LINES evaluations of the run, whatever its length (every
        # evaluation is logged as a metric): progress without a wall of text
        every = cfg.eval_every_steps
        self.console_every = every * max(1, math.ceil(self.total_steps / CONSOLE_LINES / every))
        self._last_console: Optional[float] = None  # the first evaluation is always shown
        self.gen = torch.Generator().manual_seed(cfg.seed)
        # position: next step to run, epoch and batch within it, and that epoch's data order
        self.step, self.epoch, self.batch = 0, 0, 0
        self.perm: Optional[torch.Tensor] = None
        self.best_score, self.best_step = -math.inf, -1
        self.best_state: Optional[dict] = None
        self.train_x = data.train.x.to(device)
        self.train_y = data.train.y.to(device)

    # ----------------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch": self.batch, "perm": self.perm,
            "best_score": self.best_score, "best_step": self.best_step, "config": self.config_dict,
            "rng": {"data": self.gen.get_state(), "torch": torch.get_rng_state()},
            "clip": self.clipper.state_dict(),  # an adaptive rule's history, moving averages, step count
        }

    def restore(self, state: dict[str, Any], best: Optional[dict[str, Any]] = None) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.batch = int(state["step"]), int(state.get("epoch", 0)), int(state.get("batch", 0))
        self.perm = state.get("perm")
        self.best_score, self.best_step = float(state["best_score"]), int(state.get("best_step", -1))
        rng = state.get("rng") or {}
        if "data" in rng:
            self.gen.set_state(rng["data"])
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        self._restore_clipper(state.get("clip") or {})
        if best is not None:
            self.best_state = best["model"]

    def _restore_clipper(self, clip_state: dict[str, Any]) -> None:
        """The rule's state from a checkpoint; a checkpoint without it (written before rules had state,
        or by another rule) restores nothing, and a stateful rule then says that it starts afresh."""
        rule = self.clipper.state_dict().get("rule")
        if rule is None:  # a stateless rule (none, norm, value)
            return
        if clip_state.get("rule") == rule:
            self.clipper.load_state_dict(clip_state)
        else:
            log.warning("the checkpoint holds no state of clip=%s (%s): its statistics start afresh at step %d",
                        rule, f"it has clip={clip_state['rule']}'s" if clip_state.get("rule") else "none saved",
                        self.step)

    def _save(self, name: str) -> None:
        if self.store is not None:
            self.store.save(name, self.state())

    # -------------------------------------------------------------------------- the loop
    def train_step(self, x: torch.Tensor, y: torch.Tensor, stats: bool = False) -> np.ndarray:
        self.optimizer.zero_grad(set_to_none=False)
        loss, correct, counted = batch_loss(self.model(x), y, self.cfg.loss, self.cfg.reduction)
        loss.backward()
        grads = self.norms.grads()
        per_param = self.norms.per_param(grads)
        total = self.norms.total(per_param)
        grad_stats = self.param_stats(grads) if stats else None  # before clipping
        coef, total_clipped = self.clipper(self.norms, grads, total, per_param=per_param)
        self.optimizer.step()
        if grad_stats is not None:  # weights after the update; stays on the device
            self.epoch_stats = torch.cat([self.param_stats(self.norms.params).reshape(-1), grad_stats.reshape(-1)])
        extra = self.clipper.extra() if self.clip_metrics else None
        acc = correct.float() / counted.clamp_min(1) if self.has_acc else torch.full((), math.nan, device=loss.device)
        vec = step_vector(loss, acc, total, total_clipped, coef, per_param, extra)
        return vec.cpu().numpy()  # the step's single device-to-host transfer

    def head(self, values: np.ndarray) -> dict[str, float]:
        """The step's headline values by name (console, non-finite checks); a clip figure the rule
        has no value for at this step (NaN, e.g. a warm-up) is left out."""
        record = dict(zip(HEAD, values[:len(HEAD)].tolist()))
        for key, v in zip(self.clip_metrics, values[len(HEAD):len(HEAD) + len(self.clip_metrics)].tolist()):
            if not math.isnan(v):
                record[key] = v
        return record

    def run(self) -> TrainResult:
        self.model.train()
        self.sink.define_steps(self.names, self.total_steps)
        step_index = np.empty(1, np.int64)
        while self.step < self.total_steps:
            if self.perm is None:
                self.perm = torch.randperm(len(self.train_y), generator=self.gen)
            idx = self.perm[self.batch * self.batch_size:(self.batch + 1) * self.batch_size].to(self.device)
            end_of_epoch = self.param_stats is not None and self.batch == self.steps_per_epoch - 1
            values = self.train_step(self.train_x[idx], self.train_y[idx], stats=end_of_epoch)
            loss, total = float(values[0]), float(values[2])
            finite = math.isfinite(loss) and math.isfinite(total)
            if self.step % self.cfg.log_every_steps == 0 or not finite:
                step_index[0] = self.step
                self.sink.log_steps(step_index, values[None, :])
            if end_of_epoch:  # one transfer per epoch
                self.sink.log_metrics(self.step, dict(zip(self.stat_names, self.epoch_stats.tolist())))
            if not math.isfinite(loss):
                raise NonFiniteError("loss", self.step)
            if not math.isfinite(total):
                raise NonFiniteError("grad", self.step)
            self.batch += 1
            if self.batch == self.steps_per_epoch:
                self.batch, self.epoch, self.perm = 0, self.epoch + 1, None
            self.step += 1
            last = self.step == self.total_steps
            if self.step % self.cfg.eval_every_steps == 0 or last:
                self._evaluate(self.head(values))
            if self.cfg.checkpoint_every_steps and self.step % self.cfg.checkpoint_every_steps == 0 and not last:
                self._save("last")
        self._save("last")
        return self._finish()

    def _evaluate(self, record: dict[str, float]) -> None:
        step = self.step - 1  # the optimizer step just taken
        acc, loss = evaluate(self.model, self.data.dev, self.cfg.loss, self.device)
        dev = {"dev/acc": acc, "dev/loss": loss} if self.has_acc else {"dev/loss": loss}
        if self.cfg.loss == "lm":
            dev["dev/ppl"] = math.exp(min(loss, 700.0))
        self.sink.log_metrics(step, dev)
        score = acc if self.has_acc else -loss
        if score > self.best_score:
            self.best_score, self.best_step = score, step
            self.best_state = copy.deepcopy(self.model.state_dict())
            self._save("best")
        norm = f"grad_norm {record[GRAD_TOTAL]:.4g}"
        if record[CLIP_COEF] < 1.0:  # say "clipped" only when the clipper changed this step's gradients
            norm += f" (clipped to {record[GRAD_TOTAL_CLIPPED]:.4g})"
        if CLIP_THRESHOLD in record:
            norm += f"  threshold {record[CLIP_THRESHOLD]:.4g}"
        if CLIP_CLIPPED_FRAC in record:
            norm += f"  clipped {record[CLIP_CLIPPED_FRAC]:.0%} of {getattr(self.clipper, 'units_name', 'units')}"
        now = time.monotonic()
        if self._last_console is None or (step + 1) % self.console_every == 0 or step + 1 == self.total_steps \
                or now - self._last_console > CONSOLE_MAX_GAP_S:
            self._last_console = now
            if self.has_acc:
                log.info("step %d/%d  epoch %d  loss %.4g  acc %.3f  %s  dev_acc %.3f  best %.3f", step + 1,
                         self.total_steps, self.epoch, record[TRAIN_LOSS], record[TRAIN_ACC], norm, acc, self.best_score)
            else:
                log.info("step %d/%d  epoch %d  loss %.4g  %s  dev_loss %.4g  best %.4g", step + 1, self.total_steps,
                         self.epoch, record[TRAIN_LOSS], norm, loss, -self.best_score)
        if self.on_eval is not None:
            self.on_eval(step, acc)

    def _finish(self) -> TrainResult:
        last_state = copy.deepcopy(self.model.state_dict())  # state_dict() aliases the parameters
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        test_acc, test_loss = evaluate(self.model, self.data.test, self.cfg.loss, self.device)
        self.model.load_state_dict(last_state)
        last_step = self.total_steps - 1
        final = {"test/acc": test_acc, "test/loss": test_loss, "best/dev_acc": self.best_score} if self.has_acc else \
            {"test/loss": test_loss, "best/dev_loss": -self.best_score}
        if self.cfg.loss == "lm":
            final["test/ppl"] = math.exp(min(test_loss, 700.0))
        self.sink.log_metrics(last_step, final)
        return TrainResult(self.best_score, self.best_step, last_step, test_acc, test_loss)

