"""Helpers shared by the timm adapters (only models/ knows timm classes)."""

from __future__ import annotations

import math
from typing import Any

import timm

from vitedge.models.base import AttentionView, Preprocess


def attention_view(attn: Any, *, rope: bool = False) -> AttentionView:
    qkv = getattr(attn, "qkv", None)
    heads = int(attn.num_heads)
    proj = attn.proj
    head_dim = int(getattr(attn, "head_dim", 0) or proj.in_features // heads)
    return AttentionView(
        module=attn,
        num_heads=heads,
        head_dim=head_dim,
        scale=float(attn.scale),
        qkv=qkv,
        q=getattr(attn, "q_proj", None),
        k=getattr(attn, "k_proj", None),
        v=getattr(attn, "v_proj", None),
        proj=proj,
        q_norm=getattr(attn, "q_norm", None),
        k_norm=getattr(attn, "k_norm", None),
        out_norm=getattr(attn, "norm", None),
        rope=rope,
    )


def preprocess_of(model: Any) -> Preprocess:
    cfg = timm.data.resolve_data_config({}, model=model)
    # The pretrained config keeps its own size even when the model was built with img_size=; trust the model.
    h, w = (int(v) for v in model.patch_embed.img_size)
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interp = cfg.get("interpolation", "bicubic")
    return Preprocess(
        img_size=(h, w),
        in_chans=cfg["input_size"][0],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        resize=math.floor(h / crop_pct) if crop_pct < 1.0 else None,
        interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bicubic",
    )
