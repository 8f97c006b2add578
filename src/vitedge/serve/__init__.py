"""The encoder service (``vitedge serve``) and its client.

- :mod:`vitedge.serve.batcher`: the torch-free scheduler (buckets, priorities, deadlines, single flight);
- :mod:`vitedge.serve.worker`: the one thread that runs the model;
- :mod:`vitedge.serve.app`: the FastAPI app (``create_app``);
- :mod:`vitedge.serve.auth`: hashed API keys;
- :mod:`vitedge.serve.client`: :class:`Client`, which imports neither torch nor the model code.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Client": "vitedge.serve.client",
    "Encoded": "vitedge.serve.client",
    "ServiceError": "vitedge.serve.client",
    "create_app": "vitedge.serve.app",
    "ServeConfig": "vitedge.serve.app",
    "BatcherConfig": "vitedge.serve.batcher",
}


def __getattr__(name: str) -> Any:  # lazy: importing the client must not import torch
    import importlib

    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitedge.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
