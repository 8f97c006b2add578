"""Helpers shared by the token reducers (merging, pruning, window merging): row copies and the check that
an encoder can run with fewer tokens. The block loop is the execution plan's (:mod:`vitedge.plan.sequence`).
"""

from __future__ import annotations

import torch

from vitedge.models.base import BlockView, Encoder, SequenceEncoder


def flat_rows(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Row indices ``idx`` (B, K), ``n`` rows per batch item -> (B * K,) rows of the flattened batch."""
    return (idx + torch.arange(idx.shape[0], device=idx.device)[:, None] * n).reshape(-1)


def rows_of(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t`` (B, N, C) at ``idx`` (B, K) -> (B, K, C), as one row copy (``index_select`` on the flattened
    batch; several times faster on CPU than ``gather`` with an index expanded over C)."""
    b, n, c = t.shape
    return t.reshape(b * n, c).index_select(0, flat_rows(idx, n)).view(b, idx.shape[1], c)


def decreasing_schedule(r: int, depth: int) -> list[int]:
    """``2r`` at the first block down to 0 at the last, linearly: the same total as ``r`` in every block."""
    return [round(2 * r * (1 - i / max(depth - 1, 1))) for i in range(depth)]


def check_supported(encoder: Encoder, technique: str) -> list[BlockView]:
    """The encoder's block views, or a ValueError naming why ``technique`` cannot run on it."""
    if encoder.info.family == "swin":
        raise ValueError(
            f"{technique} runs on single-sequence encoders; on Swin, whose attention needs whole windows, "
            f"use -O window_merge:r=N (tokens merged per window) or -O window_prune:keep=F (windows kept)"
        )
    if not isinstance(encoder, SequenceEncoder):
        raise ValueError(
            f"{technique} needs a single-sequence encoder (ViT, DeiT, CLIP, SigLIP, ViT4MNIST); "
            f"{encoder.model_id} is a {encoder.info.family} model"
        )
    views = encoder.blocks
    if any(v.attn.rope for v in views):
        raise ValueError(
            f"{technique} cannot run on {encoder.model_id}: rotary position embeddings (EVA) tie each "
            "query and key to one grid position, which merged or pruned tokens no longer have"
        )
    return views
