"""Accuracy-versus-speed plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (speed-up up, accuracy up), ordered by speed-up."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def plot_sweep(result: dict[str, Any], path: str | Path) -> Path:
    """Speed-up against top-1 (or against MACs when no accuracy was measured), Pareto front marked."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--plot writes a PNG; give a .png file name, got {path.name}")
    rows = result["rows"]
    has_acc = all("top1" in r for r in rows) and "top1" in result["baseline"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [r["speedup"] for r in rows]
    ys = [r["top1"] * 100 for r in rows] if has_acc else [r["macs"] / 1e9 for r in rows]
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    base_y = result["baseline"]["top1"] * 100 if has_acc else result["baseline"]["macs"] / 1e9
    ax.scatter([1.0], [base_y], color="black", marker="*", s=120, zorder=4, label="baseline")
    if has_acc:
        front = pareto_front(list(zip(xs, ys, strict=True)))
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:orange", label="Pareto front")
    ax.set_xlabel(f"speed-up (images/s vs baseline, batch {result['batch']}, {result['threads']} threads)")
    ax.set_ylabel("top-1 (%)" if has_acc else "GMACs per image")
    ax.set_title(f"{result['model']}: accuracy vs speed" if has_acc else f"{result['model']}: work vs speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
