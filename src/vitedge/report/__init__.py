"""Rendering of measurement results: rich tables for the terminal and matplotlib plots."""

from vitedge.report.tables import (
    print_bench,
    print_eval,
    print_plan,
    print_profile,
    print_sweep,
    summary_table,
)

__all__ = ["print_bench", "print_eval", "print_plan", "print_profile", "print_sweep", "summary_table"]
