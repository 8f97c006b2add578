"""timm's SwinTransformer behind the Encoder view: windowed and shifted-window attention, patch merging.

vitedge runs the stages itself (patch embedding, per stage a patch merge then the blocks, final norm), the
same steps as timm's ``forward_features``, so the execution plan's window step of a block (window pruning,
window merging) can replace how that block runs. The window plumbing that needs timm internals (relative
position bias, the shifted-window mask) is exposed here as :class:`SwinBlockParts`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vitedge.models._arch import linear_ops, param_count
from vitedge.models._timm_common import attention_view, preprocess_of
from vitedge.models.base import AttentionView, BlockView, Encoder, ModelInfo, TokenLayout, Trace
from vitedge.models.spec import ArchSpec, AttnOp, LayerSpec, LinearOp

if TYPE_CHECKING:
    from vitedge.plan import WindowStep

# block index -> the window step of the execution plan for that block (None: the native block)
WindowSteps = Callable[[int], "WindowStep | None"]


@dataclass(eq=False, kw_only=True)
class SwinBlockParts:
    """One Swin block's pieces: window size and cyclic shift, the (1, heads, N, N) relative-position bias,
    the (windows, N, N) mask of shifted windows (0 within a region, a large negative number across; None for
    unshifted blocks), and the stochastic depth of the two branches (identity in eval mode)."""

    norm1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    attn: AttentionView
    window: tuple[int, int]
    shift: tuple[int, int]
    rel_bias: torch.Tensor
    mask: torch.Tensor | None
    drop1: nn.Module
    drop2: nn.Module


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
            preprocess=preprocess_of(model),
            layout=TokenLayout(num_cls=0, grid=tuple(model.patch_embed.grid_size)),
        )
        self.model = model
        self.final_grid = tuple(model.layers[-1].output_resolution)

    @property
    def stage_depths(self) -> tuple[int, ...]:
        """Blocks per stage; block indices run over the stages in order."""
        return tuple(len(stage.blocks) for stage in self.model.layers)

    def forward_features(
        self, x: torch.Tensor, trace: Trace | None = None, *, native: bool = False
    ) -> torch.Tensor:  # (B, C, H, W) -> (B, N, C); each block by the plan's window step, if it has one
        self.check_input(x)
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"{self.model_id} was built for {self.img_size} images, got {tuple(x.shape[-2:])}; "
                "load it with img_size= (CLI: --img-size)"
            )
        m = self.model
        plan = None if native else self.plan
        x = m.patch_embed(x)  # (B, H, W, C)
        i = 0
        for stage in m.layers:
            x = stage.downsample(x)
            for block in stage.blocks:
                x = block(x) if plan is None else plan.run_window_block(self, i, block, x, trace)
                i += 1
        return m.norm(x).flatten(1, 2)

    def block_parts(self, block: Any, padded_hw: tuple[int, int]) -> SwinBlockParts:
        """What window pruning needs from one timm Swin block at a padded resolution."""
        attn: Any = block.attn
        mask = block.attn_mask
        if getattr(block, "dynamic_mask", False):
            mask = block.get_attn_mask(torch.empty(1, *padded_hw, 1))
        return SwinBlockParts(
            norm1=block.norm1,
            norm2=block.norm2,
            mlp=block.mlp,
            attn=attention_view(attn),
            window=tuple(block.window_size),
            shift=tuple(block.shift_size),
            rel_bias=attn._get_rel_pos_bias(),
            mask=mask,
            drop1=getattr(block, "drop_path1", None) or nn.Identity(),
            drop2=getattr(block, "drop_path2", None) or nn.Identity(),
        )

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
                        attn=attention_view(b.attn),
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
        first = 0
        plan = self.plan

        def steps(i: int) -> WindowStep | None:
            return None if plan is None else plan.blocks[i].window

        for s, stage in enumerate(m.layers):
            layers += _swin_stage_layers(s, stage, first, steps)
            first += len(stage.blocks)
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


def _swin_stage_layers(s: int, stage: Any, first: int, steps: WindowSteps) -> list[LayerSpec]:
    """Layers of stage ``s`` whose first block has global index ``first``; a block's window step (``steps``)
    gives the windows it computes when window pruning skips some (their tokens then also skip the MLP) and
    the tokens per window when window merging folds some (plus the matching products)."""
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
        n, nd = wh * ww, 0
        step = steps(first + j)
        if step is not None:
            windows = step.windows(windows)
            n, nd = step.window_tokens((wh, ww), (h, w))
        active = min(windows * n, h * w)  # tokens that run the MLP (padding never does)
        a = attention_view(b.attn)
        name = f"layers.{s}.blocks.{j}"
        attn_lin = linear_ops(f"{name}.attn", b.attn, windows * n)
        match: tuple[LinearOp, ...] = ()
        if nd:  # cosine similarity of every window's sources against its destinations
            match = (
                LinearOp(
                    name=f"{name}.merge.match",
                    tokens=windows * (wh * ww - nd),
                    in_features=b.dim,
                    out_features=nd,
                    weight=False,
                ),
            )
        attn_ops: tuple[LinearOp | AttnOp, ...] = (
            *match,
            *attn_lin,
            AttnOp(
                name=f"{name}.attn.sdpa",
                windows=windows,
                q_tokens=n,
                kv_tokens=n,
                heads=a.num_heads,
                head_dim=a.head_dim,
                # window merging runs its attention as two batched matmuls on CPU (scores materialised)
                fused=bool(getattr(b.attn, "fused_attn", False)) and not nd,
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
                hidden_elements=windows * n * attn_lin[0].out_features,
                extra_params=param_count([b.norm1, b.attn]) - sum(op.params for op in attn_lin),
            )
        )
        mlp_lin = linear_ops(f"{name}.mlp", b.mlp, active)
        layers.append(
            LayerSpec(
                name=f"{name}.mlp",
                kind="mlp",
                ops=tuple(mlp_lin),
                in_elements=h * w * dim,
                out_elements=h * w * dim,
                hidden_elements=active * max(op.out_features for op in mlp_lin),
                extra_params=param_count([b.norm2, b.mlp]) - sum(op.params for op in mlp_lin),
            )
        )
    return layers
