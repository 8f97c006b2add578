"""Dynamic compute (seed 22.2): work spent per image. ``exit`` (early exit with calibrated heads)."""
