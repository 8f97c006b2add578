"""The Encoder view: one interface over ViT4MNIST, timm and Hugging Face vision encoders.

Techniques (token merging, pruning, early exit, quantisation) and the measurement code see only this view:
patch embedding, a list of blocks (each with its attention and MLP), the token layout (class, distillation
and register tokens, grid size), the head, the preprocessing the weights expect, and an :class:`ArchSpec`
for the cost model. Concrete model classes are known only to the adapters in this package.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vitedge.models.spec import ArchSpec

if TYPE_CHECKING:  # the plan is built outside this package; an encoder only holds and calls it
    from vitedge.plan import ExecutionPlan


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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocess:
        """The inverse of :meth:`to_json` (JSON turns tuples into lists)."""
        fields = dict(data)
        for name in ("img_size", "mean", "std"):
            fields[name] = tuple(fields[name])
        return cls(**fields)


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


@dataclass(eq=False)
class Trace:
    """Side outputs of one forward, recorded only on request (:meth:`Encoder.forward_traced`) and kept only
    by the caller: never on the model, so concurrent calls and deep copies do not see each other's."""

    sources: bool = True  # ask token reducers to track which original tokens each token holds
    tokens: Any = None  # the final token state of a token-reducing plan (vitedge.plan.sequence.TokenState)
    window_groups: torch.Tensor | None = None  # (H, W) group ids in the first merging Swin block, image 0
    keep: torch.Tensor | None = None  # (B,) keep rate each image got from a batch router (adaptive)
    depth: torch.Tensor | None = None  # (B,) blocks each image ran before it left (exit)


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
        # How the forward runs, built by vitedge.optimize_ from ``applied`` (vitedge.plan); None: natively.
        self.plan: ExecutionPlan | None = None

    # --- subclasses implement -------------------------------------------------------------------
    def forward_features(
        self, x: torch.Tensor, trace: Trace | None = None, *, native: bool = False
    ) -> torch.Tensor:  # x: (B, C, H, W) -> (B, N, D)
        """Features under the execution plan (``native``: the wrapped library's own blocks, plan ignored);
        a ``trace`` collects the plan's side outputs of this call."""
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
        if self.plan is not None and self.plan.compiled is not None:
            return self.plan.compiled(self, x).float()
        return self.logits(x).float()

    def forward_traced(self, x: torch.Tensor, *, sources: bool = True) -> tuple[torch.Tensor, Trace]:
        """``forward`` (eagerly) plus what the plan's steps record for this one call (token groups for
        ``show-tokens``, per-image keep rates); ``sources`` asks token reducers to track which original
        tokens each token holds."""
        self.check_input(x)
        trace = Trace(sources=sources)
        return self.logits(x.to(self.compute_dtype), trace).float(), trace

    def logits(
        self, x: torch.Tensor, trace: Trace | None = None, *, native: bool = False
    ) -> torch.Tensor:  # (B, C, H, W) in compute_dtype -> (B, classes)
        """The model's output in its compute dtype, under the plan's autocast when it has one."""
        with self.autocast(x):
            return self._logits(x, trace, native)

    def autocast(self, x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` on ``x``'s device with the plan's dtype, or a no-op without one."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=self.autocast_dtype)

    def _logits(self, x: torch.Tensor, trace: Trace | None, native: bool) -> torch.Tensor:
        if not native and self.plan is not None and self.plan.router is not None:
            return self.plan.router(self, x, trace)
        return self.forward_head(self.forward_features(x, trace, native=native))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the plan runs the forward under ``torch.autocast`` with (None: no autocast)."""
        return None if self.plan is None else self.plan.autocast

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


class SequenceEncoder(Encoder):
    """An encoder whose blocks all run on one token sequence (ViT, DeiT, CLIP, SigLIP, EVA, ViT4MNIST).

    ``forward_features`` is ``final_norm(blocks(embed(x)))``. The block loop belongs to vitedge rather than to
    the wrapped library, so the execution plan can run it (:mod:`vitedge.plan.sequence`): fewer tokens,
    another attention product. Without a plan, or with one that changes no block, the native block modules
    run unchanged, so the output is bit-identical to the wrapped model's.
    """

    def final_token_count(self) -> int:
        """Tokens leaving the last block (fewer than ``layout.num_tokens`` under merging or pruning)."""
        counts = None if self.plan is None else self.plan.block_tokens(self)
        return self.layout.num_tokens if counts is None else counts[-1].tokens_out

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D) with prefix tokens
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        return x

    def block_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def call_block(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def native_blocks(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        """The wrapped library's own block modules, in order."""
        for module in self.block_modules():
            x = self.call_block(module, x)
        return x

    def check_size(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"{self.model_id} was built for {self.img_size} images, got {tuple(x.shape[-2:])}; "
                "load it with img_size= (CLI: --img-size)"
            )

    def forward_features(
        self, x: torch.Tensor, trace: Trace | None = None, *, native: bool = False
    ) -> torch.Tensor:  # (B, C, H, W) -> (B, N', D)
        self.check_input(x)
        self.check_size(x)
        x = self.embed(x)
        plan = None if native else self.plan
        if plan is not None:
            return self.final_norm(plan.run_blocks(self, x, trace))
        # native_blocks, inline: the activation-memory model is checked byte for byte against this form
        for module in self.block_modules():
            x = self.call_block(module, x)
        return self.final_norm(x)
