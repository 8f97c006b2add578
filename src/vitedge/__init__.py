"""vitedge: fast, cheap vision encoders for VLMs on edge hardware.

import vitedge
model = vitedge.load("timm:deit_tiny_patch16_224")
vitedge.optimize_(model, vitedge.Bf16Config())
"""

from typing import Any

__version__ = "0.1.0"

from vitedge.api import describe, optimize_, technique_names
from vitedge.compress.bf16 import Bf16Config
from vitedge.models import Encoder, load

__all__ = [
    "Bf16Config",
    "Encoder",
    "__version__",
    "describe",
    "encode",
    "load",
    "optimize_",
    "technique_names",
]


def __getattr__(name: str) -> Any:
    # The feature cache pulls in its storage clients (blake3, redis, diskcache); load it on first use only.
    if name == "encode":
        from vitedge.cache.encode import encode

        return encode
    raise AttributeError(f"module 'vitedge' has no attribute {name!r}")
