"""Drawing which patches a token-reduction technique merged or pruned (``vitedge show-tokens``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch


def group_map(source: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """Group id per patch (H, W) from a source map (N, N0) of one image; -1 where no kept token holds it."""
    patches = source[:, num_prefix:].float()  # (N, P)
    owner = torch.full((patches.shape[1],), -1, dtype=torch.long)
    held = patches.sum(0) > 0
    owner[held] = patches[:, held].argmax(0)
    return owner.view(*grid).numpy()


def draw_token_map(
    image: np.ndarray,
    groups: np.ndarray,
    path: str | Path,
    *,
    title: str,
    fused: set[int] | None = None,
) -> Path:
    """Save the model's view of ``image`` (H, W, 3 in [0, 1]) beside each group painted in its mean colour.

    ``groups`` (gh, gw) holds a token id per patch; ids in ``fused`` (pruned tokens fused into one) are shown
    dimmed, as are patches no token holds.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out writes a PNG; give a .png file name, got {path.name}")
    h, w, _ = image.shape
    gh, gw = groups.shape
    ph, pw = h // gh, w // gw
    painted = image.copy()
    for gid in np.unique(groups):
        mask = np.kron(groups == gid, np.ones((ph, pw), dtype=bool))
        if gid < 0 or (fused and gid in fused):
            painted[mask] = image[mask] * 0.3  # pruned: dimmed, its content went into one fused token
        else:
            painted[mask] = image[mask].mean(0)  # merged: one colour per token
    # Borders between different groups.
    up = np.kron(groups, np.ones((ph, pw), dtype=int))
    edge = np.zeros((h, w), dtype=bool)
    edge[1:, :] |= up[1:, :] != up[:-1, :]
    edge[:, 1:] |= up[:, 1:] != up[:, :-1]
    painted[edge] = 1.0
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3), dpi=120)
    axes[0].imshow(image)
    axes[0].set_title("input (as the model sees it)", fontsize=9)
    axes[1].imshow(painted)
    axes[1].set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
