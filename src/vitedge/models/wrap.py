"""``vitedge.wrap(module)``: a timm or Hugging Face module the user already holds, behind the Encoder view.

The Encoder wraps the module, it does not copy it: parameters are shared, so ``vitedge.optimize_`` changes the
user's module in place (as torchao's ``quantize_`` does). The module's train/eval mode is kept.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from vitedge.models.base import Encoder

TIMM_VIT = ("VisionTransformer", "VisionTransformerDistilled", "Eva")
TIMM_SWIN = ("SwinTransformer",)
HF_VISION = ("ViTModel", "CLIPVisionModel", "SiglipVisionModel")
HF_PROCESSORS = {"vit": "ViTImageProcessor", "clip_vision_model": "CLIPImageProcessor"}
# model_type -> the built-in id with that class (``vitedge.save`` rebuilds the skeleton from it)
HF_IDS = {"vit": "hf:vit", "clip_vision_model": "hf:clip-vision", "siglip_vision_model": "hf:siglip-vision"}


def wrap(module: Any, *, model_id: str | None = None) -> Encoder:
    """An Encoder over ``module``: a timm ``VisionTransformer`` / ``VisionTransformerDistilled`` / ``Eva`` /
    ``SwinTransformer`` or a transformers ``ViTModel`` / ``CLIPVisionModel`` / ``SiglipVisionModel``, with
    the weights it has. An Encoder is returned unchanged.

    Args:
        module: the model to wrap.
        model_id: the id reported and used in cache namespaces; default ``timm:<architecture>`` or the
            built-in ``hf:`` id of the class (``hf:clip-vision``). The weights digest in the cache namespace
            keeps fine-tuned weights apart.

    Raises:
        TypeError: ``module`` is not one of the supported classes (the message lists them).
    """
    if isinstance(module, Encoder):
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"vitedge.wrap takes a torch.nn.Module, got {type(module).__name__}")
    cls = type(module).__name__
    if cls in TIMM_VIT + TIMM_SWIN and type(module).__module__.startswith("timm."):
        enc = _wrap_timm(module, model_id)
    elif cls in HF_VISION and type(module).__module__.startswith("transformers."):
        enc = _wrap_hf(module, model_id)
    else:
        raise TypeError(
            f"vitedge cannot wrap a {cls}; it takes timm {', '.join(TIMM_VIT + TIMM_SWIN)} and transformers "
            f"{', '.join(HF_VISION)} (or a model id for vitedge.load)"
        )
    enc.info = dataclasses.replace(enc.info, trained=True, extra={**enc.info.extra, "wrapped": True})
    return enc.train(module.training)


def _wrap_timm(module: Any, model_id: str | None) -> Encoder:
    from vitedge.models.swin import TimmSwin
    from vitedge.models.timm_models import TimmVit

    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None) or {}
    name = model_id or f"timm:{cfg.get('architecture', type(module).__name__)}"
    if type(module).__name__ in TIMM_SWIN:
        return TimmSwin(module, model_id=name)
    return TimmVit(module, model_id=name)


def _wrap_hf(module: Any, model_id: str | None) -> Encoder:
    import transformers as T

    from vitedge.models.hf_models import HfVision, preprocess_from_processor

    kind = module.config.model_type
    proc_cls = getattr(T, HF_PROCESSORS.get(kind, "SiglipImageProcessor"))
    pre = preprocess_from_processor(proc_cls().to_dict(), module.config.image_size)
    return HfVision(module, model_id=model_id or HF_IDS.get(kind, f"hf:{kind}"), preprocess=pre)
