"""Adapters for Hugging Face vision encoders: ViTModel, CLIPVisionModel and SiglipVisionModel, built from
their default configs (random weights) or loaded from a local model directory. ``forward`` returns the pooled
features (``pooler_output``) the VLM projector would consume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers as T
from torch import nn

from vitedge.models._arch import vit_arch
from vitedge.models.base import (
    AttentionView,
    BlockView,
    Encoder,
    ModelInfo,
    Preprocess,
    SequenceEncoder,
    TokenLayout,
)
from vitedge.models.spec import ArchSpec, AttnOp, LinearOp

_BUILTIN = {
    "vit": (T.ViTModel, T.ViTConfig, T.ViTImageProcessor),
    "clip-vision": (T.CLIPVisionModel, T.CLIPVisionConfig, T.CLIPImageProcessor),
    "siglip-vision": (T.SiglipVisionModel, T.SiglipVisionConfig, T.SiglipImageProcessor),
}
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _first(module: Any, *names: str) -> Any:
    for n in names:
        if hasattr(module, n):
            return getattr(module, n)
    raise ValueError(f"{type(module).__name__} has none of {names}; not a supported ViT-style layer")


def _size(value: Any) -> dict[str, Any]:
    return (
        dict(value)
        if isinstance(value, dict)
        else {k: getattr(value, k, None) for k in ("height", "width", "shortest_edge")}
    )


def preprocess_from_processor(proc: dict[str, Any], image_size: int) -> Preprocess:
    """Preprocess from an HF image-processor config (``preprocessor_config.json`` keys)."""
    size = _size(proc.get("size") or {"height": image_size, "width": image_size})
    crop = _size(proc["crop_size"]) if proc.get("crop_size") and proc.get("do_center_crop", False) else None
    if crop:
        hw = (int(crop["height"]), int(crop["width"]))
        resize = int(size.get("shortest_edge") or size.get("height") or hw[0])
    else:
        side = size.get("shortest_edge") or image_size
        hw = (int(size.get("height") or side), int(size.get("width") or side))
        resize = None
    resample = proc.get("resample", 3)
    return Preprocess(
        img_size=hw,
        in_chans=3,
        mean=tuple(float(v) for v in proc.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(float(v) for v in proc.get("image_std", (0.5, 0.5, 0.5))),
        resize=resize,
        interpolation=_RESAMPLE.get(int(resample) if resample is not None else 3, "bicubic"),
    )


class HfVision(SequenceEncoder):
    """A Hugging Face ViT / CLIP / SigLIP vision model behind the Encoder view."""

    def __init__(self, model: Any, *, model_id: str, preprocess: Preprocess) -> None:
        inner = getattr(model, "vision_model", model)
        cfg = model.config
        grid = (cfg.image_size // cfg.patch_size,) * 2
        kind = cfg.model_type
        num_cls = 0 if kind.startswith("siglip") else 1
        super().__init__(
            info=ModelInfo(
                model_id=model_id,
                family="vit",
                source="hf",
                num_classes=0,
                trained=False,
                extra={"hf_class": type(model).__name__, "model_type": kind},
            ),
            preprocess=preprocess.with_img_size(cfg.image_size)
            if preprocess.img_size[0] != cfg.image_size
            else preprocess,
            layout=TokenLayout(num_cls=num_cls, grid=grid),
        )
        self.model = model
        self.inner = inner
        self.kind = kind

    @property
    def _layers(self) -> nn.ModuleList:
        inner = self.inner
        if hasattr(inner, "layers"):
            return inner.layers
        return _first(inner.encoder, "layers", "layer")

    # The stages run by hand: calling the inner model would also run its pooler/head, which forward_head
    # runs again (SigLIP's attention-pooling head costs 0.47 GFLOPs per image).
    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D)
        h = self.inner.embeddings(x)
        return self.inner.pre_layrnorm(h) if self.kind.startswith("clip") else h

    def block_modules(self) -> list[nn.Module]:
        return list(self._layers)

    def call_block(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = module(x, None)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind.startswith("clip"):  # CLIP normalises only the pooled class token (forward_head)
            return x
        norm = getattr(self.inner, "layernorm", None) or getattr(self.inner, "post_layernorm", None)
        return norm(x) if norm is not None else x

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, D)
        inner = self.inner
        if self.kind.startswith("siglip"):
            return inner.head(feats) if getattr(inner, "use_head", True) else feats.mean(1)
        if self.kind.startswith("clip"):
            return inner.post_layernorm(feats[:, 0])
        pooler = getattr(inner, "pooler", None)
        return pooler(feats) if pooler is not None else feats[:, 0]

    @property
    def blocks(self) -> list[BlockView]:
        views = []
        for layer in self._layers:
            attn = _first(layer, "self_attn", "attention")
            heads = int(_first(attn, "num_heads", "num_attention_heads"))
            views.append(
                BlockView(
                    module=layer,
                    norm1=_first(layer, "layer_norm1", "layernorm_before"),
                    attn=AttentionView(
                        module=attn,
                        num_heads=heads,
                        head_dim=int(attn.head_dim),
                        scale=float(_first(attn, "scale", "scaling")),
                        qkv=None,
                        q=attn.q_proj,
                        k=attn.k_proj,
                        v=attn.v_proj,
                        proj=_first(attn, "out_proj", "o_proj"),
                    ),
                    norm2=_first(layer, "layer_norm2", "layernorm_after"),
                    mlp=_first(layer, "mlp"),
                )
            )
        return views

    def arch(self, img_size: tuple[int, int] | None = None) -> ArchSpec:
        if img_size is not None and tuple(img_size) != self.img_size:
            raise ValueError(f"{self.model_id} takes {self.img_size} images only")
        conv = next(m for m in self.inner.embeddings.modules() if isinstance(m, nn.Conv2d))
        embed = LinearOp(
            name="patch_embed",
            tokens=self.layout.num_patches,
            in_features=conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1],
            out_features=conv.out_channels,
            bias=conv.bias is not None,
        )
        head_modules: list[nn.Module] = []
        extra: tuple[LinearOp | AttnOp, ...] = ()
        pooler = getattr(self.inner, "pooler", None)
        if pooler is not None:
            head_modules.append(pooler)
        head = getattr(self.inner, "head", None)
        if self.kind.startswith("siglip") and head is not None and getattr(self.inner, "use_head", True):
            head_modules.append(head)
            extra = self._map_head_ops(head)
        return vit_arch(
            self,
            embed=embed,
            embed_modules=[self.inner.embeddings],
            head_modules=head_modules,
            head_tokens=1,
            extra_head_ops=extra,
        )

    def _map_head_ops(self, head: Any) -> tuple[LinearOp | AttnOp, ...]:
        """SigLIP's attention-pooling head: nn.MultiheadAttention keeps q/k/v in one packed weight."""
        mha = head.attention
        d = mha.embed_dim
        n = self.final_token_count()
        probes = head.probe.shape[1]
        return (
            LinearOp(name="head.attention.q", tokens=probes, in_features=d, out_features=d),
            LinearOp(name="head.attention.kv", tokens=n, in_features=d, out_features=2 * d),
            AttnOp(
                name="head.attention.sdpa",
                windows=1,
                q_tokens=probes,
                kv_tokens=n,
                heads=mha.num_heads,
                head_dim=d // mha.num_heads,
            ),
        )


def create_hf(name: str) -> Encoder:
    """``hf:vit``, ``hf:clip-vision``, ``hf:siglip-vision`` (default configs) or ``hf:<dir>``."""
    if name in _BUILTIN:
        model_cls, cfg_cls, proc_cls = _BUILTIN[name]
        model = model_cls(cfg_cls())
        proc = proc_cls().to_dict()
        pre = preprocess_from_processor(proc, model.config.image_size)
        return HfVision(model, model_id=f"hf:{name}", preprocess=pre).eval()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"hf:{name} is neither a built-in ({', '.join('hf:' + k for k in _BUILTIN)}) "
            "nor a model directory"
        )
    return _load_dir(path)


def _load_dir(path: Path) -> Encoder:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} has no config.json; not a Hugging Face model directory")
    model_type = json.loads(cfg_file.read_text()).get("model_type", "")
    loaders: dict[str, Any] = {
        "vit": T.ViTModel,
        "clip_vision_model": T.CLIPVisionModel,
        "clip": T.CLIPVisionModel,
        "siglip_vision_model": T.SiglipVisionModel,
        "siglip": T.SiglipVisionModel,
    }
    if model_type not in loaders:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (one of {sorted(loaders)})")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path} has no .safetensors weights; vitedge loads no pickled checkpoints (.bin)")
    model = loaders[model_type].from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    proc_file = path / "preprocessor_config.json"
    proc = json.loads(proc_file.read_text()) if proc_file.is_file() else {}
    pre = preprocess_from_processor(proc, model.config.image_size)
    enc = HfVision(model, model_id=f"hf:{path}", preprocess=pre)
    enc.info = ModelInfo(**{**enc.info.__dict__, "trained": True})
    return enc.eval()
