"""The encoder service (``vitedge serve``): so far its torch-free scheduler, :mod:`vitedge.serve.batcher`."""
