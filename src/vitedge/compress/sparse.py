"""Weight sparsity (``-O sparse:n=2,m=4`` or ``-O sparse:block=16,sparsity=0.5``; the seed's 22.4.4).

- N:M: in every run of ``m`` consecutive input weights of a row, the ``n`` largest in magnitude stay
  (2:4 keeps half).
- block: the ``block`` x ``block`` tiles with the smallest L1 norm are zeroed until ``sparsity`` of each
  weight matrix is zero.

Honest note: the zeros are stored densely and run through the dense kernels, because this CPU has no sparse
GEMM that beats dense at these sparsities (2:4 acceleration is an NVIDIA Ampere feature; torch's CPU
BSR/CSR matmuls are slower than dense below ~90 % sparsity). The technique measures accuracy at a sparsity
pattern; the memory a compressed format would save is ``sparsity`` of the block Linear weights (minus
indices). The neutral setting (``n=0,m=0,block=0``) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitedge.api import register
from vitedge.compress.qlinear import is_plain_linear
from vitedge.models.base import Encoder
from vitedge.models.surgery import block_linears


@dataclass(frozen=True, kw_only=True)
class SparseConfig:
    """N:M (``n`` of every ``m`` weights kept) or block sparsity (``block`` tiles, ``sparsity`` zeroed)."""

    n: int = 0
    m: int = 0
    block: int = 0
    sparsity: float = 0.5

    def __post_init__(self) -> None:
        if (self.n or self.m) and self.block:
            raise ValueError("sparse takes either n and m (N:M) or block, not both")
        if (self.n or self.m) and not 0 < self.n < self.m:
            raise ValueError(f"sparse N:M needs 0 < n < m, got n={self.n}, m={self.m}")
        if self.block < 0:
            raise ValueError(f"sparse block must be a tile size >= 1, got {self.block}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparse sparsity is a fraction in [0, 1), got {self.sparsity}")


def n_m_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest |w| of every m consecutive inputs. w: (N, K), K % m == 0 -> bool (N, K)."""
    rows, k = w.shape
    groups = w.abs().reshape(rows, k // m, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, k)


def block_mask(w: torch.Tensor, block: int, sparsity: float) -> torch.Tensor:
    """Zero the ``sparsity`` share of block x block tiles with the smallest L1 norm.

    w: (N, K) -> bool mask (N, K).
    """
    rows, k = w.shape
    tiles = w.abs().reshape(rows // block, block, k // block, block).sum(dim=(1, 3))  # (N/b, K/b)
    drop = round(sparsity * tiles.numel())
    keep = torch.ones(tiles.numel(), dtype=torch.bool)
    keep[tiles.flatten().argsort()[:drop]] = False
    keep = keep.reshape(tiles.shape)
    return keep.repeat_interleave(block, 0).repeat_interleave(block, 1)


@register("sparse")
def _apply_sparse(model: Encoder, config: SparseConfig) -> None:
    if not (config.n or config.block):
        return
    sites = [lin for _, lin in block_linears(model) if is_plain_linear(lin)]
    if not sites:
        raise ValueError(
            f"sparse acts on float nn.Linear layers; {model.model_id} has none (or they are quantised)"
        )
    for lin in sites:
        w = lin.weight.detach()
        rows, k = w.shape
        if config.n:
            if k % config.m:
                raise ValueError(f"sparse m={config.m} does not divide the Linear input width {k}")
            mask = n_m_mask(w, config.n, config.m)
        else:
            if rows % config.block or k % config.block:
                raise ValueError(f"sparse block={config.block} does not tile a {rows}x{k} weight")
            mask = block_mask(w, config.block, config.sparsity)
        with torch.no_grad():
            lin.weight.mul_(mask)
