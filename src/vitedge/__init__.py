"""vitedge: fast, cheap vision encoders for VLMs on edge hardware.

import vitedge
model = vitedge.load("timm:deit_tiny_patch16_224")
vitedge.optimize_(model, vitedge.Bf16Config())
"""

__version__ = "0.1.0"

from vitedge.api import describe, optimize_, technique_names
from vitedge.compress.bf16 import Bf16Config
from vitedge.models import Encoder, load

__all__ = ["Bf16Config", "Encoder", "__version__", "describe", "load", "optimize_", "technique_names"]
