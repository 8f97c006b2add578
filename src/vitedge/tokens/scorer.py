"""The learned token scorer of ``-O prune:scorer=learned``: one small MLP per pruning block.

Each MLP follows DynamicViT's predictor, reduced to one output: every patch token, concatenated with the
size-weighted mean of the patch tokens (the image context), goes through ``LayerNorm(2D) -> Linear(2D, D/4)
-> GELU -> Linear(D/4, 1)``. Its output is a *residual on the attention score*: the token's score is
``log(a) + mlp([x, mean])`` with ``a`` what the ``attn`` scorer uses (class-token attention, or the mean
attention a token receives in models without a class token). The last linear starts at zero, so an untrained
scorer ranks tokens exactly as ``attn`` does, and the dropped tokens are fused with weights ``softmax(log a)
= a / sum(a)``, EViT's attention-weighted fusion (``attn`` fuses with ``softmax(a)``, nearly uniform; so from
the second pruning block on the two can keep different tokens: on cifar-vit at keep 0.7, 80.65 % against
80.75 % top-1 on 2,000 CIFAR-10 test images).

Learning through a hard top-k: the selection is the same hard top-k in train and eval mode, so a train-mode
forward computes exactly what inference computes. The scores get their gradient through the fused token:
it averages the dropped tokens with weights ``softmax(s)`` over them, so ``dL/ds_d = w_d <dL/dfused, x_d -
fused>`` says whether dropped token ``d`` deserves more weight; tokens that carry information the loss wants
have their scores raised, and the MLP generalises that to the tokens it has yet to rank. These gradients sum
to zero over each image's dropped tokens, so the scores cannot drift as a whole. (A straight-through factor
``sigmoid(s) / sigmoid(s).detach()`` on the kept tokens, DynamicViT's device, was tried first and dropped:
on cifar-vit it pushed every kept token's score down, by 25 in log space after one epoch, left the
residual anti-correlated with the attention, and cost 2.4 points of top-1 against the untrained scorer.)
Hence ``prune:scorer=learned`` needs ``fuse=true``. Measured so far, this signal teaches fusion more than
selection: one epoch on 10,000 CIFAR-10 images (backbone frozen, KD from the unpruned model) left the
residual anti-correlated with the attention (-0.5 at the first pruning block) and top-1 at 79.45 %, below
``attn``'s 80.75 %. Learning the selection itself needs a train-mode forward that sees the dropped tokens
(DynamicViT's attention masking with Gumbel noise), which this module does not do.

The attention prior is detached: the MLP is the only thing that learns to score (the attention itself
learns from the task path, if it trains at all). The :class:`TokenScorers` module carries a ``trained``
buffer, set when a gradient first reaches its scores; it is saved with the weights, and an eval forward
with a scorer that was never trained logs a warning once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class TokenScorer(nn.Module):
    """``[token, image mean] -> LayerNorm -> Linear(2D, h) -> GELU -> Linear(h, 1)``; the last starts at 0."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.fc1 = nn.Linear(2 * dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.trunc_normal_(self.fc1.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)  # untrained: a zero residual, so the attention prior decides
        nn.init.zeros_(self.fc2.bias)

    def forward(self, patches: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        """Residual scores (B, Np) of ``patches`` (B, Np, D) that stand for ``size`` (B, Np, 1) patches."""
        return self.fc2(self.act(self.fc1(self.norm(with_context(patches, size))))).squeeze(-1)


def with_context(patches: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """(B, Np, 2D): each patch token beside the size-weighted mean of all of them."""
    if size is None:
        mean = patches.mean(1, keepdim=True)
    else:
        w = size.to(patches.dtype)
        mean = (patches * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    return torch.cat([patches, mean.expand_as(patches)], dim=-1)


class TokenScorers(nn.Module):
    """The scorer MLPs of one pruned encoder (one per pruning block, in order) and a ``trained`` flag."""

    trained: torch.Tensor

    def __init__(self, dim: int, count: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or scorer_hidden(dim)
        self.mlps = nn.ModuleList(TokenScorer(dim, hidden) for _ in range(count))
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool))
        self._warned = False

    def scores(
        self, j: int, prior: torch.Tensor, patches: torch.Tensor, size: torch.Tensor | None, *, training: bool
    ) -> torch.Tensor:
        """Scores (B, Np) at the ``j``-th pruning block: ``log(prior) + mlp_j(patches)``.

        Args:
            j: which pruning block (0 for the first).
            prior: (B, Np) the attention scores of the patch tokens (probabilities).
            patches: (B, Np, D) the patch tokens after the block's attention.
            size: (B, Np, 1) patches each token stands for, or None while all are 1.
            training: the encoder is in train mode: mark the scorer trained once a gradient reaches it;
                in eval mode, warn (once) if it never was.
        """
        s = learned_scores(prior, self.mlps[j](patches, size))
        if training:
            if s.requires_grad:
                s.register_hook(self._mark_trained)
        elif not self._warned and not bool(self.trained):  # reads the flag until the first warning only
            self._warned = True
            log.warning(
                "prune:scorer=learned runs with scorer MLPs that were never trained: it ranks tokens like "
                "scorer=attn; train them first (vitedge train MODEL -O prune:...,scorer=learned "
                "--train-only token_scorers) and load the trained model directory"
            )
        return s

    def _mark_trained(self, grad: torch.Tensor) -> None:
        self.trained.fill_(True)


def learned_scores(prior: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """(B, Np) float32 scores ``log(prior) + residual``; the attention prior (B, Np) carries no gradient."""
    tiny = torch.finfo(torch.float32).tiny
    return prior.detach().float().clamp_min(tiny).log() + residual.float()


def scorer_hidden(dim: int) -> int:
    """Hidden width of a scorer MLP for tokens of width ``dim``."""
    return max(1, dim // 4)
