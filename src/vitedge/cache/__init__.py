"""Feature cache: content keys under a model namespace, a verified value codec, a torch-free eviction policy,
memory/disk/Redis tiers with read-through promotion, and temporal token reuse for video.

import vitedge
feats = vitedge.encode(["a.jpg", "b.jpg"], "timm:deit_tiny_patch16_224", cache="memory,disk")
"""

from vitedge.cache.encode import encode, encode_report
from vitedge.cache.keys import Namespace, content_digest, entry_key
from vitedge.cache.policy import ImportanceConfig, ImportanceLRUK, LFUPolicy, LRUPolicy, SequencePredictor
from vitedge.cache.store import CacheConfig, FeatureCache

__all__ = [
    "CacheConfig",
    "FeatureCache",
    "ImportanceConfig",
    "ImportanceLRUK",
    "LFUPolicy",
    "LRUPolicy",
    "Namespace",
    "SequencePredictor",
    "content_digest",
    "encode",
    "encode_report",
    "entry_key",
]
