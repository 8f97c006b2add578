"""Attention kernels: INT8 attention, and the batched-product form chosen by shape."""
