"""``vitedge train MODEL --exit-heads 3,4,5,6,7,8``: exit heads on a frozen backbone, and their calibration.

1. The training images are split: ``calib_fraction`` of them (spread over the set by a seeded draw) are held
   out for calibration, the rest train the heads.
2. One pass of the frozen model over the images records, after every head's block, the pooled tokens the
   head reads (:func:`vitedge.dynamic.heads.pool_tokens`), and the final logits; ``views`` adds that many
   augmented views (the training recipe's crop, flip and TrivialAugment) of each head-training image.
3. The heads are distilled from the model's own final head (KL at ``temperature``) with AdamW and a
   one-cycle schedule: minutes on two CPU cores, since the backbone runs once.
4. Calibration records (every head's scores and prediction, the final prediction and the label on the held-out
   images) go into the heads file, so ``-O exit:budget=B`` turns any budget into a threshold later.
5. The test split is evaluated for the report only (per-head accuracy, and what ``budget=0.01`` does there);
   it never chooses anything.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitedge.dynamic.exit import blocks_run, calibrate, default_spec, outcome
from vitedge.dynamic.heads import ExitHeads, HeadsSpec, exit_scores, pool_tokens, save_heads
from vitedge.models.base import SequenceEncoder
from vitedge.train.augment import augment_batch, plan_epoch, to_unit

Progress = Callable[[str, int, int], None]  # (stage, done, total)
HEADS_FILE = "exits.safetensors"


@dataclass(frozen=True, kw_only=True)
class ExitTrainConfig:
    """How exit heads are trained; ``blocks`` are 1-based ("after the 3rd block")."""

    model: str
    blocks: tuple[int, ...]
    data: str = "cifar10"
    out: str = ""
    views: int = 0
    calib_fraction: float = 0.1
    epochs: int = 8
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 2.0
    hidden: int | None = None
    seed: int = 0
    limit: int | None = None
    eval_limit: int | None = None

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ValueError("--exit-heads needs at least one block, e.g. --exit-heads 3,5,7")
        if any(b < 1 for b in self.blocks) or len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"--exit-heads takes distinct block numbers from 1, got {list(self.blocks)}")
        if not 0.0 < self.calib_fraction < 1.0:
            raise ValueError(f"calibration fraction must be in (0, 1), got {self.calib_fraction}")
        for name in ("views", "epochs", "batch_size"):
            if getattr(self, name) < (0 if name == "views" else 1):
                raise ValueError(f"exit heads: {name} must be >= {0 if name == 'views' else 1}")
        if self.lr <= 0 or self.temperature <= 0 or self.weight_decay < 0:
            raise ValueError("exit heads: lr and temperature must be > 0, weight decay >= 0")


def parse_blocks(text: str) -> tuple[int, ...]:
    """``"3,5,7"`` -> (3, 5, 7), or a ValueError naming the bad part."""
    try:
        return tuple(sorted(int(p) for p in text.split(",") if p.strip()))
    except ValueError:
        raise ValueError(f"--exit-heads takes block numbers such as 3,5,7, got {text!r}") from None


def pooled_features(
    enc: SequenceEncoder, x: torch.Tensor, blocks: tuple[int, ...], num_cls: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images x (B, C, H, W) -> (B, E, F) pooled tokens after each 0-based block of ``blocks``
    and (B, K) final logits, with the model's native blocks (or its plan's, when it has one)."""
    from vitedge.plan.sequence import initial_state, run_steps

    pooled = []
    wanted = set(blocks)
    if enc.plan is None:
        t = enc.embed(x)
        for i, module in enumerate(enc.block_modules()):
            t = enc.call_block(module, t)
            if i in wanted:
                pooled.append(pool_tokens(t, num_cls, enc.layout.num_prefix, None))
        return torch.stack(pooled, 1), enc.forward_head(enc.final_norm(t))
    state = initial_state(enc, enc.embed(x), track_source=False)
    for i, (view, steps) in enumerate(zip(enc.blocks, enc.plan.blocks, strict=True)):
        state = run_steps(enc, view, steps, state, None)
        if i in wanted:
            pooled.append(pool_tokens(state.x, num_cls, state.num_prefix, state.size))
    return torch.stack(pooled, 1), enc.forward_head(enc.final_norm(state.x))


class _Extractor:
    def __init__(self, enc: SequenceEncoder, spec: HeadsSpec, progress: Progress | None) -> None:
        self.enc, self.spec, self.progress = enc, spec, progress
        pre = enc.preprocess
        self.mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(pre.std).view(1, -1, 1, 1)
        self.chunk = 500

    def run(
        self, stage: str, images: torch.Tensor, labels: torch.Tensor, *, seed: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, C, H, W) -> pooled (N, E, F) and final logits (N, K); augmented with the
        training recipe's crop, flip and TrivialAugment when ``seed`` is given."""
        n = len(images)
        steps = (n + self.chunk - 1) // self.chunk
        plan = None
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
            h, w = images.shape[-2:]
            plan = plan_epoch(n, steps, img_size=(int(h), int(w)), generator=gen)
        feats, logits = [], []
        with torch.inference_mode():
            for s in range(steps):
                if plan is None:
                    x = to_unit(images[s * self.chunk : (s + 1) * self.chunk])
                else:
                    x = augment_batch(
                        images, labels, plan, s, batch_size=self.chunk, policy="trivial",
                        fill=self.mean.flatten(), mixing=False,
                    ).x  # fmt: skip
                x = (x - self.mean) / self.std
                f, lg = pooled_features(self.enc, x, self.spec.blocks, self.spec.num_cls)
                feats.append(f)
                logits.append(lg.float())
                if self.progress is not None:
                    self.progress(stage, min((s + 1) * self.chunk, n), n)
        return torch.cat(feats), torch.cat(logits)


def fit_heads(
    heads: ExitHeads,
    feats: torch.Tensor,
    teacher: torch.Tensor,
    config: ExitTrainConfig,
    progress: Progress | None,
) -> list[float]:
    """Distil every head from ``teacher`` logits (N, K) on pooled features (N, E, F); mean loss per epoch."""
    gen = torch.Generator().manual_seed(config.seed)
    n = len(feats)
    batch = min(config.batch_size, n)
    steps = max(n // batch, 1)
    opt = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps * config.epochs)
    t = config.temperature
    losses = []
    heads.train()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(steps):
            idx = order[s * batch : (s + 1) * batch]
            target = F.softmax(teacher[idx] / t, -1)
            x = feats[idx].float()
            loss = sum(
                F.kl_div(F.log_softmax(heads(j, x[:, j]) / t, -1), target, reduction="batchmean")
                for j in range(len(heads.spec.blocks))
            )
            opt.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
            total += float(loss.detach())  # type: ignore[union-attr]
        losses.append(total / steps)
        if progress is not None:
            progress("heads", epoch + 1, config.epochs)
    return losses


def records(
    heads: ExitHeads, feats: torch.Tensor, final: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Calibration records of pooled features (N, E, F), final logits (N, K) and labels (N,)."""
    heads.eval()
    with torch.inference_mode():
        logits = torch.stack([heads(j, feats[:, j].float()) for j in range(feats.shape[1])], 1)  # (N, E, K)
    scores = exit_scores(logits.flatten(0, 1))
    n, e = logits.shape[:2]
    return {
        "confidence": scores["confidence"].view(n, e),
        "entropy": scores["entropy"].view(n, e),
        "pred": logits.argmax(-1),
        "final": final.argmax(-1),
        "label": labels.long(),
    }


def train_exit_heads(config: ExitTrainConfig, *, progress: Progress | None = None) -> dict[str, Any]:
    """Train, calibrate and save exit heads; returns the JSON summary (``heads`` is the file)."""
    import vitedge
    from vitedge.train.data import load_train_data

    t0 = time.monotonic()
    enc = vitedge.load(config.model).eval()
    if not isinstance(enc, SequenceEncoder) or enc.info.family == "swin":
        raise ValueError(
            f"exit heads need a single-sequence encoder; {config.model} is a {enc.info.family} model"
        )
    depth = len(enc.blocks)
    if max(config.blocks) >= depth:
        raise ValueError(
            f"{config.model} has {depth} blocks: exit heads go after blocks 1..{depth - 1} (the last one is "
            f"the model's own head), got {list(config.blocks)}"
        )
    base = default_spec(enc)
    spec = dataclasses.replace(
        base, blocks=tuple(b - 1 for b in config.blocks), hidden=config.hidden or base.hidden
    )
    data = load_train_data(config.data, enc.preprocess, limit=config.limit, eval_limit=config.eval_limit)
    n = len(data.train_images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    n_cal = max(2, round(n * config.calib_fraction))
    if n - n_cal < 1:
        raise ValueError(
            f"{n} training images leave none for the heads after {n_cal} for calibration; give more images"
        )
    cal, train = order[:n_cal].sort().values, order[n_cal:].sort().values

    torch.manual_seed(config.seed)
    heads = ExitHeads(spec)
    ex = _Extractor(enc, spec, progress)
    xs, ys = data.train_images[train], data.train_labels[train]
    feats, teacher = ex.run("features", xs, ys, seed=None)
    for v in range(config.views):
        f, lg = ex.run(f"view {v + 1}", xs, ys, seed=config.seed * 1000 + v + 1)
        feats, teacher = torch.cat([feats, f]), torch.cat([teacher, lg])
    t_feat = time.monotonic() - t0
    losses = fit_heads(heads, feats, teacher, config, progress)
    del feats, teacher
    cf, cl = ex.run("calibration", data.train_images[cal], data.train_labels[cal], seed=None)
    calib = records(heads, cf, cl, data.train_labels[cal])
    cal_01 = calibrate(calib, budget=0.01, criterion="confidence", blocks=spec.blocks, depth=depth)
    report: dict[str, Any] = {
        "model": config.model,
        "blocks": list(config.blocks),
        "train_images": len(train) * (1 + config.views),
        "calibration_images": n_cal,
        "losses": [round(x, 4) for x in losses],
        "calibration": {
            "budget": 0.01,
            "threshold": cal_01.threshold,
            "loss": cal_01.loss,
            "bound": cal_01.bound,
            "depth": cal_01.depth,
        },
    }
    if len(data.test_images):
        tf, tl = ex.run("test (report only)", data.test_images, data.test_labels, seed=None)
        test = records(heads, tf, tl, data.test_labels)
        report["test"] = _test_report(test, cal_01.threshold, spec.blocks, depth)
    out = Path(config.out or f"runs/{config.model.replace(':', '_')}-exits")
    meta: dict[str, Any] = {
        "model": config.model,
        "weights_digest": enc.weights_digest(),
        "training": {**dataclasses.asdict(config), "blocks": list(config.blocks), "seconds": None},
        "report": report,
    }
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["feature_seconds"] = round(t_feat, 1)
    meta["training"]["seconds"] = report["seconds"]
    path = save_heads(out / HEADS_FILE, heads, calib, meta)
    report["heads"] = str(path)
    return report


def _test_report(
    rec: dict[str, torch.Tensor], threshold: float, blocks: tuple[int, ...], depth: int
) -> dict[str, Any]:
    """Per-head accuracy and agreement with the final head, and the calibrated threshold's loss and depth
    on the test split (reported, never used to choose)."""
    label, final, pred = rec["label"], rec["final"], rec["pred"]
    at, loss = outcome(rec, "confidence", threshold)
    ran = blocks_run(at, blocks, depth).float()
    return {
        "top1": float((final == label).float().mean()),
        "head_top1": [round(float((p == label).float().mean()), 4) for p in pred.unbind(1)],
        "head_agreement": [round(float((p == final).float().mean()), 4) for p in pred.unbind(1)],
        "budget_0.01": {
            "loss": float(loss.mean()),
            "depth": float(ran.mean()) / depth,
        },
    }


def check_installable(model: str) -> None:
    """ValueError unless ``model`` ships its heads beside its weights (project models, vit4mnist)."""
    from vitedge.models import PROJECT_MODELS

    shipped = (*PROJECT_MODELS, "vit4mnist")
    if model not in shipped:
        raise ValueError(f"--install is for the shipped models {', '.join(shipped)}, not {model}")


def install_heads(model: str, heads: Path) -> str:
    """Copy a heads file beside a shipped model's weights (``<model>.exits.safetensors``)."""
    from vitedge.models.project import weights_dir

    check_installable(model)
    dst = weights_dir() / f"{model}.exits.safetensors"
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(heads, tmp)
    tmp.replace(dst)
    return str(dst)
