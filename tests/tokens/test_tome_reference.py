"""``merge:keep_norm=0`` is ToMe: held against a transcription of ToMe's published algorithm (Bolya et al.,
"Token Merging: Your ViT but Faster", ICLR 2023; facebookresearch/ToMe), written out here from its
description, run on the same cifar-vit weights over real CIFAR-10 test images.

The transcription follows ToMe's timm patch: per block, attention with ``log(size)`` added to the scores
(proportional attention) returning the keys averaged over heads as the metric; bipartite soft matching over
the whole sequence (even positions A, odd B) with the class token's row and the distillation token's column
masked out, the ``r`` best-matched A tokens merged into their B partners, unmerged A tokens sorted back into
their original order; merging as a size-weighted average (``merge_wavg``); then the MLP.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitedge.data import as_tensor_batches, open_dataset
from vitedge.models import load
from vitedge.tokens.merge import MergeConfig


def tome_matching(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def tome_logits(enc, x: torch.Tensor, r: int) -> torch.Tensor:
    """cifar-vit under ToMe, ``r`` merged per block (plain size-weighted average, proportional attention)."""
    h = enc.embed(x)
    size = None
    for view in enc.blocks:
        a = view.attn
        b, n, _ = h.shape
        y = view.norm1(h)
        qkv = a.qkv(y).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) * a.scale
        if size is not None:
            scores = scores + size.log()[:, None, None, :, 0]
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        h = h + view.ls1(a.proj(out))
        merge = tome_matching(k.mean(1), r, class_token=True, distill_token=True)
        if size is None:
            size = torch.ones_like(h[..., 0, None])
        h = merge(h * size, mode="sum")
        size = merge(size, mode="sum")
        h = h / size
        h = h + view.ls2(view.mlp(view.norm2(h)))
    return enc.forward_head(enc.final_norm(h))


@pytest.fixture(scope="module")
def cifar() -> tuple[object, torch.Tensor]:
    enc = load("cifar-vit")
    assert (enc.layout.num_cls, enc.layout.num_dist, enc.layout.num_reg) == (1, 1, 0)
    x, _ = next(as_tensor_batches(open_dataset("cifar10", enc.preprocess, limit=200), 200))
    return enc, x


@pytest.mark.parametrize("r", range(2, 9))
def test_plain_average_merge_is_tome(cifar, r: int) -> None:
    import vitedge

    enc, x = cifar
    merged = vitedge.optimize_(load("cifar-vit"), MergeConfig(r=r, keep_norm=False))
    with torch.inference_mode():
        ours = merged(x)
        ref = tome_logits(enc, x, r)
    cosine = F.cosine_similarity(ours, ref, dim=1)
    assert cosine.min() >= 0.9999, f"r={r}: lowest per-image logit cosine {cosine.min():.6f}"
