"""The Encoder view: one interface over ViT4MNIST, timm and Hugging Face vision encoders.

Techniques (token merging, pruning, early exit, quantisation) and the measurement code see only this view:
patch embedding, a list of blocks (each with its attention and MLP), the token layout (class, distillation
and register tokens, grid size), the head, the preprocessing the weights expect, and an :class:`ArchSpec`
for the cost model. Concrete model classes are known only to the adapters in this package.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from vitedge.models.spec import ArchSpec, BlockTokens


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    """How raw images become the tensor a model expects.

    Images are converted to ``in_chans`` channels, resized (short side to ``resize`` then centre-cropped
    to ``img_size``; or straight to ``img_size`` when ``resize`` is None), scaled to [0, 1] and normalised
    with ``mean``/``std``.
    """

    img_size: tuple[int, int]
    in_chans: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    resize: int | None = None
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values, got {self.mean} and {self.std}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(
                f"interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}"
            )

    def with_img_size(self, size: int | tuple[int, int]) -> Preprocess:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        resize = None if self.resize is None else round(self.resize * hw[0] / self.img_size[0])
        return Preprocess(
            img_size=(int(hw[0]), int(hw[1])),
            in_chans=self.in_chans,
            mean=self.mean,
            std=self.std,
            resize=resize,
            interpolation=self.interpolation,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class TokenLayout:
    """Where tokens sit in the sequence: prefix tokens first, then the patch grid in row-major order."""

    num_cls: int = 1
    num_dist: int = 0
    num_reg: int = 0
    grid: tuple[int, int] = (14, 14)

    @property
    def num_prefix(self) -> int:
        return self.num_cls + self.num_dist + self.num_reg

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches


@dataclass(eq=False, kw_only=True)
class AttentionView:
    """Handles on one attention module. ``qkv`` is a fused projection or None where q, k, v are separate."""

    module: nn.Module
    num_heads: int
    head_dim: int
    scale: float
    qkv: nn.Linear | None
    q: nn.Linear | None
    k: nn.Linear | None
    v: nn.Linear | None
    proj: nn.Linear
    q_norm: nn.Module | None = None  # per-head norm of q and k (timm qk_norm), applied before the product
    k_norm: nn.Module | None = None
    out_norm: nn.Module | None = None  # norm of the merged heads before proj (timm scale_norm)
    rope: bool = False  # rotary position embedding (EVA): queries and keys depend on token positions


@dataclass(eq=False, kw_only=True)
class BlockView:
    """Handles on one transformer block (pre-norm: x + attn(norm1(x)); x + mlp(norm2(x)))."""

    module: nn.Module
    norm1: nn.Module
    attn: AttentionView
    norm2: nn.Module
    mlp: nn.Module
    ls1: nn.Module = field(default_factory=nn.Identity)  # layer scale on the attention branch
    ls2: nn.Module = field(default_factory=nn.Identity)  # layer scale on the MLP branch
    # stochastic depth on the attention and MLP branches (training only)
    drop1: nn.Module = field(default_factory=nn.Identity)
    drop2: nn.Module = field(default_factory=nn.Identity)
    stage: int = 0
    window: tuple[int, int] | None = None  # None: global attention
    shift: int = 0


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Identity of a loaded model: what it is and which weights it carries."""

    model_id: str
    family: str  # "vit" | "swin"
    source: str  # "vit4mnist" | "timm" | "hf"
    num_classes: int
    trained: bool
    extra: dict[str, Any] = field(default_factory=dict)


class Encoder(nn.Module):
    """A vision encoder behind one uniform view. ``forward`` returns logits (or pooled features)."""

    info: ModelInfo
    preprocess: Preprocess
    layout: TokenLayout

    def __init__(self, *, info: ModelInfo, preprocess: Preprocess, layout: TokenLayout) -> None:
        super().__init__()
        self.info = info
        self.preprocess = preprocess
        self.layout = layout
        # The technique configs applied by vitedge.optimize_, in order; part of the cache namespace.
        self.applied: list[Any] = []
        # Ask token-reducing runners to record which original tokens each token holds (show-tokens).
        self.track_sources = False
        # Set by the bf16 technique in autocast mode: run the forward under torch.autocast with this dtype.
        self.autocast_dtype: torch.dtype | None = None
        # Set by techniques that split a batch (complexity-adaptive keep rates): computes the logits itself.
        self.batch_router: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
        # Set by the compile technique: torch.compile'd ``type(self).logits``, called as f(self, x) instead.
        # It takes the encoder as an argument rather than binding it, so a deep copy runs its own modules.
        self.compiled_logits: Callable[[Any, torch.Tensor], torch.Tensor] | None = None

    # --- subclasses implement -------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) -> (B, N, D)
        raise NotImplementedError

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, num_classes)
        raise NotImplementedError

    @property
    def blocks(self) -> list[BlockView]:
        raise NotImplementedError

    def arch(self, img_size: tuple[int, int] | None = None) -> ArchSpec:
        raise NotImplementedError

    def set_distilled_training(self, enable: bool) -> bool:
        """In train mode, make ``forward_head`` return ``(class_logits, distillation_logits)`` (DeiT).

        Returns False, changing nothing, when the model has no distillation head.
        """
        return False

    # --- shared ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        """Logits (or pooled features) in float32, whatever precision the encoder computes in."""
        self.check_input(x)
        x = x.to(self.compute_dtype)
        if self.compiled_logits is not None:
            return self.compiled_logits(self, x).float()
        return self.logits(x).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in compute_dtype -> (B, classes)
        """The model's output in its compute dtype, under autocast when a technique asked for it."""
        if self.autocast_dtype is not None:
            with torch.autocast("cpu", dtype=self.autocast_dtype):
                return self._logits(x)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_router is not None:
            return self.batch_router(self, x)
        return self.forward_head(self.forward_features(x))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the encoder's floating-point weights; inputs are cast to it."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def img_size(self) -> tuple[int, int]:
        return self.preprocess.img_size

    def example_input(self, batch: int = 1, img_size: tuple[int, int] | None = None) -> torch.Tensor:
        h, w = img_size or self.img_size
        gen = torch.Generator().manual_seed(0)
        return torch.randn(batch, self.preprocess.in_chans, h, w, generator=gen)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear ValueError for an input this encoder cannot take."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"expected images shaped (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.preprocess.in_chans:
            raise ValueError(
                f"{self.model_id} takes {self.preprocess.in_chans}-channel images, got {x.shape[1]} channels"
            )

    def weights_digest(self) -> str:
        """SHA-256 over parameter and buffer names, shapes, dtypes and bytes (stable across processes)."""
        h = hashlib.sha256()
        for name, t in sorted(self.state_dict().items()):
            t = t.detach().contiguous().cpu()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(str(t.dtype).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def extra_repr(self) -> str:
        return f"model_id={self.model_id!r}, layout={self.layout}"


BlockRunner = Callable[["SequenceEncoder", torch.Tensor], torch.Tensor]
# Called like F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale): q, k, v (B, H, N, d),
# an additive score bias broadcastable to (B, H, N, N) or None -> (B, H, N, d).
AttentionKernel = Callable[..., torch.Tensor]


class SequenceEncoder(Encoder):
    """An encoder whose blocks all run on one token sequence (ViT, DeiT, CLIP, SigLIP, EVA, ViT4MNIST).

    ``forward_features`` is ``final_norm(blocks(embed(x)))``. The block loop belongs to vitedge rather than to
    the wrapped library, so a technique can replace it: token merging and pruning install a ``block_runner``
    that walks :attr:`blocks` with fewer tokens. Without one, the native block modules run unchanged, so the
    output is bit-identical to the wrapped model's.
    """

    def __init__(self, *, info: ModelInfo, preprocess: Preprocess, layout: TokenLayout) -> None:
        super().__init__(info=info, preprocess=preprocess, layout=layout)
        self.block_runner: BlockRunner | None = None
        # What a token-reducing runner left after the last forward (tokens, sizes, sources); for drawing.
        self.token_state: Any = None
        # Set with block_runner: the tokens each block sees, so arch() (and the cost model) stay truthful.
        self.token_plan: Callable[[SequenceEncoder], list[BlockTokens]] | None = None
        # Set by techniques that replace the attention product (int8attn): vitedge's block loop calls it
        # instead of its default (vitedge.attention.batched.attention), with or without a block_runner.
        self.attention_kernel: AttentionKernel | None = None

    def final_token_count(self) -> int:
        """Tokens leaving the last block (fewer than ``layout.num_tokens`` under merging or pruning)."""
        if self.token_plan is None:
            return self.layout.num_tokens
        return self.token_plan(self)[-1].tokens_out

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D) with prefix tokens
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        return x

    def block_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def call_block(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def check_size(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"{self.model_id} was built for {self.img_size} images, got {tuple(x.shape[-2:])}; "
                "load it with img_size= (CLI: --img-size)"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N', D)
        self.check_input(x)
        self.check_size(x)
        x = self.embed(x)
        if self.block_runner is not None:
            x = self.block_runner(self, x)
        elif self.attention_kernel is not None:
            # The native blocks call their own SDPA, so a replaced kernel needs vitedge's block loop.
            from vitedge.tokens.runner import run_blocks

            x = run_blocks(self, x)
        else:
            for module in self.block_modules():
                x = self.call_block(module, x)
        return self.final_norm(x)
