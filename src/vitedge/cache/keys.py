"""Cache keys: a full 256-bit content digest of the decoded pixels under a namespace of everything that shapes
the features (model id, weights digest, preprocessing, optimisation configs, vitedge version).

Changing any of those changes the namespace, so an entry written by another model, other weights or other
settings can never be found. Digests are BLAKE3-256 in hex and are never truncated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np

__all__ = ["KEY_PREFIX", "Namespace", "content_digest", "entry_key", "namespace_prefix"]

KEY_PREFIX = "vitedge"
DIGEST_HEX = 64


@dataclass(frozen=True, kw_only=True)
class Namespace:
    """What a cached feature depends on besides the image.

    Attributes:
        model_id: the model id as loaded (``timm:vit_base_patch16_224``).
        weights_digest: ``Encoder.weights_digest()`` of the weights that computed the feature.
        preprocess: the ``Preprocess`` as JSON (size, resize, mean/std, interpolation).
        configs: each applied optimisation, in order, as canonical JSON of its name, every field (defaults
            included, so changing a default changes the namespace) and its technique's algorithm version.
        version: the vitedge version.
    """

    model_id: str
    weights_digest: str
    preprocess: dict[str, Any]
    configs: tuple[str, ...]
    version: str

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "weights_digest": self.weights_digest,
            "preprocess": self.preprocess,
            "configs": list(self.configs),
            "version": self.version,
        }

    @property
    def digest(self) -> str:
        """BLAKE3-256 (hex) of the canonical JSON of every field."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), default=str)
        return blake3.blake3(text.encode()).hexdigest()

    @classmethod
    def of(cls, model: Any) -> Namespace:
        """The namespace of a loaded :class:`~vitedge.models.base.Encoder` (hashes its weights now)."""
        from vitedge import __version__
        from vitedge.api import RUNTIME_ONLY, algorithm_version, config_name, config_to_dict

        configs = tuple(
            json.dumps({**config_to_dict(c), "version": algorithm_version(c)}, sort_keys=True, default=str)
            for c in model.applied
            if config_name(c) not in RUNTIME_ONLY
        )
        return cls(
            model_id=model.info.model_id,
            weights_digest=model.weights_digest(),
            preprocess=model.preprocess.to_json(),
            configs=configs,
            version=__version__,
        )


def content_digest(pixels: np.ndarray) -> str:
    """BLAKE3-256 (hex) over dtype, shape and bytes of a decoded image array (e.g. uint8 ``(C, H, W)``)."""
    arr = np.ascontiguousarray(pixels)
    h = blake3.blake3()
    h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
    h.update(arr.tobytes() if not arr.flags.c_contiguous else arr.data.cast("B"))
    return h.hexdigest()


def namespace_prefix(namespace: str) -> str:
    _check_digest(namespace, "namespace")
    return f"{KEY_PREFIX}:{namespace}:"


def entry_key(namespace: str, content: str) -> str:
    """``vitedge:<namespace digest>:<content digest>`` with both digests in full."""
    _check_digest(content, "content digest")
    return namespace_prefix(namespace) + content


def _check_digest(value: str, what: str) -> None:
    if len(value) != DIGEST_HEX or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{what} must be 64 lowercase hex digits (a full 256-bit digest), got {value!r}")
