"""Early exit (seed 22.2.3), ``-O exit:budget=B``: images leave the network after the first block whose exit
head is sure enough, and the rest go on as a smaller batch.

Heads (:mod:`vitedge.dynamic.heads`) sit after chosen blocks; they are trained on the frozen backbone by
``vitedge train MODEL --exit-heads 3,4,5,6,7,8`` (distilled from the model's own final head) and carry their
calibration records. The threshold is set from ``budget``, the top-1 loss the user allows against the full
model: on held-out calibration images (never the test set), the lowest threshold whose loss, as a one-sided
95 % upper bound, stays within the budget, for it and every higher threshold (:func:`calibrate`).

Samples that exit leave the batch: after each exit block the state keeps only the rows still running
(``index_select``), so compute is saved in wall time at batch 1 and in batches alike, never masked. In the
execution plan, ``exit`` fills the ``exit`` step of each head's block (what ``--explain`` shows) and the
whole-model ``router`` step that runs the shrinking loop; the feature path (``encode``) runs every block,
since features of an exited image would come from another depth.

Neutral settings: ``threshold=1.0`` (no score exceeds it) reproduces the model's logits.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitedge.api import Composition, register
from vitedge.dynamic.heads import ExitHeads, HeadsFile, HeadsSpec, exit_score, load_heads, pool_tokens
from vitedge.models.base import Encoder, SequenceEncoder, Trace
from vitedge.plan import PlanBuilder
from vitedge.plan.sequence import TokenState, initial_state, run_steps

if TYPE_CHECKING:
    from vitedge.plan import ExecutionPlan

log = logging.getLogger(__name__)

CRITERIA = ("confidence", "entropy")
Z_95 = 1.6449  # one-sided 95 % normal quantile
CANDIDATES = 512  # thresholds tried by calibrate
BUNDLED_HEADS = "exits.safetensors"  # the heads file's name inside a saved model directory


@dataclass(frozen=True, kw_only=True)
class ExitConfig:
    """``budget``: allowed top-1 loss against the full model (0.01 = 1 pp), turned into a threshold on the
    heads' calibration records; ``criterion`` (:data:`CRITERIA`); ``threshold``: use this score threshold
    instead of calibrating (1.0: never exit); ``heads``: a heads file (empty: the model's own, shipped
    beside its weights)."""

    budget: float = 0.01
    criterion: str = "confidence"
    threshold: float | None = None
    heads: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.budget, int | float) and 0.0 <= self.budget < 1.0):
            raise ValueError(f"exit:budget is a top-1 loss in [0, 1) (0.01 = 1 pp), got {self.budget!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"exit:criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"exit:threshold is a score in [0, 1] (1: never exit), got {self.threshold}")

    def bundle(self, model: Encoder, out: Path) -> ExitConfig:
        """For a saved directory ``out``: the heads file copied into it and the threshold fixed, so the
        directory loads anywhere with the threshold it was saved with (:mod:`vitedge.models.saved`)."""
        path = resolve_heads(model, self)
        if path is None:  # untrained heads: their weights are in the directory, the threshold is given
            return self
        shutil.copyfile(path, out / BUNDLED_HEADS)
        cal = exit_calibration(model, self)
        threshold = self.threshold if cal is None else cal.threshold
        return replace(self, heads=BUNDLED_HEADS, threshold=threshold)

    def located(self, root: Path) -> ExitConfig:
        """A relative ``heads`` path read from a saved directory, resolved against it."""
        if not self.heads or Path(self.heads).is_absolute():
            return self
        return replace(self, heads=str(root / self.heads))


# --- calibration (pure) ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Calibration:
    """A threshold and what it did on the calibration images: ``loss`` (top-1 against the full model),
    its one-sided 95 % upper ``bound``, mean ``depth`` (fraction of blocks run), the fraction of images
    leaving at each exit (``exits``; the rest run to the end), and the full model's top-1 there
    (``base_top1``: near 1 on images the backbone was trained on)."""

    threshold: float
    loss: float
    bound: float
    depth: float
    exits: tuple[float, ...]
    images: int
    base_top1: float


def exit_at(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """scores (N, E) -> (N,) the first exit whose score exceeds ``threshold``, E where none does."""
    over = scores > threshold  # (N, E)
    e = scores.shape[1]
    first = torch.where(over, torch.arange(e).expand_as(over), torch.full_like(over, e, dtype=torch.long))
    return first.amin(1)


def outcome(
    records: dict[str, torch.Tensor], criterion: str, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) exit index and (N,) loss per image (final correct - exit correct, in {-1, 0, 1})."""
    scores, pred, final, label = (records[k] for k in (criterion, "pred", "final", "label"))
    at = exit_at(scores, threshold)
    n = pred.shape[0]
    chosen = torch.cat([pred, final[:, None]], 1)[torch.arange(n), at]  # (N,)
    loss = (final == label).float() - (chosen == label).float()
    return at, loss


def blocks_run(at: torch.Tensor, blocks: tuple[int, ...], depth: int) -> torch.Tensor:
    """Exit indices (N,) -> (N,) blocks each image ran (exit ``j`` follows 0-based block ``blocks[j]``;
    index E is the full ``depth``)."""
    return torch.tensor([b + 1 for b in blocks] + [depth])[at]


def calibrate(
    records: dict[str, torch.Tensor], *, budget: float, criterion: str, blocks: tuple[int, ...], depth: int
) -> Calibration:
    """The lowest threshold whose calibration loss has a 95 % upper bound within ``budget``, as must every
    higher threshold tried (so a lucky dip in the loss curve is not taken).

    Args:
        records: per calibration image, ``criterion`` and ``pred`` (N, E) per exit, ``final`` and
            ``label`` (N,).
        budget: allowed top-1 loss (fraction).
        blocks: the 0-based block each exit follows; ``depth``: the model's blocks.
    """
    scores = records[criterion].float()
    n = scores.shape[0]
    if n < 2:
        raise ValueError("calibration needs at least 2 images")
    qs = torch.linspace(0.0, 1.0, CANDIDATES)
    candidates = torch.cat([torch.tensor([1.0]), scores.flatten().quantile(qs).flip(0)]).unique(sorted=True)
    best = _summary(records, criterion, 1.0, blocks, depth)
    for t in candidates.flip(0).tolist():  # from the strictest down
        summary = _summary(records, criterion, t, blocks, depth)
        if summary.bound > budget:
            break
        best = summary
    return best


def _summary(
    records: dict[str, torch.Tensor], criterion: str, threshold: float, blocks: tuple[int, ...], depth: int
) -> Calibration:
    at, loss = outcome(records, criterion, threshold)
    n = loss.numel()
    mean = float(loss.mean())
    # 1/n is added to the variance so that a run of zero losses on few images is no proof of safety
    bound = mean + Z_95 * math.sqrt((float(loss.var()) + 1.0 / n) / n)
    ran = blocks_run(at, blocks, depth).float()
    counts = torch.bincount(at, minlength=len(blocks) + 1)[: len(blocks)]
    return Calibration(
        threshold=threshold,
        loss=mean,
        bound=bound,
        depth=float(ran.mean()) / depth,
        exits=tuple(float(c) / n for c in counts),
        images=n,
        base_top1=float((records["final"] == records["label"]).float().mean()),
    )


@functools.lru_cache(maxsize=16)
def _cached_calibration(path: str, mtime_ns: int, budget: float, criterion: str, depth: int) -> Calibration:
    f = load_heads(path)
    blocks = f.heads.spec.blocks
    return calibrate(f.calibration, budget=budget, criterion=criterion, blocks=blocks, depth=depth)


# --- the plan's steps ---------------------------------------------------------------------------------
def select_rows(state: TokenState, idx: torch.Tensor) -> TokenState:
    """The state of the images ``idx`` (B',) only."""

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, idx)

    x = state.x.index_select(0, idx)
    return TokenState(
        x=x,
        size=pick(state.size),
        source=pick(state.source),
        num_prefix=state.num_prefix,
        prop_attn=state.prop_attn,
        index=pick(state.index),
    )


@dataclass(frozen=True, kw_only=True)
class ExitStep:
    """The ``exit`` step of one block: where a head sits. On the whole-batch feature path it changes
    nothing (features come from the last block); the router takes exiting images out."""

    head: int
    threshold: float
    criterion: str
    label: str

    @property
    def detail(self) -> str:
        return f"exit {self.criterion[:4]}>{self.threshold:.3g}"  # "exit conf>0.951", short for the table

    def __call__(self, encoder: SequenceEncoder, state: TokenState, trace: Trace | None) -> TokenState:
        return state


@dataclass(frozen=True, kw_only=True)
class ExitRouter:
    """The router step: the block loop with images leaving the batch at exit heads."""

    threshold: float
    criterion: str
    heads: dict[int, int]  # block -> head index
    label: str

    def __call__(self, encoder: Encoder, x: torch.Tensor, trace: Trace | None) -> torch.Tensor:
        """Logits (B, K) in input order; ``trace.depth`` gets the blocks each image ran."""
        assert isinstance(encoder, SequenceEncoder) and encoder.plan is not None
        encoder.check_size(x)
        plan: ExecutionPlan = encoder.plan
        heads: ExitHeads = encoder.exits  # type: ignore[assignment]
        num_cls = heads.spec.num_cls
        opts = plan.tokens
        state = initial_state(
            encoder,
            encoder.embed(x),
            track_source=opts.restore,
            prop_attn=opts.prop_attn,
            track_index=opts.track_index,
        )
        b = x.shape[0]
        rows = torch.arange(b, device=x.device)  # original position of each row still running
        depth = torch.full((b,), len(plan.blocks), dtype=torch.long)
        out: torch.Tensor | None = None
        for i, (view, steps) in enumerate(zip(encoder.blocks, plan.blocks, strict=True)):
            state = run_steps(encoder, view, steps, state, trace)
            j = self.heads.get(i)
            if j is None:
                continue
            logits = heads(j, pool_tokens(state.x, num_cls, state.num_prefix, state.size))  # (B', K)
            done = exit_score(logits, self.criterion) > self.threshold  # (B',)
            if not bool(done.any()):
                continue
            if out is None:
                out = logits.new_empty(b, logits.shape[1])
            gone = done.nonzero().flatten()
            out[rows[gone]] = logits[gone]
            depth[rows[gone].cpu()] = i + 1
            stay = (~done).nonzero().flatten()
            if stay.numel() == 0:
                rows = stay
                break
            state, rows = select_rows(state, stay), rows[stay]
        if rows.numel():
            feats = state.x
            if opts.restore and state.source is not None:
                feats = state.source.transpose(1, 2) @ feats
            final = encoder.forward_head(encoder.final_norm(feats))  # (B', K)
            if out is None:
                out = final if rows.numel() == b else final.new_empty(b, final.shape[1])
            if out is not final:
                out[rows] = final.to(out.dtype)
        if trace is not None:
            trace.depth = depth
        assert out is not None
        return out


def resolve_heads(model: Encoder, config: ExitConfig) -> Path | None:
    """The heads file ``config`` names, or the model's own (None: it has none)."""
    if config.heads:
        return Path(config.heads).expanduser()
    from vitedge.models import bundled_part

    return bundled_part(str(model.info.extra.get("base", model.model_id)), "exits")


def default_spec(model: SequenceEncoder) -> HeadsSpec:
    """Heads for a model that has none: after every block from a third of the depth to the second last."""
    depth = len(model.blocks)
    dim = model.blocks[0].attn.proj.out_features
    return HeadsSpec(
        blocks=tuple(range(max(depth // 3 - 1, 0), depth - 1)),
        dim=dim,
        num_cls=min(model.layout.num_cls + model.layout.num_dist, 2),
        hidden=2 * dim,
        classes=model.info.num_classes,
    )


def check_spec(model: SequenceEncoder, spec: HeadsSpec, where: str) -> None:
    """ValueError when heads of ``spec`` cannot sit on ``model``."""
    depth = len(model.blocks)
    dim = model.blocks[0].attn.proj.out_features
    problems = []
    if spec.dim != dim:
        problems.append(f"they read {spec.dim}-wide tokens, the model's are {dim}")
    if spec.classes != model.info.num_classes:
        problems.append(f"they predict {spec.classes} classes, the model {model.info.num_classes}")
    if any(not 0 <= blk < depth - 1 for blk in spec.blocks):
        problems.append(
            f"they follow blocks {list(spec.blocks)}, the model has {depth} (0..{depth - 2} allowed)"
        )
    if spec.num_cls > model.layout.num_cls + model.layout.num_dist:
        problems.append(f"they read {spec.num_cls} class tokens, the model has fewer")
    if problems:
        raise ValueError(f"exit heads {where} do not fit {model.model_id}: {'; '.join(problems)}")


def exit_steps(model: Encoder, config: ExitConfig, plan: PlanBuilder) -> None:
    assert isinstance(model, SequenceEncoder)
    heads: ExitHeads = model.exits  # type: ignore[assignment]
    threshold = config.threshold
    if threshold is None:
        cal = exit_calibration(model, config)
        assert cal is not None  # the handler refused a budget without a heads file
        threshold = cal.threshold
    by_block = {blk: j for j, blk in enumerate(heads.spec.blocks)}
    for blk, j in by_block.items():
        step = ExitStep(head=j, threshold=threshold, criterion=config.criterion, label=plan.current)
        plan.set_block(blk, "exit", step)
    plan.set_model(
        "router",
        ExitRouter(threshold=threshold, criterion=config.criterion, heads=by_block, label=plan.current),
    )


def exit_calibration(model: Encoder, config: ExitConfig) -> Calibration | None:
    """What the budget's threshold did on the calibration images (None with an explicit threshold)."""
    if config.threshold is not None:
        return None
    path = resolve_heads(model, config)
    if path is None or not path.is_file():  # untrained heads, or a file gone since it was applied
        return None
    return _cached_calibration(
        str(path.resolve()), path.stat().st_mtime_ns, config.budget, config.criterion, len(model.blocks)
    )


def _heads_for(model: SequenceEncoder, config: ExitConfig) -> ExitHeads:
    path = resolve_heads(model, config)
    if path is None:
        if config.threshold is None:
            raise ValueError(
                f"{model.model_id} has no trained exit heads: train them with `vitedge train "
                f"{model.model_id} --exit-heads BLOCKS --data DIR` and pass exit:heads=FILE, or give "
                "exit:threshold=T to time untrained heads (mechanics and speed only; accuracy needs trained "
                "heads)"
            )
        log.warning("%s: untrained exit heads; timings are real, accuracy is not", model.model_id)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return ExitHeads(default_spec(model))
    loaded: HeadsFile = load_heads(path)
    check_spec(model, loaded.heads.spec, str(path))
    digest = loaded.meta.get("weights_digest")
    # on top of other options the weights differ by design (int8, bf16), and a saved directory's skeleton
    # is untrained until its weights load: only a bare trained model is compared
    if digest and model.info.trained and not model.applied and digest != model.weights_digest():
        log.warning(
            "exit heads %s were trained on other weights than %s's; their calibration may not hold",
            path,
            model.model_id,
        )
    return loaded.heads


@register(
    "exit",
    steps=exit_steps,
    compose=Composition(
        fills=frozenset({"exit", "router"}),
        excludes={"compile": "compile traces one path; exit splits the batch by content at every head"},
    ),
)
def _apply_exit(model: Encoder, config: ExitConfig) -> None:
    if model.info.family == "swin" or not isinstance(model, SequenceEncoder):
        raise ValueError(
            f"exit runs on single-sequence encoders (ViT, DeiT, CLIP, SigLIP, ViT4MNIST); {model.model_id} "
            f"is a {model.info.family} model"
        )
    if model.info.num_classes <= 0:
        raise ValueError(f"exit needs a classifier; {model.model_id} returns features")
    heads = _heads_for(model, config)
    ref = next(p for p in model.parameters() if p.is_floating_point())
    model.add_module("exits", heads.to(device=ref.device, dtype=ref.dtype))


def exit_calibration_depths(model: Encoder) -> torch.Tensor | None:
    """(N,) blocks each calibration image ran under the model's exit threshold (None: no calibration)."""
    for config in model.applied:
        if isinstance(config, ExitConfig):
            path = resolve_heads(model, config)
            if path is None or not path.is_file():
                return None
            rec = load_heads(path).calibration
            threshold = config.threshold
            if threshold is None:
                cal = exit_calibration(model, config)
                assert cal is not None
                threshold = cal.threshold
            heads: ExitHeads = model.exits  # type: ignore[assignment]
            at, _ = outcome(rec, config.criterion, threshold)
            return blocks_run(at, heads.spec.blocks, len(model.blocks))
    return None


def exit_info(model: Encoder) -> dict[str, Any] | None:
    """The exit step's threshold and calibration figures, for reports (None without ``exit``)."""
    for config in model.applied:
        if isinstance(config, ExitConfig):
            cal = exit_calibration(model, config)
            heads: ExitHeads = model.exits  # type: ignore[assignment]
            blocks = [b + 1 for b in heads.spec.blocks]
            info: dict[str, Any] = {"blocks": blocks, "criterion": config.criterion}
            if cal is None:
                info["threshold"] = config.threshold
                return info
            info |= {
                "threshold": cal.threshold,
                "budget": config.budget,
                "calibration_loss": cal.loss,
                "calibration_bound": cal.bound,
                "calibration_depth": cal.depth,
                "calibration_images": cal.images,
                "calibration_base_top1": cal.base_top1,
            }
            return info
    return None
