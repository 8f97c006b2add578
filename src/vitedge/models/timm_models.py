"""Adapters for timm's ViT-family encoders: VisionTransformer (CLIP, SigLIP, register tokens), DeiT
(distilled), EVA/EVA-02 (rotary embeddings, SwiGLU) and Swin (windowed attention, patch merging)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from vitedge.models._arch import linear_ops, param_count, vit_arch
from vitedge.models.base import (
    AttentionView,
    BlockView,
    Encoder,
    ModelInfo,
    Preprocess,
    SequenceEncoder,
    TokenLayout,
)
from vitedge.models.spec import ArchSpec, AttnOp, LayerSpec, LinearOp

_VIT_CLASSES = ("VisionTransformer", "VisionTransformerDistilled", "Eva")
_SWIN_CLASSES = ("SwinTransformer",)
_BLOCK_PARTS = ("norm1", "attn", "norm2", "mlp")


def _attention_view(attn: Any, *, rope: bool = False) -> AttentionView:
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


def _preprocess(model: Any) -> Preprocess:
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


class TimmVit(SequenceEncoder):
    """timm VisionTransformer / VisionTransformerDistilled / Eva behind the Encoder view."""

    def __init__(self, model: Any, *, model_id: str) -> None:
        odd = {type(b).__name__ for b in model.blocks if not all(hasattr(b, a) for a in _BLOCK_PARTS)}
        if odd:
            raise ValueError(
                f"{model_id} uses {', '.join(sorted(odd))} blocks; vitedge supports pre-norm blocks with "
                "separate attention and MLP (norm1, attn, norm2, mlp)"
            )
        grid = tuple(model.patch_embed.grid_size)
        num_reg = int(getattr(model, "num_reg_tokens", 0) or 0)
        num_dist = 1 if getattr(model, "dist_token", None) is not None else 0
        num_prefix = int(model.num_prefix_tokens)
        super().__init__(
            info=ModelInfo(
                model_id=model_id,
                family="vit",
                source="timm",
                num_classes=int(model.num_classes),
                trained=False,
                extra={"timm_class": type(model).__name__, "global_pool": model.global_pool},
            ),
            preprocess=_preprocess(model),
            layout=TokenLayout(
                num_cls=num_prefix - num_reg - num_dist, num_dist=num_dist, num_reg=num_reg, grid=grid
            ),
        )
        self.model = model

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # The same steps as timm's forward_features up to the blocks (VisionTransformer and Eva alike).
        m = self.model
        x = m.patch_embed(x)
        if type(m).__name__ == "Eva":
            # Eva's _pos_embed also returns the rotary embedding (per block when rope_mixed).
            x, rope = m._pos_embed(x)
            blocks = list(m.blocks)
            mixed = getattr(m, "rope_mixed", False) and rope is not None
            self._rope_by_block = {id(b): (rope[i] if mixed else rope) for i, b in enumerate(blocks)}
            return m.norm_pre(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def block_modules(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def call_block(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        ropes = getattr(self, "_rope_by_block", None)
        return module(x, rope=ropes.get(id(module))) if ropes is not None else module(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(feats)

    def set_distilled_training(self, enable: bool) -> bool:
        if not self.layout.num_dist or not hasattr(self.model, "set_distilled_training"):
            return False
        self.model.set_distilled_training(enable)
        return True

    @property
    def blocks(self) -> list[BlockView]:
        rope = getattr(self.model, "rope", None) is not None
        return [
            BlockView(
                module=b,
                norm1=b.norm1,
                attn=_attention_view(b.attn, rope=rope),
                norm2=b.norm2,
                mlp=b.mlp,
                ls1=getattr(b, "ls1", None) or nn.Identity(),
                ls2=getattr(b, "ls2", None) or nn.Identity(),
            )
            for b in self.model.blocks
        ]

    def arch(self, img_size: tuple[int, int] | None = None) -> ArchSpec:
        if img_size is not None and tuple(img_size) != self.img_size:
            raise ValueError(
                f"{self.model_id} is built for {self.img_size}; load it with img_size={img_size}"
            )
        m = self.model
        proj = m.patch_embed.proj
        embed = LinearOp(
            name="patch_embed",
            tokens=self.layout.num_patches,
            in_features=proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1],
            out_features=proj.out_channels,
            bias=proj.bias is not None,
        )
        head_modules: list[nn.Module] = [m.head] + ([m.head_dist] if hasattr(m, "head_dist") else [])
        extra: tuple[LinearOp | AttnOp, ...] = ()
        pool = getattr(m, "attn_pool", None)
        if pool is not None:
            extra = self._attn_pool_ops(pool)
        return vit_arch(
            self,
            embed=embed,
            embed_modules=[m.patch_embed],
            head_modules=[*head_modules, *([pool] if pool is not None else [])],
            head_tokens=1,
            extra_head_ops=extra,
        )

    def _attn_pool_ops(self, pool: Any) -> tuple[LinearOp | AttnOp, ...]:
        """Ops of timm's AttentionPoolLatent (MAP head): latent queries attend over all tokens."""
        latent = int(pool.latent_len)
        n = self.final_token_count()
        ops: list[LinearOp | AttnOp] = [*linear_ops("attn_pool.kv", pool.kv, n)]
        for name in ("q", "proj"):
            ops += linear_ops(f"attn_pool.{name}", getattr(pool, name), latent)
        ops += linear_ops("attn_pool.mlp", pool.mlp, latent)
        ops.append(
            AttnOp(
                name="attn_pool.sdpa",
                windows=1,
                q_tokens=latent,
                kv_tokens=n,
                heads=int(pool.num_heads),
                head_dim=int(pool.head_dim),
            )
        )
        return tuple(ops)


class TimmSwin(Encoder):
    """timm SwinTransformer behind the Encoder view; ``forward_features`` flattens tokens to (B, N, C)."""

    def __init__(self, model: Any, *, model_id: str) -> None:
        super().__init__(
            info=ModelInfo(
                model_id=model_id,
                family="swin",
                source="timm",
                num_classes=int(model.num_classes),
                trained=False,
                extra={"timm_class": type(model).__name__},
            ),
            preprocess=_preprocess(model),
            layout=TokenLayout(num_cls=0, grid=tuple(model.patch_embed.grid_size)),
        )
        self.model = model
        self.final_grid = tuple(model.layers[-1].output_resolution)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"{self.model_id} was built for {self.img_size} images, got {tuple(x.shape[-2:])}; "
                "load it with img_size= (CLI: --img-size)"
            )
        feats = self.model.forward_features(x)  # (B, H, W, C)
        return feats.flatten(1, 2)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        b, _, c = feats.shape
        return self.model.forward_head(feats.reshape(b, *self.final_grid, c))

    @property
    def blocks(self) -> list[BlockView]:
        views = []
        for s, stage in enumerate(self.model.layers):
            for b in stage.blocks:
                views.append(
                    BlockView(
                        module=b,
                        norm1=b.norm1,
                        attn=_attention_view(b.attn),
                        norm2=b.norm2,
                        mlp=b.mlp,
                        stage=s,
                        window=tuple(b.window_size),
                        shift=int(b.shift_size[0]),
                    )
                )
        return views

    def arch(self, img_size: tuple[int, int] | None = None) -> ArchSpec:
        if img_size is not None and tuple(img_size) != self.img_size:
            raise ValueError(
                f"{self.model_id} is built for {self.img_size}; load it with img_size={img_size}"
            )
        m = self.model
        proj = m.patch_embed.proj
        gh, gw = self.layout.grid
        embed = LinearOp(
            name="patch_embed",
            tokens=gh * gw,
            in_features=proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1],
            out_features=proj.out_channels,
        )
        h, w = self.img_size
        layers = [
            LayerSpec(
                name="patch_embed",
                kind="embed",
                ops=(embed,),
                in_elements=self.preprocess.in_chans * h * w,
                out_elements=gh * gw * embed.out_features,
                hidden_elements=embed.tokens * embed.in_features,
                extra_params=param_count([m.patch_embed]) - embed.params,
            )
        ]
        for s, stage in enumerate(m.layers):
            layers += _swin_stage_layers(s, stage)
        fh, fw = self.final_grid
        head_ops = linear_ops("head", m.head, 1)
        if head_ops:
            layers.append(
                LayerSpec(
                    name="head",
                    kind="head",
                    ops=tuple(head_ops),
                    in_elements=fh * fw * m.num_features,
                    out_elements=head_ops[-1].out_features,
                    extra_params=param_count([m.head]) - sum(op.params for op in head_ops),
                )
            )
        spec = ArchSpec(
            family="swin", img_size=(h, w), in_chans=self.preprocess.in_chans, layers=tuple(layers)
        )
        return ArchSpec(
            family="swin",
            img_size=(h, w),
            in_chans=self.preprocess.in_chans,
            layers=tuple(layers),
            other_params=param_count([m]) - spec.params,
        )


def _swin_stage_layers(s: int, stage: Any) -> list[LayerSpec]:
    layers: list[LayerSpec] = []
    in_h, in_w = stage.input_resolution
    h, w = stage.output_resolution
    ds = stage.downsample
    if not isinstance(ds, nn.Identity):
        ops = linear_ops(f"layers.{s}.downsample", ds, h * w)
        layers.append(
            LayerSpec(
                name=f"layers.{s}.downsample",
                kind="merge",
                ops=tuple(ops),
                in_elements=in_h * in_w * ops[0].in_features // 4,
                out_elements=h * w * ops[0].out_features,
                hidden_elements=h * w * ops[0].in_features,
                extra_params=param_count([ds]) - sum(op.params for op in ops),
            )
        )
    for j, b in enumerate(stage.blocks):
        wh, ww = b.window_size
        hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
        windows = (hp // wh) * (wp // ww)
        a = _attention_view(b.attn)
        name = f"layers.{s}.blocks.{j}"
        attn_lin = linear_ops(f"{name}.attn", b.attn, hp * wp)
        attn_ops: tuple[LinearOp | AttnOp, ...] = (
            *attn_lin,
            AttnOp(
                name=f"{name}.attn.sdpa",
                windows=windows,
                q_tokens=wh * ww,
                kv_tokens=wh * ww,
                heads=a.num_heads,
                head_dim=a.head_dim,
                fused=bool(getattr(b.attn, "fused_attn", False)),
            ),
        )
        dim = b.dim
        layers.append(
            LayerSpec(
                name=f"{name}.attn",
                kind="attn",
                ops=attn_ops,
                in_elements=h * w * dim,
                out_elements=h * w * dim,
                hidden_elements=hp * wp * attn_lin[0].out_features,
                extra_params=param_count([b.norm1, b.attn]) - sum(op.params for op in attn_lin),
            )
        )
        mlp_lin = linear_ops(f"{name}.mlp", b.mlp, h * w)
        layers.append(
            LayerSpec(
                name=f"{name}.mlp",
                kind="mlp",
                ops=tuple(mlp_lin),
                in_elements=h * w * dim,
                out_elements=h * w * dim,
                hidden_elements=h * w * max(op.out_features for op in mlp_lin),
                extra_params=param_count([b.norm2, b.mlp]) - sum(op.params for op in mlp_lin),
            )
        )
    return layers


def create_timm(name: str, *, weights: str | Path | None = None, img_size: int | None = None) -> Encoder:
    """Build ``timm:<name>`` with random weights (or local ``weights``) behind the Encoder view."""
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint}")
    kwargs: dict[str, Any] = {"img_size": img_size} if img_size else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ValueError(f"timm:{name} cannot be built with {kwargs}: {e}") from None
    cls = type(model).__name__
    if cls in _VIT_CLASSES:
        enc: Encoder = TimmVit(model, model_id=f"timm:{name}")
    elif cls in _SWIN_CLASSES:
        enc = TimmSwin(model, model_id=f"timm:{name}")
    else:
        raise ValueError(
            f"timm:{name} is a {cls}; vitedge supports ViT-family encoders "
            f"({', '.join(_VIT_CLASSES + _SWIN_CLASSES)})"
        )
    if weights is not None:
        load_weights(enc.model, weights)
        enc.info = type(enc.info)(**{**enc.info.__dict__, "trained": True})
    return enc.eval()


def load_weights(model: Any, path: str | Path, *, derived: tuple[str, ...] = ()) -> None:
    """Load a safetensors state dict strictly; a mismatch names the offending keys.

    Keys ending in one of ``derived`` (buffers computed from the architecture, which some timm versions
    save and others do not) may be absent from the file or extra in it; the model keeps its own values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"weights must be a .safetensors file (no pickle), got {path.name}")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    own = model.state_dict()
    if derived:
        state = {k: v for k, v in state.items() if k in own or not k.endswith(derived)}
        state.update({k: v for k, v in own.items() if k not in state and k.endswith(derived)})
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(
            f"{path.name} does not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatch {bad_shapes[:5]}"
        )
    model.load_state_dict(state, strict=True)
