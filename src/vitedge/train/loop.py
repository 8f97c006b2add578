"""The training loop: epochs over images held on the device, per-epoch evaluation, checkpoints, time budget.

Everything random is a function of the seed: weights from ``torch.manual_seed(seed)``, each epoch's order
and augmentation from a generator seeded by (seed, epoch) (see :mod:`vitedge.train.augment`), and
stochastic depth from the global generators, whose states every checkpoint stores. Resuming therefore
continues exactly where the run stopped; on CPU the result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from vitedge.api import optimize_
from vitedge.models import build_untrained
from vitedge.models.project import DERIVED_BUFFERS
from vitedge.models.timm_models import load_weights
from vitedge.train.augment import augment_batch, epoch_seed, plan_epoch
from vitedge.train.card import device_name, write_model, write_trained_model
from vitedge.train.checkpoint import (
    Checkpoint,
    RunState,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vitedge.train.config import TrainConfig, trainable_options
from vitedge.train.data import TrainData, data_classes, data_img_size, load_train_data
from vitedge.train.distill import Distillation
from vitedge.train.events import ProgressFn, TrainProgress, TrainResult
from vitedge.train.losses import Targets, training_losses
from vitedge.train.runtime import (
    build_optimizer,
    evaluate_top,
    resolve_device,
    sync,
    to_device,
)
from vitedge.train.schedule import fit_epochs, lr_at
from vitedge.train.setup import check_resume, from_directory, load_teacher, train_only, with_drop_path

log = logging.getLogger(__name__)


class _Trainer:
    def __init__(self, config: TrainConfig, *, resume: bool, progress: ProgressFn | None) -> None:
        self.cfg = config
        self.out = Path(config.out)
        self.progress = progress
        self.t0 = time.monotonic()
        self.device = resolve_device(config.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True
        checkpoint = check_resume(config, resume)
        torch.manual_seed(config.seed)
        enc = build_untrained(
            config.model, num_classes=data_classes(config.data), img_size=data_img_size(config.data)
        )
        if config.drop_path is not None:  # before init, which must land in the rebuilt model
            enc = with_drop_path(config, enc)
        self.prior: list[dict[str, Any]] = []  # configs already applied to an --init model directory
        if config.init is not None and Path(config.init).is_dir():
            enc, self.prior = from_directory(config, enc, Path(config.init))
        elif config.init is not None:
            load_weights(getattr(enc, "model", enc), config.init, derived=DERIVED_BUFFERS)
        if config.optimize:
            optimize_(enc, *trainable_options(config.optimize))
        self.channels_last = cuda and enc.info.family == "cnn"
        self.enc = to_device(enc, self.device, channels_last=self.channels_last)
        self.data: TrainData = load_train_data(
            config.data, enc.preprocess, limit=config.limit, eval_limit=config.eval_limit
        ).to(self.device)
        teacher = load_teacher(config, self.enc.info.num_classes, self.device)
        self.distill = Distillation(self.enc, teacher, config.distill, channels_last=cuda)
        if self.distill.projector is not None:
            self.distill.projector.to(self.device)
        named = list(self.enc.named_parameters()) + [
            (f"projector.{n}", p)
            for n, p in (self.distill.projector.named_parameters() if self.distill.projector else [])
        ]
        if config.train_only is not None:
            named = train_only(named, config.train_only)
        self.optimizer = build_optimizer(named, config, self.device)
        n = len(self.data.train_images)
        self.batch = min(config.batch_size, n)
        self.steps = max(n // self.batch, 1)
        self.warmup_steps = round(config.warmup_epochs * self.steps)
        self.fill = torch.tensor(enc.preprocess.mean, device=self.device)
        self.state = RunState(epochs=config.epochs)
        if checkpoint is not None:
            self._restore(checkpoint)
        self.session_t0 = self.t0  # the budget covers data loading and model building too

    # --- setup ---------------------------------------------------------------------------------
    def _restore(self, ckpt: Checkpoint) -> None:
        st = ckpt.state
        self.enc.load_state_dict({k[6:]: v for k, v in ckpt.model.items() if k.startswith("model.")})
        if self.distill.projector is not None:
            proj = {k[10:]: v for k, v in ckpt.model.items() if k.startswith("projector.")}
            self.distill.projector.load_state_dict(proj)
        cur = self.optimizer.state_dict()["param_groups"]
        opt = ckpt.optimizer
        for saved_group, group in zip(opt["param_groups"], cur, strict=True):
            for key in ("fused", "foreach", "capturable"):
                saved_group[key] = group.get(key)
        self.optimizer.load_state_dict(opt)
        self.state = RunState.from_json(st)
        set_rng_state(st["rng"])

    # --- bookkeeping ---------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.state.elapsed_s + time.monotonic() - self.session_t0

    def _emit(self, **kwargs: Any) -> None:
        if self.progress is not None:
            s = self.state
            self.progress(
                TrainProgress(
                    epoch=s.epoch + 1, epochs=s.epochs, steps=self.steps, elapsed_s=self.elapsed(), **kwargs
                )
            )

    def _save(self, stats: dict[str, float]) -> None:
        s = self.state
        model = {f"model.{k}": v for k, v in self.enc.state_dict().items()}
        if self.distill.projector is not None:
            model.update({f"projector.{k}": v for k, v in self.distill.projector.state_dict().items()})
        state = {
            **s.to_json(),
            "config": self.cfg.to_json(),
            "elapsed_s": self.elapsed(),
            "epoch_stats": stats,
            "rng": rng_state(),
        }
        save_checkpoint(self.out, Checkpoint(state=state, model=model, optimizer=self.optimizer.state_dict()))

    def _pause_due(self) -> bool:
        cfg, s = self.cfg, self.state
        if cfg.stop_after_steps is not None and s.global_step >= cfg.stop_after_steps:
            return True
        return (
            cfg.stop_after_minutes is not None
            and time.monotonic() - self.session_t0 > 60 * cfg.stop_after_minutes
        )

    def _over_budget(self, tail_s: float) -> bool:
        return self.cfg.max_minutes is not None and self.elapsed() + tail_s > 60 * self.cfg.max_minutes

    # --- training ------------------------------------------------------------------------------
    def _step(self, step: int, plan: Any) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, s = self.cfg, self.state
        total = s.epochs * self.steps
        # A budget-shortened run keeps at least half of its steps for the decay.
        warmup = min(self.warmup_steps, total // 2)
        lr = lr_at(s.global_step, total_steps=total, warmup_steps=warmup, peak=cfg.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
        d = self.data
        b = augment_batch(
            d.train_images,
            d.train_labels,
            plan,
            step,
            batch_size=self.batch,
            policy=cfg.augment,
            fill=self.fill,
            mixing=mixing,
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            student = self.distill.student_outputs(b.x)
            teacher = self.distill.teacher_outputs(b.x)
            terms = training_losses(
                student,
                Targets(b.y, b.y_mix, b.lam),
                smoothing=cfg.label_smoothing,
                distill=cfg.distill,
                teacher=teacher,
            )
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        self.optimizer.step()
        logits = student.logits if student.dist_logits is None else student.logits + student.dist_logits
        return terms["total"].detach().float() * len(b.y), (logits.argmax(1) == b.y).sum().float()

    def _run_epoch(self, tail_s: float) -> tuple[str, float, float]:
        """Train the rest of the current epoch.

        Returns:
            ``(outcome, steady, measured)``: outcome ``epoch``, ``budget`` (time ran out) or ``paused``; the
            estimated seconds of all the epoch's steps at steady speed (first steps, which warm up kernels
            and autotuners, excluded); the seconds the steps actually took.
        """
        cfg, s, dev = self.cfg, self.state, self.device
        gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, s.epoch))
        plan = plan_epoch(
            len(self.data.train_images),
            self.steps,
            img_size=self.enc.img_size,
            mixup_alpha=cfg.mixup_alpha,
            cutmix_alpha=cfg.cutmix_alpha,
            generator=gen,
        ).to(dev)
        stats = s.epoch_stats
        loss_sum = torch.tensor(stats["loss_sum"], device=dev)
        correct = torch.tensor(stats["correct"], device=dev)
        seen = stats["seen"]
        first = s.step_in_epoch
        warm = first + min(10, (self.steps - first) // 4) if self.steps - first >= 8 else first
        t_start = t_warm = time.monotonic()
        t_log, seen_log = t_start, seen
        outcome = "epoch"
        for step in range(first, self.steps):
            if self._over_budget(tail_s):
                outcome = "budget"
                break
            loss, right = self._step(step, plan)
            loss_sum += loss
            correct += right
            seen += self.batch
            s.global_step += 1
            s.step_in_epoch = step + 1
            if step + 1 == warm:
                sync(dev)
                t_warm = time.monotonic()
            if (step + 1) % cfg.log_every_steps == 0 or step + 1 == self.steps:
                sync(dev)
                now = time.monotonic()
                ips = (seen - seen_log) / max(now - t_log, 1e-9)
                left = (s.epochs - s.epoch) * self.steps - (step + 1)
                self._emit(
                    kind="step",
                    step=step + 1,
                    loss=float(loss_sum) / seen,
                    train_acc=float(correct) / seen,
                    lr=self.optimizer.param_groups[0]["lr"],
                    images_per_s=ips,
                    eta_s=left * self.batch / max(ips, 1e-9),
                )
                t_log, seen_log = now, seen
            if cfg.checkpoint_every_steps and s.global_step % cfg.checkpoint_every_steps == 0:
                self._save(self._stats(loss_sum, correct, seen))
            if self._pause_due():
                s.epoch_stats = self._stats(loss_sum, correct, seen)
                return "paused", 0.0, 0.0
        sync(dev)
        t_end = time.monotonic()
        done = s.step_in_epoch - first
        if done == 0:  # resumed exactly at the end of the epoch: nothing measured
            train_s = 0.0
        elif warm > first and s.step_in_epoch == self.steps:
            train_s = (t_end - t_warm) * (self.steps - first) / max(self.steps - warm, 1)
        else:
            train_s = (t_end - t_start) * self.steps / done
        s.epoch_stats = self._stats(loss_sum, correct, seen)
        return outcome, train_s, t_end - t_start

    @staticmethod
    def _stats(loss_sum: torch.Tensor, correct: torch.Tensor, seen: float) -> dict[str, float]:
        return {"loss_sum": float(loss_sum), "correct": float(correct), "seen": seen}

    def _end_epoch(self, outcome: str, train_s: float) -> float:
        """Evaluate, record and checkpoint; returns the time to reserve for the final evaluation."""
        cfg, s, d = self.cfg, self.state, self.data
        t0 = time.monotonic()
        top1 = None
        if len(d.test_images):
            top1, _ = evaluate_top(
                self.enc,
                d.test_images,
                d.test_labels,
                batch_size=cfg.eval_batch_size,
                bf16=cfg.bf16,
                channels_last=self.channels_last,
            )
        eval_s = time.monotonic() - t0
        stats = s.epoch_stats
        seen = max(stats["seen"], 1.0)
        record = {
            "epoch": s.epoch + 1,
            "loss": stats["loss_sum"] / seen,
            "train_acc": stats["correct"] / seen,
            "test_top1": top1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": round(self.steps * self.batch / train_s, 1) if train_s > 0 else None,
            "seconds": round(train_s + eval_s, 3),
            "elapsed_s": round(self.elapsed(), 1),
        }
        s.history.append(record)
        s.epoch += 1
        s.step_in_epoch = 0
        s.epoch_stats = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0}
        tail_s = 2 * eval_s + 5.0
        if outcome == "budget":
            s.budget.append(
                {
                    "after_epoch": s.epoch,
                    "epochs_from": s.epochs,
                    "epochs_to": s.epoch,
                    "reason": "time up mid-epoch",
                }
            )
            s.epochs = s.epoch
        self._save(s.epoch_stats)
        self._emit(
            kind="epoch",
            step=self.steps,
            loss=record["loss"],
            train_acc=record["train_acc"],
            test_top1=top1,
            lr=record["lr"],
            images_per_s=record["images_per_s"],
            epoch_s=record["seconds"],
        )
        log.info("epoch %d/%d %s", s.epoch, s.epochs, record)
        return tail_s

    def _refit(self, epoch_s: float, tail_s: float) -> None:
        """Fit the number of epochs to the time budget, given the wall time of a whole epoch."""
        cfg, s = self.cfg, self.state
        if cfg.max_minutes is None:
            return
        fitted = fit_epochs(
            done=s.epoch,
            requested=cfg.epochs,
            elapsed_s=self.elapsed() + tail_s,
            epoch_s=epoch_s,
            budget_s=60 * cfg.max_minutes,
        )
        if fitted == s.epochs:
            return
        s.budget.append(
            {
                "after_epoch": s.epoch,
                "epochs_from": s.epochs,
                "epochs_to": fitted,
                "epoch_s": round(epoch_s, 2),
            }
        )
        self._emit(
            kind="note", step=0, message=f"time budget: {s.epochs} -> {fitted} epochs ({epoch_s:.1f} s each)"
        )
        s.epochs = fitted

    def run(self, command: str | None) -> TrainResult:
        s = self.state
        tail_s = 10.0
        epoch_s: float | None = None  # wall time of a whole epoch at steady speed, once one has run
        while s.epoch < s.epochs:
            if epoch_s is not None:
                self._refit(epoch_s, tail_s)
                if s.epoch >= s.epochs:
                    break
            t0 = time.monotonic()
            outcome, steady, measured = self._run_epoch(tail_s)
            if outcome == "paused":
                self._save(s.epoch_stats)
                return self._result("paused")
            tail_s = self._end_epoch(outcome, steady)
            # Everything the epoch cost (plan, steps, evaluation, checkpoint), warm-up excess removed.
            epoch_s = time.monotonic() - t0 - measured + steady if steady > 0 else None
        return self._finish(command)

    def _result(self, status: str, **kwargs: Any) -> TrainResult:
        s = self.state
        last = s.history[-1]["test_top1"] if s.history else None
        extra = {"top1": last, "top5": None, **kwargs}
        return TrainResult(
            model=self.enc.eval(),
            status=status,
            epochs_run=s.epoch,
            epochs_requested=self.cfg.epochs,
            history=list(s.history),
            seconds=self.elapsed(),
            out=self.out,
            **extra,
        )

    def _finish(self, command: str | None) -> TrainResult:
        cfg, s, d = self.cfg, self.state, self.data
        self.distill.close()
        enc = self.enc.eval()
        accuracy: dict[str, Any] = {"top1": None, "top5": None, "n": len(d.test_images), "precision": "fp32"}
        if len(d.test_images):
            top1, top5 = evaluate_top(
                enc,
                d.test_images,
                d.test_labels,
                batch_size=cfg.eval_batch_size,
                bf16=False,
                channels_last=self.channels_last,
            )
            accuracy.update(top1=top1, top5=top5)
        run = {
            "epochs_requested": cfg.epochs,
            "epochs_run": s.epoch,
            "budget": s.budget,
            "seconds": round(self.elapsed(), 1),
            "device": device_name(self.device),
            "history": s.history,
            "train_images": len(d.train_images),
            "test_images": len(d.test_images),
        }
        weights, card = write_model(
            self.out, config=cfg, enc=enc, accuracy=accuracy, run=run, command=command
        )
        if cfg.optimize or self.prior:
            write_trained_model(self.out / "model", cfg, enc, accuracy, prior=self.prior)
        s.status = "done"
        self._save(s.epoch_stats)
        return self._result("done", top1=accuracy["top1"], top5=accuracy["top5"], weights=weights, card=card)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    command: str | None = None,
) -> TrainResult:
    """Train ``config.model`` as ``config`` says, checkpointing into ``config.out``.

    Args:
        config: the run.
        resume: continue the run checkpointed in ``config.out`` (its configuration must match, apart from
            the session fields ``device``, ``stop_after_*``, ``checkpoint_every_steps``, ``log_every_steps``).
        progress: called with a :class:`TrainProgress` every ``log_every_steps`` steps and after each epoch.
        command: the command line to record in the model card.

    Returns:
        A :class:`TrainResult`; with status ``done`` the final weights ``<out>/<model>.safetensors`` and model
        card ``<out>/<model>.json`` are written; ``paused`` means a ``stop_after_*`` limit ended the session.

    Raises:
        ValueError: bad data, an out folder that already holds a run (without ``resume``), a configuration
            that differs from the checkpointed one, or a teacher that does not fit.
    """
    return _Trainer(config, resume=resume, progress=progress).run(command)
