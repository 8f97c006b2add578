"""Architecture description that the cost model reads.

An :class:`ArchSpec` is a flat, ordered list of the matmul-type work one image causes: every linear or
convolution (as a linear over its patches) and every attention product, each with the number of token rows
it touches. It is derived from the real module shapes by the adapters in :mod:`vitedge.models`, for a given
input size, so the cost model never has to know a model class.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class LinearOp:
    """A dense projection applied to ``tokens`` rows of ``in_features`` values (per image)."""

    name: str
    tokens: int
    in_features: int
    out_features: int
    bias: bool = True
    weight: bool = True  # False for a product of two activations (token matching): no parameters

    @property
    def macs(self) -> int:
        return self.tokens * self.in_features * self.out_features

    @property
    def params(self) -> int:
        if not self.weight:
            return 0
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True, kw_only=True)
class AttnOp:
    """Scaled-dot-product attention QK^T and AV (per image).

    ``windows`` independent attention problems of ``q_tokens`` queries over ``kv_tokens`` keys each, with
    ``heads`` heads of ``head_dim`` (global attention has ``windows=1``).
    """

    name: str
    windows: int
    q_tokens: int
    kv_tokens: int
    heads: int
    head_dim: int
    fused: bool = True

    @property
    def macs(self) -> int:
        # QK^T: q x d x kv; AV: q x kv x d; per head and window.
        return 2 * self.windows * self.heads * self.q_tokens * self.kv_tokens * self.head_dim

    @property
    def score_elements(self) -> int:
        """Elements of the attention matrix, materialised only where attention is not fused."""
        return self.windows * self.heads * self.q_tokens * self.kv_tokens


def product(name: str, *, tokens: int, in_features: int, out_features: int) -> LinearOp:
    """A product of two activations (no weights, no bias): ``tokens`` rows of ``in_features`` against an
    (``in_features``, ``out_features``) activation matrix, per image."""
    return LinearOp(
        name=name, tokens=tokens, in_features=in_features, out_features=out_features, bias=False, weight=False
    )


@dataclass(frozen=True, kw_only=True)
class KernelCost:
    """What an attention kernel other than SDPA costs for one image: its matmul work (``ops``, in place of
    the block's single :class:`AttnOp`) and the elements it holds at its peak, its output included
    (``elements``; the allocations a kernel makes beyond its q, k, v inputs). Fused SDPA holds its output
    only (plus a small per-thread scratch, not counted)."""

    ops: tuple[LinearOp | AttnOp, ...]
    elements: int


@dataclass(frozen=True, kw_only=True)
class BlockTokens:
    """Tokens one block sees when a technique shrinks the sequence: ``attn_tokens`` enter the attention,
    ``mlp_tokens`` the MLP (reduction happens in between), and ``extra`` is the technique's own matmul work
    (token matching, class-token attention scores) in that block."""

    attn_tokens: int
    mlp_tokens: int
    extra: tuple[LinearOp | AttnOp, ...] = ()
    out_tokens: int | None = None  # tokens handed on, where not mlp_tokens (merged features restored)

    @property
    def tokens_out(self) -> int:
        return self.mlp_tokens if self.out_tokens is None else self.out_tokens


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """One reported layer: a patch embedding, an attention or MLP sub-block, a patch merge, or the head.

    ``in_tokens``/``in_dim`` and ``out_tokens``/``out_dim`` describe the activation entering and leaving it,
    ``hidden`` the largest intermediate it holds (qkv, MLP hidden) as elements per image, and
    ``extra_params`` parameters that no matmul owns (norms, position embeddings, class tokens).
    """

    name: str
    kind: str  # "embed" | "attn" | "mlp" | "merge" | "head"
    ops: tuple[LinearOp | AttnOp, ...]
    in_elements: int
    out_elements: int
    hidden_elements: int = 0
    extra_params: int = 0
    kernel_elements: int | None = None  # an attention kernel's own peak (KernelCost.elements); None: SDPA

    @property
    def macs(self) -> int:
        return sum(op.macs for op in self.ops)

    @property
    def params(self) -> int:
        return sum(op.params for op in self.ops if isinstance(op, LinearOp)) + self.extra_params


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """The whole encoder for one image of ``img_size``."""

    family: str  # "vit" | "swin"
    img_size: tuple[int, int]
    in_chans: int
    layers: tuple[LayerSpec, ...]
    other_params: int = 0  # parameters not attached to any reported layer
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers) + self.other_params
