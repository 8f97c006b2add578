"""Per-block token reuse across video frames, after Eventful Transformers (Dutson et al., ICCV 2023).

Each block keeps, per token, the inputs it last computed with and the results. For a new frame a gate picks
the tokens whose input moved by more than ``threshold`` (relative L2) since their last recomputation; only
those go through ``norm1 -> qkv`` (the keys and values of the others are reused). Attention is evaluated
for the recomputed tokens' queries against all (updated) keys and values; the other tokens keep their
attention output, so the influence of a changed token on an unchanged one waits for the next keyframe
(``all_queries`` evaluates every query instead: on ViT-B/16 that N x N product was 16 ms of a 96 ms reused
frame, and skipping it moved the mean cosine on the sample videos by less than 1e-4). A second gate then
recomputes ``proj`` only for tokens whose attention output moved, and a third runs the MLP only for tokens
whose MLP input moved. Everything else reuses its cached residual. Prefix (class) tokens are always
recomputed: they attend to everything. The work really shrinks: the token subsets are gathered, pushed through
the linear layers and scattered back.

The engine sees only the Encoder view (``blocks``: norm1, attn.qkv or q/k/v, proj, norm2, mlp, and the
block's optional ``ls1``/``ls2`` LayerScale and the attention's optional ``q_norm``/``k_norm``/``norm``).
:func:`run_reused` wraps the model's own ``forward_features`` so that patch embedding and the final norm are
the model's; :func:`check_supported` verifies on one frame that the re-implemented blocks reproduce the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BlockCache",
    "ReuseEngine",
    "block_input",
    "block_macs",
    "check_supported",
    "relative_change",
    "run_reused",
]


def relative_change(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:  # (N, D), (N, D) -> (N,)
    """||x - ref|| / ||ref|| per token."""
    return (x - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)


def _part(module: nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    part = getattr(module, name, None)
    return part if isinstance(part, nn.Module) else nn.Identity()


@dataclass
class BlockCache:
    """What one block remembers between frames (all for one image; tokens first)."""

    x_ref: torch.Tensor  # (N, D) block input at each token's last qkv
    q: torch.Tensor  # (H, N, hd)
    k: torch.Tensor  # (H, N, hd)
    v: torch.Tensor  # (H, N, hd)
    attn_ref: torch.Tensor  # (N, D) attention output (before proj) at each token's last proj
    attn_res: torch.Tensor  # (N, D) ls1(proj(attention)) residual
    y_ref: torch.Tensor  # (N, D) MLP-branch input at each token's last MLP
    mlp_res: torch.Tensor  # (N, D) ls2(mlp(norm2(y))) residual


@dataclass
class FrameWork:
    """Tokens recomputed in one frame, per block and stage (for FLOP accounting and plots)."""

    qkv: list[int] = field(default_factory=list)
    proj: list[int] = field(default_factory=list)
    mlp: list[int] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)  # attention rows evaluated


def block_macs(
    view: Any, n_tokens: int, n_qkv: int, n_proj: int, n_mlp: int, n_queries: int | None = None
) -> int:
    """Matmul MACs of one pre-norm block with the given token counts per stage; attention takes ``n_queries``
    rows (default all) against all ``n_tokens`` keys."""
    attn = view.attn
    inner = attn.num_heads * attn.head_dim
    dim = attn.proj.out_features
    if attn.qkv is not None:
        qkv = attn.qkv.in_features * attn.qkv.out_features
    else:
        qkv = sum(m.in_features * m.out_features for m in (attn.q, attn.k, attn.v))
    mlp = sum(m.in_features * m.out_features for m in view.mlp.modules() if isinstance(m, nn.Linear))
    rows = n_tokens if n_queries is None else n_queries
    return n_qkv * qkv + 2 * rows * n_tokens * inner + n_proj * inner * dim + n_mlp * mlp


class ReuseEngine:
    """Runs the blocks of one encoder on a stream of frames, reusing unchanged tokens (module docstring).

    Args:
        blocks: ``encoder.blocks`` (global-attention ViT blocks).
        num_prefix: prefix tokens (class, distillation, registers), always recomputed.
        threshold: relative change of a token's input to a stage that makes it recompute that stage.
        all_queries: evaluate attention for every query (the unchanged tokens' outputs then follow the
            changed keys and values); by default only the recomputed tokens' queries are, and the other
            tokens keep their attention output (module docstring).
    """

    def __init__(
        self, blocks: list[Any], *, num_prefix: int, threshold: float, all_queries: bool = False
    ) -> None:
        if any(b.window is not None for b in blocks):
            raise ValueError(
                "token reuse needs global-attention ViT blocks; windowed (Swin) blocks are not supported"
            )
        self.blocks = blocks
        self.num_prefix = num_prefix
        self.threshold = threshold
        self.all_queries = all_queries
        self.state: list[BlockCache] | None = None
        self._stale: torch.Tensor | None = None  # (N,) bool: tokens moved by warp(), refreshed at block 0

    def reset(self) -> None:
        self.state = None
        self._stale = None

    # --- pieces of one block -----------------------------------------------------------------------
    def _qkv(self, view: Any, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = view.attn  # h: (m, D) -> q, k, v: (H, m, hd)
        m = h.shape[0]
        if attn.qkv is not None:
            q, k, v = attn.qkv(h).reshape(m, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3).unbind(0)
        else:
            q, k, v = (
                lin(h).reshape(m, attn.num_heads, attn.head_dim).transpose(0, 1)
                for lin in (attn.q, attn.k, attn.v)
            )
        return _part(attn.module, "q_norm")(q), _part(attn.module, "k_norm")(k), v

    def _attend(self, view: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (H, m, hd), k, v: (H, N, hd) -> (m, H*hd)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale=view.attn.scale
        )
        out = out[0].transpose(0, 1).reshape(q.shape[1], -1)
        return _part(view.attn.module, "norm")(out)

    def _gate(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        changed = relative_change(x, ref) > self.threshold
        changed[: self.num_prefix] = True
        return changed.nonzero().squeeze(1)

    def _full_block(self, view: Any, x: torch.Tensor) -> tuple[torch.Tensor, BlockCache]:
        ls1, ls2 = _part(view.module, "ls1"), _part(view.module, "ls2")
        q, k, v = self._qkv(view, view.norm1(x))
        a = self._attend(view, q, k, v)
        attn_res = ls1(view.attn.proj(a))
        y = x + attn_res
        mlp_res = ls2(view.mlp(view.norm2(y)))
        cache = BlockCache(
            x.clone(),
            q.clone(),
            k.clone(),
            v.clone(),
            a.clone(),
            attn_res.clone(),
            y.clone(),
            mlp_res.clone(),
        )
        return y + mlp_res, cache

    def _reuse_block(
        self,
        view: Any,
        x: torch.Tensor,
        c: BlockCache,
        work: FrameWork,
        changed: torch.Tensor | None = None,
        stale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ls1, ls2 = _part(view.module, "ls1"), _part(view.module, "ls2")
        if changed is None:
            idx = self._gate(x, c.x_ref)
        else:  # the patch-level gate decided: other tokens are held at their reference input
            keep = torch.zeros(x.shape[0], dtype=torch.bool)
            keep[: self.num_prefix] = True
            keep[self.num_prefix + changed] = True
            x = torch.where(keep[:, None], x, c.x_ref)
            idx = keep.nonzero().squeeze(1)
        if stale is not None:  # tokens moved by warp(): their q/k/v are redone from their (held) input
            idx = torch.cat([idx, stale.nonzero().squeeze(1)]).unique()
        q, k, v = self._qkv(view, view.norm1(x[idx]))
        c.x_ref[idx], c.q[:, idx], c.k[:, idx], c.v[:, idx] = x[idx], q, k, v
        if self.all_queries:
            a = self._attend(view, c.q, c.k, c.v)  # every query: the keys/values of changed tokens moved
            idx2 = self._gate(a, c.attn_ref)
            a2 = a[idx2]
        else:  # only the recomputed queries; the others keep their attention output
            a = self._attend(view, c.q[:, idx], c.k, c.v)  # (m, D)
            moved = relative_change(a, c.attn_ref[idx]) > self.threshold
            moved[: self.num_prefix] = True
            idx2, a2 = idx[moved], a[moved]
        c.attn_ref[idx2] = a2
        c.attn_res[idx2] = ls1(view.attn.proj(a2))
        y = x + c.attn_res
        idx3 = self._gate(y, c.y_ref)
        c.y_ref[idx3] = y[idx3]
        c.mlp_res[idx3] = ls2(view.mlp(view.norm2(y[idx3])))
        work.qkv.append(len(idx))
        work.proj.append(len(idx2))
        work.mlp.append(len(idx3))
        work.queries.append(x.shape[0] if self.all_queries else len(idx))
        return y + c.mlp_res

    def warp(self, src: torch.Tensor, pos_delta: torch.Tensor | None = None) -> None:
        """Re-index every block's cached per-token state: token ``j`` takes what token ``src[j]`` held.

        The position embedding is the one thing a moved token's cache gets wrong: ``pos_delta`` (its new
        place's embedding minus its old one's) is added to every block's residual-stream references, so a
        held token passes the right position on and the gates do not take a position change for a change
        of content; and on the next frame the first block recomputes the queries, keys and values of the
        moved tokens from their corrected input, where the position embedding enters attention (1/48 of a
        token's full cost). Later blocks keep the old position's keys: the price of reusing them.

        Args:
            src: ``(N,)`` source token per token (prefix tokens map to themselves).
            pos_delta: ``(N, D)`` position embedding of each token's new place minus that of its old one.
        """
        if self.state is None:
            return
        n = self.state[0].x_ref.shape[0]
        if src.shape != (n,) or src.dtype != torch.long:
            raise ValueError(
                f"warp needs src as ({n},) int64 token indices, got {tuple(src.shape)} {src.dtype}"
            )
        if pos_delta is not None and pos_delta.shape != self.state[0].x_ref.shape:
            want = tuple(self.state[0].x_ref.shape)
            raise ValueError(f"warp needs pos_delta of shape {want}, got {tuple(pos_delta.shape)}")
        if n and (int(src.min()) < 0 or int(src.max()) >= n):
            raise ValueError(
                f"warp: src indices must lie in [0, {n}), got {int(src.min())}..{int(src.max())}"
            )
        if not torch.equal(src[: self.num_prefix], torch.arange(self.num_prefix)):
            raise ValueError("warp: prefix (class) tokens must map to themselves")
        stale = src != torch.arange(n)
        moved = stale.nonzero().squeeze(1)
        origin = src[moved]  # gathered (a copy) before any row is overwritten; only moved rows are copied
        for c in self.state:
            for t in (c.x_ref, c.attn_ref, c.attn_res, c.y_ref, c.mlp_res):
                t[moved] = t[origin]
            for t in (c.q, c.k, c.v):
                t[:, moved] = t[:, origin]
            if pos_delta is not None:
                c.x_ref[moved] += pos_delta[moved]
                c.y_ref[moved] += pos_delta[moved]
        self._stale = stale

    # --- one frame ----------------------------------------------------------------------------------
    def __call__(
        self, tokens: torch.Tensor, *, full: bool, changed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, FrameWork]:
        """Tokens after the embedding ``(1, N, D)`` -> after the last block ``(1, N, D)``.

        ``full`` (a keyframe) recomputes everything and refreshes every cache. ``changed`` (patch indices,
        prefix excluded) replaces the first block's gate with a decision made on pixels.
        """
        if tokens.shape[0] != 1:
            raise ValueError(f"token reuse runs one frame at a time, got a batch of {tokens.shape[0]}")
        x = tokens[0]
        work = FrameWork()
        stale, self._stale = self._stale, None
        if full or self.state is None:
            state = []
            for view in self.blocks:
                x, c = self._full_block(view, x)
                state.append(c)
                n = x.shape[0]
                work.qkv.append(n)
                work.proj.append(n)
                work.mlp.append(n)
                work.queries.append(n)
            self.state = state
        else:
            for i, (view, c) in enumerate(zip(self.blocks, self.state, strict=True)):
                if i == 0:
                    x = self._reuse_block(view, x, c, work, changed, stale)
                else:
                    x = self._reuse_block(view, x, c, work)
        return x.unsqueeze(0), work


@contextlib.contextmanager
def _blocks_replaced(blocks: list[Any], body: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside, block 0 runs ``body`` on its input and the other blocks pass their input through.

    Only instance attributes are set (and removed after), so the model's own forward_features supplies the
    patch embedding and the final norm.
    """
    mods = [b.module for b in blocks]
    try:
        mods[0].forward = lambda x, *a, **k: body(x)
        for m in mods[1:]:
            m.forward = lambda x, *a, **k: x
        yield
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


def run_reused(
    encoder: Any, engine: ReuseEngine, x: torch.Tensor, *, full: bool, changed: torch.Tensor | None = None
) -> tuple[torch.Tensor, FrameWork]:
    """Features ``(1, N, D)`` of one preprocessed frame ``(1, C, H, W)`` through the reuse engine."""
    box: list[FrameWork] = []

    def body(tokens: torch.Tensor) -> torch.Tensor:
        out, work = engine(tokens, full=full, changed=changed)
        box.append(work)
        return out

    with _blocks_replaced(engine.blocks, body):
        feats = encoder.forward_features(x)
    return feats, box[0]


def block_input(encoder: Any, x: torch.Tensor) -> torch.Tensor:
    """The tokens ``(1, N, D)`` that enter the first block for a preprocessed frame ``x`` ``(1, C, H, W)``."""
    box: list[torch.Tensor] = []

    def body(tokens: torch.Tensor) -> torch.Tensor:
        box.append(tokens.clone())
        return tokens

    with _blocks_replaced(encoder.blocks, body):
        encoder.forward_features(x)
    return box[0]


def check_supported(encoder: Any, x: torch.Tensor, *, tol: float = 1e-3) -> None:
    """Raise ValueError unless the reuse engine reproduces ``forward_features`` on ``x`` (a full frame)."""
    engine = ReuseEngine(encoder.blocks, num_prefix=encoder.layout.num_prefix, threshold=0.0)
    want = encoder.forward_features(x)
    got, _ = run_reused(encoder, engine, x, full=True)
    err = (
        ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        if got.shape == want.shape
        else float("inf")
    )
    if err > tol:
        raise ValueError(
            f"{encoder.model_id}: token reuse does not reproduce the model's blocks "
            f"(relative error {err:.2g}); it supports pre-norm ViT blocks (timm ViT/DeiT, vit4mnist)"
        )
