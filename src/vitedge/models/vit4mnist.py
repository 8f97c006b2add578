"""ViT4MNIST: the trained digit classifier of the PyTorch iOS demo app, re-implemented exactly.

Architecture (``$VITEDGE_DATA/vit4mnist/README``): 7x7 patches of a 28x28 digit -> 16 tokens, a class token,
6 pre-norm blocks of dim 64 with 8 heads of 8, MLP 128, no final norm, and an MLP head on the class token.
The attention scale is dim^-0.5 = 0.125, not head_dim^-0.5: with the latter the model loses accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open
from torch import nn

from vitedge.models._arch import vit_arch
from vitedge.models.base import AttentionView, BlockView, ModelInfo, Preprocess, SequenceEncoder, TokenLayout
from vitedge.models.spec import ArchSpec, LinearOp
from vitedge.paths import data_root


class Vit4MnistAttention(nn.Module):
    def __init__(self, dim: int, heads: int, scale: float) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scale = scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        # The original splits as "b n (qkv h d)": q, k, v are contiguous thirds, each heads x head_dim.
        q, k, v = rearrange(self.qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Vit4MnistBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, scale: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Vit4MnistAttention(dim, heads, scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Vit4Mnist(SequenceEncoder):
    def __init__(self, *, meta: dict[str, str]) -> None:
        size, patch = int(meta["image_size"]), int(meta["patch_size"])
        dim, depth, heads = int(meta["dim"]), int(meta["depth"]), int(meta["heads"])
        mlp_dim, channels, classes = int(meta["mlp_dim"]), int(meta["channels"]), int(meta["num_classes"])
        super().__init__(
            info=ModelInfo(
                model_id="vit4mnist", family="vit", source="vit4mnist", num_classes=classes, trained=True
            ),
            preprocess=Preprocess(
                img_size=(size, size),
                in_chans=channels,
                mean=(float(meta["norm_mean"]),) * channels,
                std=(float(meta["norm_std"]),) * channels,
                interpolation="bilinear",
            ),
            layout=TokenLayout(num_cls=1, grid=(size // patch, size // patch)),
        )
        self.patch_size = patch
        self.patch_embed = nn.Linear(patch * patch * channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.layout.num_tokens, dim))
        scale = float(meta["attn_scale"])
        self.blocks_ = nn.ModuleList(Vit4MnistBlock(dim, heads, mlp_dim, scale) for _ in range(depth))
        self.head = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) -> (B, N, D)
        p = self.patch_size
        x = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def block_modules(self) -> list[nn.Module]:
        return list(self.blocks_)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, classes)
        return self.head(feats[:, 0])

    @property
    def blocks(self) -> list[BlockView]:
        return [
            BlockView(
                module=b,
                norm1=b.norm1,
                attn=AttentionView(
                    module=b.attn,
                    num_heads=b.attn.num_heads,
                    head_dim=b.attn.head_dim,
                    scale=b.attn.scale,
                    qkv=b.attn.qkv,
                    q=None,
                    k=None,
                    v=None,
                    proj=b.attn.proj,
                ),
                norm2=b.norm2,
                mlp=b.mlp,
            )
            for b in self._typed_blocks()
        ]

    def _typed_blocks(self) -> list[Vit4MnistBlock]:
        return [b for b in self.blocks_ if isinstance(b, Vit4MnistBlock)]

    def arch(self, img_size: tuple[int, int] | None = None) -> ArchSpec:
        if img_size is not None and tuple(img_size) != self.img_size:
            raise ValueError(f"vit4mnist only takes {self.img_size} images, got {img_size}")
        embed = LinearOp(
            name="patch_embed",
            tokens=self.layout.num_patches,
            in_features=self.patch_embed.in_features,
            out_features=self.patch_embed.out_features,
        )
        return vit_arch(
            self,
            embed=embed,
            embed_modules=[self.patch_embed],
            head_modules=[self.head],
            head_tokens=1,
        )


_STATE_RENAMES = {
    "patch_to_embedding": "patch_embed",
    "pos_embedding": "pos_embed",
    "mlp_head": "head",
}


def _rename(key: str) -> str:
    # transformer.layers.{i}.0.fn.{norm|fn.to_qkv|fn.to_out} and .1.fn.{norm|fn.net.{0,2}}
    parts = key.split(".")
    if parts[0] == "transformer":
        i, sub = parts[2], parts[3]
        rest = ".".join(parts[5:])
        if sub == "0":
            rest = {"norm.weight": "norm1.weight", "norm.bias": "norm1.bias"}.get(rest, rest)
            rest = rest.replace("fn.to_qkv", "attn.qkv").replace("fn.to_out", "attn.proj")
        else:
            rest = {"norm.weight": "norm2.weight", "norm.bias": "norm2.bias"}.get(rest, rest)
            rest = rest.replace("fn.net", "mlp")
        return f"blocks_.{i}.{rest}"
    head, *tail = parts
    return ".".join([_STATE_RENAMES.get(head, head), *tail])


def load_vit4mnist(weights: str | Path | None = None) -> Vit4Mnist:
    """Build ViT4MNIST and load its trained weights (default: ``$VITEDGE_DATA/vit4mnist``)."""
    path = Path(weights) if weights else data_root() / "vit4mnist" / "vit4mnist.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"ViT4MNIST weights not found at {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {_rename(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if meta.get("arch") != "vit":
        raise ValueError(f"{path} does not carry ViT4MNIST metadata (arch=vit); got {meta!r}")
    model = Vit4Mnist(meta=meta)
    model.load_state_dict(state, strict=True)
    return model.eval()
