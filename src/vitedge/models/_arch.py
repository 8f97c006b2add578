"""Build an :class:`ArchSpec` from real module shapes (shared by the ViT-family adapters)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from vitedge.attention.batched import short_enough
from vitedge.models.base import Encoder, SequenceEncoder
from vitedge.models.spec import ArchSpec, AttnOp, BlockTokens, KernelCost, LayerSpec, LinearOp


def param_count(modules: Iterable[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def linear_ops(prefix: str, module: nn.Module, tokens: int) -> list[LinearOp]:
    """Every nn.Linear under ``module`` applied to ``tokens`` rows."""
    return [
        LinearOp(
            name=f"{prefix}.{name}" if name else prefix,
            tokens=tokens,
            in_features=m.in_features,
            out_features=m.out_features,
            bias=m.bias is not None,
        )
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
    ]


def _linear_params(ops: Iterable[LinearOp | AttnOp]) -> int:
    return sum(op.params for op in ops if isinstance(op, LinearOp))


def global_block_layers(
    enc: Encoder,
    *,
    tokens: int,
    dim: int,
    prefix: str = "blocks",
    fused: bool = True,
    plan: list[BlockTokens] | None = None,
    kernels: list[Any] | None = None,
) -> list[LayerSpec]:
    """Attention and MLP layers of global-attention blocks of width ``dim``.

    Every block sees ``tokens`` tokens unless ``plan`` (from a token-reducing technique) says otherwise;
    a block whose ``kernels`` entry (the execution plan's attention step) has a ``cost`` method costs that
    kernel instead of SDPA.
    """
    layers: list[LayerSpec] = []
    for i, b in enumerate(enc.blocks):
        step = plan[i] if plan is not None else BlockTokens(attn_tokens=tokens, mlp_tokens=tokens)
        n, m = step.attn_tokens, step.mlp_tokens
        a = b.attn
        attn_lin = linear_ops(f"{prefix}.{i}.attn", a.module, n)
        qkv_width = sum(op.out_features for op in attn_lin) - a.proj.out_features
        kernel = kernels[i] if kernels is not None else None
        custom: KernelCost | None = None
        if kernel is not None and hasattr(kernel, "cost"):
            custom = kernel.cost(name=f"{prefix}.{i}.attn", tokens=n, heads=a.num_heads, head_dim=a.head_dim)
        attn: tuple[LinearOp | AttnOp, ...] = (
            custom.ops
            if custom is not None
            else (
                AttnOp(
                    name=f"{prefix}.{i}.attn.sdpa",
                    windows=1,
                    q_tokens=n,
                    kv_tokens=n,
                    heads=a.num_heads,
                    head_dim=a.head_dim,
                    # the token runner (plan given) stores the scores of short sequences (batched products)
                    fused=fused if plan is None else not short_enough(n),
                ),
            )
        )
        ops: tuple[LinearOp | AttnOp, ...] = (*attn_lin, *attn, *step.extra)
        layers.append(
            LayerSpec(
                name=f"{prefix}.{i}.attn",
                kind="attn",
                ops=ops,
                in_elements=n * dim,
                out_elements=m * dim,
                hidden_elements=n * qkv_width,
                extra_params=param_count([b.norm1, a.module]) - _linear_params(ops),
                kernel_elements=None if custom is None else custom.elements,
            )
        )
        mlp_lin = linear_ops(f"{prefix}.{i}.mlp", b.mlp, m)
        hidden = max(op.out_features for op in mlp_lin)
        layers.append(
            LayerSpec(
                name=f"{prefix}.{i}.mlp",
                kind="mlp",
                ops=tuple(mlp_lin),
                in_elements=m * dim,
                out_elements=m * dim,
                hidden_elements=m * hidden,
                extra_params=param_count([b.norm2, b.mlp]) - _linear_params(mlp_lin),
            )
        )
    return layers


def vit_arch(
    enc: Encoder,
    *,
    embed: LinearOp,
    embed_modules: list[nn.Module],
    head_modules: list[nn.Module],
    head_tokens: int,
    extra_head_ops: tuple[LinearOp | AttnOp, ...] = (),
    fused: bool = True,
) -> ArchSpec:
    """ArchSpec for a ViT-style encoder: patch embedding, global-attention blocks, head.

    ``head_tokens`` is how many token rows the head's linears see per image (1 for a class-token or pooled
    head). Parameters outside every layer (position embeddings, class tokens, final norm) are reported as
    ``other_params``.
    """
    h, w = enc.img_size
    tokens = enc.layout.num_tokens
    dim = embed.out_features
    embed_extra = param_count(embed_modules) - embed.params
    layers = [
        LayerSpec(
            name="patch_embed",
            kind="embed",
            ops=(embed,),
            in_elements=enc.preprocess.in_chans * h * w,
            out_elements=tokens * dim,
            hidden_elements=embed.tokens * embed.in_features,
            extra_params=embed_extra,
        )
    ]
    plan = enc.plan.block_tokens(enc) if isinstance(enc, SequenceEncoder) and enc.plan is not None else None
    kernels = [b.attention for b in enc.plan.blocks] if enc.plan is not None else None
    layers += global_block_layers(enc, tokens=tokens, dim=dim, fused=fused, plan=plan, kernels=kernels)
    final_tokens = plan[-1].tokens_out if plan else tokens
    head_ops: list[LinearOp | AttnOp] = []
    for m in head_modules:
        head_ops += linear_ops("head", m, head_tokens)
    head_ops += list(extra_head_ops)
    if head_ops:
        out = max(op.out_features for op in head_ops if isinstance(op, LinearOp))
        layers.append(
            LayerSpec(
                name="head",
                kind="head",
                ops=tuple(head_ops),
                in_elements=final_tokens * dim,
                out_elements=head_tokens * out,
                extra_params=param_count(head_modules) - _linear_params(head_ops),
            )
        )
    spec = ArchSpec(family="vit", img_size=(h, w), in_chans=enc.preprocess.in_chans, layers=tuple(layers))
    other = param_count([enc]) - spec.params
    return ArchSpec(
        family="vit",
        img_size=(h, w),
        in_chans=enc.preprocess.in_chans,
        layers=tuple(layers),
        other_params=other,
    )
