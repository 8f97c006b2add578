"""Structured pruning (``-O structured:heads=0.5,mlp=0.5,blocks=2``): remove attention heads, MLP hidden
channels and whole blocks, so the model really does less work (the seed's 22.4.1).

- ``heads``: the fraction of heads removed in every block (at least one head stays). A head's q, k, v rows and
  its columns of the output projection go together.
- ``mlp``: the fraction of MLP hidden channels removed in every block. Which layers must shrink together is
  found by Torch-Pruning's dependency graph traced through the MLP (fc1 -> act -> fc2, and SwiGLU's two input
  projections and hidden norm alike).
- ``blocks``: the number of whole blocks removed: those whose output is most similar to their input on the
  calibration images (cosine over tokens; :mod:`vitedge.compress.calibration`).
- ``importance``: ``l1`` or ``l2`` weight magnitude of everything a head / channel owns, or ``random``;
  add a criterion to ``IMPORTANCE``.

The neutral setting ``heads=0,mlp=0,blocks=0`` leaves the model untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitedge.api import Composition, register
from vitedge.compress.calibration import calibration_batches
from vitedge.compress.qlinear import is_plain_linear
from vitedge.models.base import AttentionView, Encoder
from vitedge.models.surgery import head_pruning_refusal, keep_heads, remove_blocks

# weights (rows, cols) -> one score per row; a head's or channel's parameters are laid out as rows.
Importance = Callable[[torch.Tensor], torch.Tensor]
IMPORTANCE: dict[str, Importance] = {
    "l1": lambda w: w.abs().sum(dim=1),
    "l2": lambda w: w.pow(2).sum(dim=1).sqrt(),
    "random": lambda w: torch.rand(w.shape[0], generator=torch.Generator().manual_seed(0)),
}
CHANNEL_ALIGN = 8  # keep MLP widths a multiple of this: GEMM kernels block by 8/16
_FLOAT_LAYERS = "structured removes heads and channels of float nn.Linear layers, which {} replaces"
# Techniques that must come after structured pruning in a stack
MUST_FOLLOW = {q: _FLOAT_LAYERS.format(q) for q in ("int8", "int8wo", "int4", "mixed")}


@dataclass(frozen=True, kw_only=True)
class StructuredConfig:
    """Fractions of heads and MLP channels removed per block, and how many whole blocks are removed."""

    heads: float = 0.0
    mlp: float = 0.0
    blocks: int = 0
    importance: str = "l1"

    def __post_init__(self) -> None:
        for name in ("heads", "mlp"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"structured {name} is a fraction removed in [0, 1), got {v}")
        if self.blocks < 0:
            raise ValueError(f"structured blocks is a number of blocks >= 0, got {self.blocks}")
        if self.importance not in IMPORTANCE:
            raise ValueError(
                f"structured importance must be one of {sorted(IMPORTANCE)}, got {self.importance!r}"
            )


def head_scores(attn: AttentionView, importance: Importance) -> torch.Tensor:
    """One score per head from the head's q/k/v rows and output-projection columns -> (heads,)."""
    h, d = attn.num_heads, attn.head_dim
    parts = [attn.proj.weight.detach().t().reshape(h, -1)]
    if attn.qkv is not None:
        parts.append(attn.qkv.weight.detach().reshape(3, h, d, -1).permute(1, 0, 2, 3).reshape(h, -1))
    else:
        parts += [lin.weight.detach().reshape(h, -1) for lin in (attn.q, attn.k, attn.v) if lin is not None]
    return importance(torch.cat(parts, dim=1).float())


def prune_heads(model: Encoder, fraction: float, importance: Importance) -> None:
    for b in model.blocks:
        a = b.attn
        reason = head_pruning_refusal(a)
        if reason:
            raise ValueError(f"structured:heads on {model.model_id}: {reason}")
        lins = [a.qkv, a.q, a.k, a.v, a.proj]
        if not all(lin is None or is_plain_linear(lin) for lin in lins):
            raise ValueError("structured:heads must come before quantisation in the -O order")
        n_keep = max(1, a.num_heads - round(fraction * a.num_heads))
        keep = head_scores(a, importance).topk(n_keep).indices.sort().values.tolist()
        keep_heads(a, keep)


def prune_mlp(model: Encoder, fraction: float, importance: Importance) -> None:
    import torch_pruning as tp

    for b in model.blocks:
        lins = [m for m in b.mlp.modules() if isinstance(m, nn.Linear)]
        if not lins or not all(is_plain_linear(m) for m in lins):
            raise ValueError("structured:mlp needs float nn.Linear MLPs; put it before quantisation in -O")
        fc1 = lins[0]
        hidden = fc1.out_features
        n_keep = max(1, hidden - round(fraction * hidden))
        if hidden >= 4 * CHANNEL_ALIGN:
            n_keep = max(CHANNEL_ALIGN, round(n_keep / CHANNEL_ALIGN) * CHANNEL_ALIGN)
        if n_keep >= hidden:
            continue
        example = torch.zeros(1, 2, fc1.in_features, dtype=fc1.weight.dtype)
        graph = tp.DependencyGraph().build_dependency(b.mlp, example_inputs=example)
        group = graph.get_pruning_group(fc1, tp.prune_linear_out_channels, idxs=list(range(hidden)))
        # Every parameter the dependency graph ties to a hidden channel, as rows of one matrix.
        rows = [
            _channel_rows(dep.target.module, dep.handler, tp)
            for dep, _ in group
            if dep.target.module is not None
        ]
        owned = [r for r in rows if r is not None and r.shape[0] == hidden]
        scores = importance(torch.cat(owned, dim=1).float())
        drop = scores.topk(hidden - n_keep, largest=False).indices.sort().values.tolist()
        graph.get_pruning_group(fc1, tp.prune_linear_out_channels, idxs=drop).prune()


def _channel_rows(module: nn.Module, handler: object, tp: object) -> torch.Tensor | None:
    if isinstance(module, nn.Linear):
        if handler == tp.prune_linear_out_channels:  # type: ignore[attr-defined]
            return module.weight.detach()
        return module.weight.detach().t()
    return None


def block_similarity(model: Encoder, batches: list[torch.Tensor]) -> torch.Tensor:
    """Mean cosine similarity between each block's input and output tokens -> (num_blocks,)."""
    views = model.blocks
    sims = torch.zeros(len(views))
    count = 0

    def hook(i: int) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple, out: object) -> None:
            x = args[0]
            y = out[0] if isinstance(out, tuple) else out
            assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            sims[i] += F.cosine_similarity(x.float(), y.float(), dim=-1).mean().item() * x.shape[0]

        return fn

    # The hooks fire when the native blocks run, so calibration runs them (native=True) whatever plan
    # steps earlier -O options (merge, prune, adaptive, int8attn) added.
    handles = [v.module.register_forward_hook(hook(i)) for i, v in enumerate(views)]
    try:
        with torch.inference_mode():
            for x in batches:
                model.check_input(x)
                model.logits(x.to(model.compute_dtype), native=True)
                count += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    return sims / max(count, 1)


def _ordinary_parameters(model: nn.Module) -> None:
    """Replace inference-mode parameters (a model loaded under ``torch.inference_mode()``) by ordinary ones:
    Torch-Pruning traces the MLPs with autograd, which cannot record inference tensors."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_inference():
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


@register("structured", compose=Composition(after=MUST_FOLLOW))
def _apply_structured(model: Encoder, config: StructuredConfig) -> None:
    with torch.inference_mode(False), torch.enable_grad():
        _ordinary_parameters(model)
        _structured(model, config)


def _structured(model: Encoder, config: StructuredConfig) -> None:
    importance = IMPORTANCE[config.importance]
    if config.blocks:
        n = len(model.blocks)
        if config.blocks >= n:
            raise ValueError(
                f"structured:blocks={config.blocks} would remove all {n} blocks of {model.model_id}"
            )
        sims = block_similarity(model, calibration_batches(model, images=256))
        remove_blocks(model, sims.topk(config.blocks).indices.tolist())
    if config.heads > 0:
        prune_heads(model, config.heads, importance)
    if config.mlp > 0:
        prune_mlp(model, config.mlp, importance)
