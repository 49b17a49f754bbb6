"""The training loop: forward -> loss -> backward -> gradient norms -> clip -> step -> evaluate.

It emits plain records to a :class:`~gradsweep.train.sinks.Sink` and knows nothing of MLflow or Hydra.
Each step makes one vector on the device (loss, accuracy, norms, clip factor, what an adaptive
clipping rule decided, every parameter's norm); the vectors reach the host in blocks, one transfer
per ``sync_every_steps`` steps (and at evaluations, checkpoints and the end: :mod:`.transfer`), and
go on as float32 rows (``Sink.log_steps``): no dict, no Python float per value, no host sync per
step. A NaN/Inf loss or norm ends the run with its exact step, found when its block arrives.
Precision (:mod:`.precision`) and data parallelism (:mod:`.parallel`) change the step, not the records.
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

from gradsweep.train.checkpoints import CheckpointStore, RunLength
from gradsweep.train.clipping import Clipper
from gradsweep.train.data import DataSet, Split
from gradsweep.checks import choice, positive, require
from gradsweep.errors import NonFiniteError
from gradsweep.names import (AMP_SKIPPED, CLIP_CLIPPED_FRAC, CLIP_COEF, CLIP_THRESHOLD, GRAD_TOTAL, GRAD_TOTAL_CLIPPED,
                             TRAIN_ACC, TRAIN_LOSS)
from gradsweep.train.parallel import DataParallel
from gradsweep.train.precision import MAX_CONSECUTIVE_SKIPS, PRECISIONS, Precision
from gradsweep.train.sinks import Sink
from gradsweep.train import transfer
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
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


HEAD = (TRAIN_LOSS, TRAIN_ACC, GRAD_TOTAL, GRAD_TOTAL_CLIPPED, CLIP_COEF)  #: a step vector's first values
CONSOLE_LINES = 10  # progress lines per run: about this many, at evaluations
CONSOLE_MAX_GAP_S = 30.0  # and never longer than this without one


@dataclass
class TrainerConfig:
    epochs: int = 50
    batch_size: int = 64  # 0 = full batch
    loss: str = "cross_entropy"  # cross_entropy|bce|mse|lm (bce: binary data, one output unit; see LOSSES)
    reduction: str = "sum"  # sum|mean
    eval_every_steps: int = 10  # also after the last step; 25 dev/acc points in the default job (a small cost per step)
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
    #: step vectors stay on the device and reach the host in one transfer per this many steps (and
    #: at every evaluation, checkpoint and the end); a NaN/Inf is still found at its exact step, at
    #: most one block later. 1 = a transfer (a host sync) every step
    sync_every_steps: int = 50
    precision: str = "32"  # 32|bf16|fp16 (autocast; fp16 with a loss scaler: norms of the unscaled gradients)
    #: processes of one data-parallel job (torch.distributed DDP: gloo on CPU, NCCL on CUDA), started
    #: by the job itself; the global batch stays batch_size, split across them; only rank 0 records
    devices: int = 1
    compile: bool = False  # torch.compile the model for training (metric names unchanged)
    #: torch.compile's backend: inductor (generated kernels: the fast one, slow to compile on a CPU),
    #: aot_eager (forward and backward traced, torch's own kernels), eager (traced forward only)
    compile_backend: str = "inductor"
    #: a job whose data, model, gradients, optimizer state and one batch's activations need more
    #: memory than this (estimated before allocating: gradsweep.train.budget) is refused in one line.
    #: 0 = 80% of this machine's memory (or of its container's limit)
    memory_limit_gb: float = 0.0

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
        positive("trainer.memory_limit_gb", self.memory_limit_gb, strict=False)
        require(self.sync_every_steps >= 1, "trainer.sync_every_steps", self.sync_every_steps, "an integer >= 1")
        self.precision = str(self.precision)
        choice("trainer.precision", self.precision, PRECISIONS)
        require(self.devices >= 1, "trainer.devices", self.devices, "an integer >= 1")
        require(isinstance(self.compile, bool), "trainer.compile", self.compile, "true|false")
        choice("trainer.compile_backend", self.compile_backend, COMPILE_BACKENDS)


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
    acc, lsum, n = transfer.to_host(torch.stack([correct.float(), total_loss, counted.float()])).tolist()
    per = n if loss == "lm" else len(split)
    return (acc / n if n else math.nan), lsum / max(per, 1)


def run_length(examples: int, cfg: TrainerConfig) -> RunLength:
    """How long a run of ``examples`` training examples is: what a checkpoint resumed into it must fit."""
    steps_per_epoch = math.ceil(examples / (cfg.batch_size or examples))
    return RunLength(examples, steps_per_epoch, cfg.epochs * steps_per_epoch)


class Trainer:
    def __init__(self, model: nn.Module, data: DataSet, optimizer: torch.optim.Optimizer, clipper: Clipper,
                 cfg: TrainerConfig, sink: Sink, device: torch.device, store: Optional[CheckpointStore] = None,
                 config_dict: Optional[dict] = None, on_eval: Optional[Callable[[int, float], None]] = None,
                 parallel: Optional[DataParallel] = None):
        self.model, self.data, self.optimizer, self.clipper = model, data, optimizer, clipper
        self.cfg, self.sink, self.device, self.store = cfg, sink, device, store
        self.config_dict = config_dict or {}
        self.on_eval = on_eval  # e.g. report to an Optuna trial; may raise to stop the run
        #: set by the caller (a signal handler) to the exception to stop with: the loop stops between two
        #: steps, where the state is whole, records the steps taken, saves ``last`` and raises it
        self.stop: Optional[BaseException] = None
        self.norms = GradientNorms(model)  # of the model itself: no DDP `module.` or compile `_orig_mod.` prefix
        self.parallel = parallel
        self.recording = parallel is None or parallel.rank == 0  # the other ranks only train
        self.precision = Precision(getattr(cfg, "precision", "32"), device)
        forward = parallel.wrap(model) if parallel is not None else model
        self.forward = torch.compile(forward, backend=getattr(cfg, "compile_backend", "inductor")) \
            if getattr(cfg, "compile", False) else forward
        self.has_acc = cfg.loss != "mse"  # regression: no accuracy; best checkpoint and objective by dev loss
        self.clip_metrics = tuple(getattr(clipper, "metrics", ()))
        self.extra_metrics = self.clip_metrics + self.precision.metrics
        self.names = metric_names(self.norms.names, self.extra_metrics)
        self.param_stats = ParamStats(self.norms.params) if getattr(cfg, "epoch_stats", False) else None
        self.stat_names = epoch_stat_names(self.norms.names)
        self.epoch_stats: Optional[torch.Tensor] = None  # set by train_step(stats=True)
        self.batch_size = cfg.batch_size or len(data.train)
        length = run_length(len(data.train), cfg)
        self.steps_per_epoch, self.total_steps = length.steps_per_epoch, length.total_steps
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
            "amp": self.precision.state_dict(),  # fp16: the loss scale and its growth tracker
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
        self.precision.load_state_dict(state.get("amp") or {})
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
    def train_step(self, x: torch.Tensor, y: torch.Tensor, stats: bool = False) -> torch.Tensor:
        """One optimizer step on the batch (this rank's share of it); returns the step's vector on
        the device (:func:`~gradsweep.train.telemetry.step_vector`), never syncing with the host
        (fp16 excepted: its loss scaler decides on the host whether to skip the step)."""
        self.optimizer.zero_grad(set_to_none=False)
        with self.precision.autocast():
            logits = self.forward(x)
            if self.parallel is None:
                loss, correct, counted = batch_loss(logits, y, self.cfg.loss, self.cfg.reduction)
                to_backward = loss
            else:  # the global batch's loss and the gradients one process would have
                loss, correct, counted, to_backward = self.parallel.global_loss(logits, y, self.cfg.loss,
                                                                                self.cfg.reduction, batch_loss)
        scale = self.precision.backward(to_backward, self.optimizer)  # gradients unscaled from here on
        grads = self.norms.grads()
        per_param = self.norms.per_param(grads)
        total = self.norms.total(per_param)
        grad_stats = self.param_stats(grads) if stats and self.param_stats is not None else None  # before clipping
        skipped = scale is not None and not bool(torch.isfinite(total))  # fp16 only: the scaler's own sync
        if skipped:  # the scaler skips the update: the clipping rule neither acts nor learns from it
            coef, total_clipped = torch.ones((), device=total.device), total
            self.precision.skipped_in_a_row += 1
        else:
            coef, total_clipped = self.clipper(self.norms, grads, total, per_param=per_param)
            self.precision.skipped_in_a_row = 0
        self.precision.step(self.optimizer)
        if grad_stats is not None and self.param_stats is not None:  # weights after the update; stays on the device
            self.epoch_stats = torch.cat([self.param_stats(self.norms.params).reshape(-1), grad_stats.reshape(-1)])
        extra = [self.clipper.extra_values()] if self.clip_metrics else []
        if scale is not None:
            extra.append(torch.stack([scale.float().reshape(()), torch.tensor(float(skipped), device=scale.device)]))
        acc = correct.float() / counted.clamp_min(1) if self.has_acc else torch.full((), math.nan, device=loss.device)
        return step_vector(loss, acc, total, total_clipped, coef, per_param, torch.cat(extra) if extra else None)

    def head(self, values: np.ndarray) -> dict[str, float]:
        """The step's headline values by name (console, non-finite checks); a clip figure the rule
        has no value for at this step (NaN, e.g. a warm-up) is left out."""
        record = dict(zip(HEAD, values[:len(HEAD)].tolist(), strict=True))
        for key, v in zip(self.clip_metrics, values[len(HEAD):len(HEAD) + len(self.clip_metrics)].tolist(),
                          strict=True):
            if not math.isnan(v):
                record[key] = v
        return record

    def run(self) -> TrainResult:
        self.model.train()
        if self.recording:
            self.sink.define_steps(self.names, self.total_steps)
        block = transfer.StepBlock(self.cfg.sync_every_steps if self.recording else 1, len(self.names), self.device)
        while self.step < self.total_steps:
            if self.perm is None:
                self.perm = torch.randperm(len(self.train_y), generator=self.gen)
            idx = self.perm[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
            if self.parallel is not None:
                idx = self.parallel.shard(idx)
            idx = idx.to(self.device)
            end_of_epoch = self.param_stats is not None and self.batch == self.steps_per_epoch - 1
            vector = self.train_step(self.train_x[idx], self.train_y[idx], stats=end_of_epoch)
            self.batch += 1
            if self.batch == self.steps_per_epoch:
                self.batch, self.epoch, self.perm = 0, self.epoch + 1, None
            self.step += 1
            if not self.recording:  # rank > 0: rank 0 records, checks and evaluates
                continue
            block.add(self.step - 1, vector)
            last = self.step == self.total_steps
            evaluate = self.step % self.cfg.eval_every_steps == 0 or last
            checkpoint = bool(self.cfg.checkpoint_every_steps) and self.step % self.cfg.checkpoint_every_steps == 0
            if block.full or evaluate or checkpoint or end_of_epoch:
                head = self._receive(block)
                if end_of_epoch and self.epoch_stats is not None:  # one transfer per epoch
                    self.sink.log_metrics(self.step - 1, dict(zip(self.stat_names, self.epoch_stats.tolist(),
                                                                  strict=True)))
                if evaluate:
                    self._evaluate(self.head(head))
                if checkpoint and not last:
                    self._save("last")
            if self.stop is not None:
                self._stop(block)
        if not self.recording:
            return TrainResult(math.nan, -1, self.total_steps - 1, math.nan, math.nan)
        self._save("last")
        return self._finish()

    def _stop(self, block: transfer.StepBlock) -> None:
        """Stop as :attr:`stop` asked: a run that can be resumed from its ``last`` checkpoint."""
        if block.n:
            self._receive(block)
        self._save("last")
        assert self.stop is not None  # called when it is set
        raise self.stop

    def _receive(self, block: transfer.StepBlock) -> np.ndarray:
        """The block's steps on the host: logged (every ``log_every_steps``-th, and a non-finite one),
        checked (a NaN/Inf loss or norm raises with its step), and the last step's vector returned."""
        steps, values = block.take()
        skipped = values[:, self.names.index(AMP_SKIPPED)] > 0 if self.precision.metrics else None
        bad = transfer.first_nonfinite(values, (0, 2), skipped)
        upto = len(steps) if bad is None else bad + 1
        keep = steps[:upto] % self.cfg.log_every_steps == 0
        if bad is not None:
            keep[bad] = True
        if keep.any():
            self.sink.log_steps(steps[:upto][keep], values[:upto][keep])
        if bad is not None:
            raise NonFiniteError("loss" if not math.isfinite(values[bad, 0]) else "grad", int(steps[bad]))
        if self.precision.skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteError("grad", int(steps[-1]))
        return values[-1]

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
                         self.total_steps, self.epoch, record[TRAIN_LOSS], record[TRAIN_ACC], norm, acc,
                         self.best_score)
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

