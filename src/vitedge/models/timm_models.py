"""Adapters for timm's ViT-family encoders: VisionTransformer (CLIP, SigLIP, register tokens), DeiT
(distilled), EVA/EVA-02 (rotary embeddings, SwiGLU) and Swin (windowed attention, patch merging)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from vitedge.models._arch import linear_ops, vit_arch
from vitedge.models._timm_common import attention_view, preprocess_of
from vitedge.models.base import (
    BlockView,
    Encoder,
    ModelInfo,
    SequenceEncoder,
    TokenLayout,
)
from vitedge.models.spec import ArchSpec, AttnOp, LinearOp
from vitedge.models.swin import TimmSwin

_VIT_CLASSES = ("VisionTransformer", "VisionTransformerDistilled", "Eva")
_SWIN_CLASSES = ("SwinTransformer",)
_BLOCK_PARTS = ("norm1", "attn", "norm2", "mlp")


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
            preprocess=preprocess_of(model),
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
                attn=attention_view(b.attn, rope=rope),
                norm2=b.norm2,
                mlp=b.mlp,
                ls1=getattr(b, "ls1", None) or nn.Identity(),
                ls2=getattr(b, "ls2", None) or nn.Identity(),
                drop1=getattr(b, "drop_path1", None) or nn.Identity(),
                drop2=getattr(b, "drop_path2", None) or nn.Identity(),
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
