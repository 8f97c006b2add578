"""The project's own CIFAR-10 architectures: ``cifar-resnet`` (a ResNet-9 teacher), ``cifar-vit`` (a
DeiT-style ViT with a distillation token) and ``cifar-swin`` (a Swin sized for 32x32 input).

This is the only module that knows these classes. :func:`build_project_model` builds an untrained model for
``vitedge train``; :mod:`vitedge.models.project` loads the trained weights committed under ``weights/``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from vitedge.models._arch import param_count
from vitedge.models.base import BlockView, Encoder, ModelInfo, Preprocess, TokenLayout, Trace
from vitedge.models.spec import ArchSpec, LayerSpec, LinearOp
from vitedge.models.timm_models import TimmSwin, TimmVit

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "PROJECT_ARCHS",
    "CifarResNet",
    "ResNet9",
    "build_project_model",
    "cifar_preprocess",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR_IMG_SIZE = 32

# Constructor arguments of each architecture: part of every model card. Only arguments that timm has
# accepted unchanged across its 0.9 and 1.0 releases are used, so weights load wherever they were trained.
PROJECT_ARCHS: dict[str, dict[str, Any]] = {
    # Last stage 384 wide (not Page's 512): 4.2M parameters, 16.9 MB in fp32, under the 20 MB a committed
    # file may take. (Over the 16 MB a file may take back from the GPU machine: the script splits it.)
    "cifar-resnet": {"class": "ResNet9", "widths": (64, 128, 256, 384), "logit_scale": 0.125},
    "cifar-vit": {
        "class": "timm.models.deit.VisionTransformerDistilled",
        "img_size": CIFAR_IMG_SIZE,
        "patch_size": 4,
        "embed_dim": 192,
        "depth": 9,
        "num_heads": 6,
        "mlp_ratio": 2.0,
        "qkv_bias": True,
        "drop_path_rate": 0.05,
    },
    "cifar-swin": {
        "class": "timm.models.swin_transformer.SwinTransformer",
        "img_size": CIFAR_IMG_SIZE,
        "patch_size": 2,
        "window_size": 4,
        "embed_dim": 64,
        "depths": (2, 6, 2),
        "num_heads": (2, 4, 8),
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "drop_path_rate": 0.1,
    },
}


def cifar_preprocess() -> Preprocess:
    """32x32 RGB in, CIFAR-10 channel statistics, no resize."""
    return Preprocess(
        img_size=(CIFAR_IMG_SIZE, CIFAR_IMG_SIZE),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        resize=None,
        interpolation="bilinear",
    )


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.res = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res(x)


class ResNet9(nn.Module):
    """The fast CIFAR-10 ResNet-9 (Page's DAWNBench network), narrowed to stay under 16 MB in fp32.

    Modules are registered in execution order and the residual branches keep the shape, so walking
    ``named_modules()`` visits every convolution with the input size it actually sees (``CifarResNet.arch``
    relies on that).

    Args:
        widths: channels of the stem and of the three stages.
        num_classes: classifier outputs.
        in_chans: image channels.
        logit_scale: the logits are the linear head's output times this (0.125 trains faster with SGD).
    """

    def __init__(
        self,
        *,
        widths: tuple[int, int, int, int] = (64, 128, 256, 384),
        num_classes: int = 10,
        in_chans: int = 3,
        logit_scale: float = 0.125,
    ) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.stem = _conv_bn(in_chans, w0)
        self.layer1 = nn.Sequential(_conv_bn(w0, w1), nn.MaxPool2d(2), _Residual(w1))
        self.layer2 = nn.Sequential(_conv_bn(w1, w2), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(_conv_bn(w2, w3), nn.MaxPool2d(2), _Residual(w3))
        self.head = nn.Linear(w3, num_classes, bias=False)
        self.num_classes = num_classes
        self.num_features = w3
        self.logit_scale = logit_scale

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, w3, H/8, W/8)
        return self.layer3(self.layer2(self.layer1(self.stem(x))))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:  # (B, w3, h, w) -> (B, classes)
        return self.head(feats.amax(dim=(2, 3))) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_net_layers(model: nn.Module, img_size: tuple[int, int], in_chans: int) -> list[LayerSpec]:
    """One LayerSpec per convolution (a linear over its output positions) and per linear, in module order.

    Output sizes follow analytically from kernel, stride, padding and dilation; max/avg pools shrink the
    tracked size; batch-norm parameters are attached to the convolution before them. Valid for networks
    whose modules are registered in execution order with shape-preserving residual branches.
    """
    h, w = img_size
    c = in_chans
    layers: list[LayerSpec] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            (kh, kw), (sh, sw) = _pair(m.kernel_size), _pair(m.stride)
            (ph, pw), (dh, dw) = _pair(m.padding), _pair(m.dilation)  # type: ignore[arg-type]
            oh, ow = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
            op = LinearOp(
                name=name,
                tokens=oh * ow,
                in_features=m.in_channels // m.groups * kh * kw,
                out_features=m.out_channels,
                bias=m.bias is not None,
            )
            layers.append(
                LayerSpec(
                    name=name,
                    kind="conv",
                    ops=(op,),
                    in_elements=m.in_channels * h * w,
                    out_elements=m.out_channels * oh * ow,
                    extra_params=param_count([m]) - op.params,
                )
            )
            c, h, w = m.out_channels, oh, ow
        elif isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
            (kh, kw), (sh, sw), (ph, pw) = (
                _pair(m.kernel_size),
                _pair(m.stride or m.kernel_size),
                _pair(m.padding),
            )
            h, w = _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)
        elif isinstance(m, nn.BatchNorm2d) and layers:
            last = layers[-1]
            layers[-1] = dataclasses.replace(last, extra_params=last.extra_params + param_count([m]))
        elif isinstance(m, nn.Linear):
            op = LinearOp(
                name=name,
                tokens=1,
                in_features=m.in_features,
                out_features=m.out_features,
                bias=m.bias is not None,
            )
            layers.append(
                LayerSpec(
                    name=name,
                    kind="head",
                    ops=(op,),
                    in_elements=c * h * w,
                    out_elements=m.out_features,
                    extra_params=param_count([m]) - op.params,
                )
            )
    return layers


class CifarResNet(Encoder):
    """:class:`ResNet9` behind the Encoder view: a teacher, not a token encoder.

    ``forward_features`` returns the final feature map as tokens ``(B, h*w, C)`` (row-major), ``blocks`` is
    empty, and ``arch`` counts every convolution as a linear over its output positions.
    """

    def __init__(self, model: ResNet9, *, model_id: str, preprocess: Preprocess) -> None:
        h, w = preprocess.img_size
        super().__init__(
            info=ModelInfo(
                model_id=model_id,
                family="cnn",
                source="project",
                num_classes=model.num_classes,
                trained=False,
                extra={"class": type(model).__name__},
            ),
            preprocess=preprocess,
            layout=TokenLayout(num_cls=0, grid=(h // 8, w // 8)),
        )
        self.model = model

    def forward_features(
        self, x: torch.Tensor, trace: Trace | None = None, *, native: bool = False
    ) -> torch.Tensor:  # (B, C, H, W) -> (B, h*w, C); a convolutional net: no plan steps, nothing traced
        self.check_input(x)
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"{self.model_id} was built for {self.img_size} images, got {tuple(x.shape[-2:])}"
            )
        return self.model.forward_features(x).flatten(2).transpose(1, 2)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, classes)
        return self.model.head(feats.amax(dim=1)) * self.model.logit_scale

    @property
    def blocks(self) -> list[BlockView]:
        return []

    def arch(self, img_size: tuple[int, int] | None = None) -> ArchSpec:
        if img_size is not None and tuple(img_size) != self.img_size:
            raise ValueError(f"{self.model_id} is built for {self.img_size}, got img_size={img_size}")
        c = self.preprocess.in_chans
        layers = tuple(conv_net_layers(self.model, self.img_size, c))
        spec = ArchSpec(family="cnn", img_size=self.img_size, in_chans=c, layers=layers)
        return dataclasses.replace(spec, other_params=param_count([self.model]) - spec.params)


def _timm_kwargs(name: str, num_classes: int, drop_path: float | None) -> dict[str, Any]:
    kwargs = {k: v for k, v in PROJECT_ARCHS[name].items() if k != "class"}
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    return {**kwargs, "num_classes": num_classes}


def build_project_model(name: str, *, num_classes: int = 10, drop_path: float | None = None) -> Encoder:
    """An untrained ``cifar-resnet``, ``cifar-vit`` or ``cifar-swin`` (train mode, random weights).

    Args:
        name: one of :data:`PROJECT_ARCHS`.
        num_classes: classifier outputs (10 for CIFAR-10).
        drop_path: override the transformer's stochastic-depth rate (training only; no effect in eval).

    Raises:
        ValueError: an unknown name or a bad ``num_classes``/``drop_path``.
    """
    if name not in PROJECT_ARCHS:
        raise ValueError(f"unknown project model {name!r}; choose one of {', '.join(PROJECT_ARCHS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if drop_path is not None and not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
    pre = cifar_preprocess()
    enc: Encoder
    if name == "cifar-resnet":
        arch = PROJECT_ARCHS[name]
        net = ResNet9(widths=arch["widths"], num_classes=num_classes, logit_scale=arch["logit_scale"])
        enc = CifarResNet(net, model_id=name, preprocess=pre)
    elif name == "cifar-vit":
        enc = TimmVit(VisionTransformerDistilled(**_timm_kwargs(name, num_classes, drop_path)), model_id=name)
    else:
        enc = TimmSwin(SwinTransformer(**_timm_kwargs(name, num_classes, drop_path)), model_id=name)
    enc.preprocess = pre
    enc.info = dataclasses.replace(enc.info, source="project", extra={**enc.info.extra, "arch": name})
    return enc
