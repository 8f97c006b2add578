"""Token reduction: merging (ToMe), pruning (EViT-style and other scorers), complexity-adaptive keep rates."""
