"""Compression techniques: reduced precision, quantisation, structured pruning, distillation, sparsity."""
