"""Attention kernels: INT8 attention."""
