"""Encoding past one process: bulk jobs to a Parquet feature table, locally or on a Ray cluster.

``run_bulk`` is what ``vitedge encode ... --out FILE.parquet`` runs; ``read_features`` reads its table back.
"""

from vitedge.scale.bulk import ENGINES, RayConfig, VideoConfig, list_inputs, run_bulk
from vitedge.scale.table import FeatureTable, read_features
from vitedge.scale.worker import EncodeJob, EncoderWorker

__all__ = [
    "ENGINES",
    "EncodeJob",
    "EncoderWorker",
    "FeatureTable",
    "RayConfig",
    "VideoConfig",
    "list_inputs",
    "read_features",
    "run_bulk",
]
