"""The execution plan in words and numbers (``vitedge optimize MODEL -O ... --explain``).

Per block: the tokens its attention computes and the tokens its MLP sees (per image, from the cost model,
so they follow the plan's reducers and window steps), which attention product runs, the reducer, the gate
and exit slots, and the cost model's MACs. Whole-model: the precision, the router, compilation, and the
options that only changed weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from vitedge.attention.batched import short_enough
from vitedge.models.base import Encoder
from vitedge.models.spec import AttnOp, LayerSpec, LinearOp


def _label(step: Any) -> str | None:
    """What a step shows: its per-block ``detail`` where it has one, else the -O string that put it there."""
    if step is None:
        return None
    return str(getattr(step, "detail", None) or getattr(step, "label", type(step).__name__))


def _block_layers(layers: tuple[LayerSpec, ...]) -> list[tuple[LayerSpec, LayerSpec]]:
    """(attention, MLP) layer pairs of the blocks, in order."""
    attn = [x for x in layers if x.kind == "attn"]
    mlp = [x for x in layers if x.kind == "mlp"]
    return list(zip(attn, mlp, strict=True))


def _kernel(enc: Encoder, block: Any, tokens: int, windowed: bool) -> str:
    """Which attention product block ``block`` (its BlockPlan, or None) runs."""
    if block is not None and block.attention is not None:
        return _label(block.attention) or "attention step"
    if block is not None and block.window is not None:
        return str(getattr(block.window, "kernel", "window step"))
    if enc.plan is not None and getattr(enc.plan.router, "levels", None) is not None:
        return "per group"  # adaptive's router runs each part of a batch with its own plan
    if enc.plan is None or enc.plan.native_blocks or windowed:
        return "native"  # the wrapped library's own attention module
    # vitedge's loop picks by length on CPU (and by the size of the scores; fused SDPA on accelerators)
    return "bmm" if short_enough(tokens) else "sdpa"


def expected_macs(model: Encoder, x: torch.Tensor) -> float:
    """MACs per image of ``model`` on the images ``x`` (B, C, H, W): ``arch().macs`` unless a router splits
    batches by content (``adaptive``), whose cost is then the mean over ``x`` of each image's own plan."""
    plan = model.plan
    if plan is None or plan.router is None:
        return float(model.arch().macs)
    with torch.inference_mode():
        _, trace = model.forward_traced(x, sources=False)
    if trace.depth is not None:
        return exit_macs(model, trace.depth)
    if trace.keep is None:
        return float(model.arch().macs)
    levels = getattr(plan.router, "levels", {})
    total = 0.0
    for keep, count in zip(*trace.keep.unique(return_counts=True), strict=True):
        view = copy.copy(model)  # shares every module; only its plan differs
        view.plan = levels.get(float(keep))
        total += float(view.arch().macs) * int(count)
    return total / len(trace.keep)


def exit_macs(model: Encoder, depth: torch.Tensor) -> float:
    """Mean MACs per image when image i runs ``depth[i]`` blocks and leaves at the exit head after its last
    block (or at the final head): the cost model's blocks, plus every exit head an image passes through."""
    spec = model.arch()
    blocks = [a.macs + m.macs for a, m in _block_layers(spec.layers)]
    final = sum(x.macs for x in spec.layers if x.kind == "head")
    always = spec.macs - sum(blocks) - final  # the embedding
    heads = getattr(model, "exits", None)
    head_blocks = [] if heads is None else [b + 1 for b in heads.spec.blocks]
    head_macs = 0 if heads is None else heads.spec.macs()
    total = 0.0
    for d in depth.tolist():
        total += always + sum(blocks[:d]) + head_macs * sum(1 for b in head_blocks if b <= d)
        total += final if d == len(blocks) else 0  # the final head ran; an exit head answered otherwise
    return total / max(len(depth), 1)


def explain(model: Encoder) -> dict[str, Any]:
    """The plan of ``model`` as data: ``blocks`` (one entry per block) and whole-model ``steps``.

    Raises:
        TypeError: ``model`` is not an Encoder (use :func:`vitedge.wrap` first).
    """
    from vitedge.api import config_name, describe, technique

    if not isinstance(model, Encoder):
        raise TypeError(f"explain takes a vitedge Encoder, got {type(model).__name__}")
    spec = model.arch()
    plan = model.plan
    views = model.blocks if spec.layers and any(x.kind == "attn" for x in spec.layers) else []
    windowed = model.info.family == "swin"
    rows: list[dict[str, Any]] = []
    for i, (attn, mlp) in enumerate(_block_layers(spec.layers)):
        steps = None if plan is None else plan.blocks[i]
        sdpa = [op for op in attn.ops if isinstance(op, AttnOp)]
        tokens_in = sum(op.windows * op.q_tokens for op in sdpa)
        mlp_ops = [op for op in mlp.ops if isinstance(op, LinearOp)]
        tokens_out = mlp_ops[0].tokens if mlp_ops else tokens_in
        rows.append(
            {
                "block": i,
                "stage": views[i].stage if i < len(views) else 0,
                "tokens_in": tokens_in,
                "tokens_out": tokens_out,
                "kernel": _kernel(model, steps, sdpa[0].q_tokens if sdpa else 0, windowed),
                "reducer": None if steps is None else _label(steps.reducer or steps.window),
                "gate": None if steps is None else _label(steps.gate),
                "exit": None if steps is None else _label(steps.exit),
                "macs": attn.macs + mlp.macs,
            }
        )
    weights_only = [describe(c) for c in model.applied if technique(c).steps is None]
    weights_only += [describe(c) for c in model.applied if config_name(c) == "bf16" and c.mode == "cast"]
    return {
        "model": model.model_id,
        "name": " ".join(describe(c) for c in model.applied) or "baseline",
        "blocks": rows,
        "steps": {
            "compute_dtype": str(model.compute_dtype).removeprefix("torch."),
            "autocast": None
            if model.autocast_dtype is None
            else str(model.autocast_dtype).removeprefix("torch."),
            "router": None if plan is None else _label(plan.router),
            "compiled": None if plan is None or plan.compiled is None else plan.by.get("compiled"),
            "weights": weights_only,
        },
        "macs": spec.macs,
        "flops": 2 * spec.macs,
        "params": spec.params,
    }
