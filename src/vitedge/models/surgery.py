"""Class-aware plumbing that compression techniques call through class-agnostic functions.

Techniques see the :class:`~vitedge.models.base.Encoder` view; when they change a model's structure (replace a
Linear, drop attention heads, remove whole blocks) some concrete classes keep bookkeeping that must follow
(timm's ``Attention`` keeps ``num_heads``, ``head_dim`` and ``attn_dim``; Hugging Face attention keeps
``num_heads`` or ``num_attention_heads``). This module is the one place that knows those attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vitedge.models.base import AttentionView, Encoder

# Attention classes whose forward reshapes with the head count read from attributes we update here. Others
# either hard-code the input width (timm Eva reshapes its output to the block width) or carry per-head tables
# (Swin's relative position bias); head pruning refuses them.
_HEAD_PRUNABLE = {"Attention", "Vit4MnistAttention", "ViTAttention", "CLIPAttention", "SiglipAttention"}


def qualified_name(root: nn.Module, target: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. ``blocks_.0.attn.qkv``) with ``new``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def _weight_read_directly(root: nn.Module) -> set[int]:
    """Linears whose owner reads ``.weight`` instead of calling the module (timm Eva's fused qkv with its
    separate q/v biases calls ``F.linear(x, self.qkv.weight, bias)``); they cannot be swapped for a module."""
    out: set[int] = set()
    for m in root.modules():
        qkv = getattr(m, "qkv", None)
        fused_bias = getattr(m, "q_bias", None) is not None and not getattr(m, "qkv_bias_separate", False)
        if isinstance(qkv, nn.Linear) and fused_bias:
            out.add(id(qkv))
    return out


def block_linears(enc: Encoder) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every ``nn.Linear`` inside the encoder's transformer blocks that is called
    as a module (so it can be replaced by a drop-in)."""
    skip = _weight_read_directly(enc)
    out: list[tuple[str, nn.Linear]] = []
    for b in enc.blocks:
        prefix = qualified_name(enc, b.module)
        for name, m in b.module.named_modules():
            if isinstance(m, nn.Linear) and id(m) not in skip:
                out.append((f"{prefix}.{name}", m))
    return out


def all_linears(enc: Encoder) -> list[tuple[str, nn.Linear]]:
    """Every replaceable ``nn.Linear`` of the encoder (see :func:`block_linears`)."""
    skip = _weight_read_directly(enc)
    return [(n, m) for n, m in enc.named_modules() if isinstance(m, nn.Linear) and id(m) not in skip]


def head_pruning_refusal(attn: AttentionView) -> str | None:
    """Why heads of this attention cannot be pruned, or None when they can."""
    cls = type(attn.module).__name__
    if cls not in _HEAD_PRUNABLE:
        return (
            f"{cls} attention does not support head pruning (it reshapes by width or keeps per-head tables)"
        )
    for name in ("q_norm", "k_norm", "norm", "gate"):
        sub = getattr(attn.module, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            return f"{cls} with {name} does not support head pruning"
    return None


def _slice_linear(lin: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep rows (dim 0: outputs) or columns (dim 1: inputs) ``index`` of ``lin``, in place."""
    w = lin.weight.detach().index_select(dim, index).clone()
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.detach()[index].clone(), requires_grad=lin.bias.requires_grad)
        lin.out_features = int(index.numel())
    else:
        lin.in_features = int(index.numel())


def keep_heads(attn: AttentionView, keep: Sequence[int]) -> None:
    """Keep only heads ``keep`` (sorted indices) of an attention module; slices q/k/v and the output
    projection and updates the head bookkeeping of the concrete class.

    Raises:
        ValueError: the attention class does not support head pruning, or ``keep`` is empty/out of range.
    """
    reason = head_pruning_refusal(attn)
    if reason:
        raise ValueError(reason)
    heads, hd = attn.num_heads, attn.head_dim
    if not keep or min(keep) < 0 or max(keep) >= heads:
        raise ValueError(f"keep must name 1..{heads} heads in [0, {heads}), got {list(keep)}")
    chans = torch.tensor([h * hd + i for h in sorted(keep) for i in range(hd)], dtype=torch.long)
    if attn.qkv is not None:
        width = heads * hd
        _slice_linear(attn.qkv, torch.cat([chans + j * width for j in range(3)]), 0)
    else:
        for lin in (attn.q, attn.k, attn.v):
            assert lin is not None
            _slice_linear(lin, chans, 0)
    _slice_linear(attn.proj, chans, 1)
    m: Any = attn.module
    n = len(keep)
    for attr in ("num_heads", "num_attention_heads", "num_kv_heads"):
        if hasattr(m, attr):
            setattr(m, attr, n)
    if hasattr(m, "attn_dim"):
        m.attn_dim = n * hd
    if hasattr(m, "all_head_size"):
        m.all_head_size = n * hd


def remove_blocks(enc: Encoder, indices: Sequence[int]) -> None:
    """Remove whole transformer blocks ``indices`` (of ``enc.blocks``) from the encoder.

    Raises:
        ValueError: the model's blocks are not one flat sequence (Swin stages), or indices out of range.
    """
    views = enc.blocks
    if any(v.window is not None for v in views) or len({v.stage for v in views}) > 1:
        raise ValueError(f"{enc.model_id}: removing blocks needs one flat stack of blocks (not Swin stages)")
    if any(i < 0 or i >= len(views) for i in indices) or len(set(indices)) >= len(views):
        raise ValueError(f"cannot remove blocks {sorted(indices)} of {len(views)}")
    doomed = {id(views[i].module) for i in indices}
    parent_name = qualified_name(enc, views[0].module).rpartition(".")[0]
    parent = enc.get_submodule(parent_name)
    if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
        raise ValueError(f"{enc.model_id}: blocks are not held in a list; cannot remove them")
    kept = [m for m in parent if id(m) not in doomed]
    new = nn.Sequential(*kept) if isinstance(parent, nn.Sequential) else nn.ModuleList(kept)
    replace_module(enc, parent_name, new)
    config = getattr(getattr(enc, "model", None), "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(kept)
