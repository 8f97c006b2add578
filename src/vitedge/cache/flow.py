"""Camera-motion compensation for temporal token reuse: where each cached token's content went, and which
patches to recompute (issue #6: warp the previous features with optical flow, plus a residual update).

Design. Every cached token remembers the pixels it was last computed on (its *reference patch*) and an
*offset*: where that content lies now relative to the token's grid cell, in pixels. Per frame:

1. Motion. Dense Farneback flow from the previous to the current frame, on grey frames at quarter size (2-3
   ms), averaged per patch. When the median displacement is below ``min_motion`` pixels the camera counts as
   still and step 2 is skipped: a fixed camera runs the plain patch gate, decision for decision. Otherwise
   a similarity transform (pan, zoom, rotation) is fitted to the per-patch flow with RANSAC: the flow of
   one patch is noisy in flat regions and at the border; objects that move on their own are left to step 3.
2. Warp. Each cached content moves with the camera; every grid cell then takes the cached token whose
   content lies nearest (a source index per cell; a newly uncovered border cell takes its nearest content
   too, however far, and the gate below judges it). :meth:`~vitedge.cache.eventful.ReuseEngine.warp` moves
   every block's cached state by that index. Only whole tokens move: nothing is interpolated, so a token's
   cached values remain exactly those of its reference pixels, and its reference inputs are corrected by
   the position-embedding change.
3. Residual update. A ViT token is not shift-invariant below the patch size, so a reused token's error is
   what its input lost, whatever the cause: the patch gate compares the current pixels of each cell with
   the reference patch the cell now holds, with no motion compensation, and recomputes the token when the
   mean absolute difference exceeds ``shift_threshold`` (tokens whose content moved) or ``pixel_threshold``
   (tokens whose content stayed in place). Recomputed tokens take the current pixels and offset 0.

Measured and left out (benchmarks/bench_video_flow.py): comparing against the current frame resampled at
each token's offset (``cv2.remap``, "like with like") recomputes more and gains no cosine, since the
sub-patch offset is exactly the error a reused token carries; forcing cells without a one-to-one source to
recompute costs FLOPs where the flow is noisy or the border is smooth.

The bookkeeping is numpy on patch indices (no torch); tensors move in :mod:`vitedge.cache.eventful`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "MotionStep",
    "PatchGate",
    "cell_flow",
    "fit_motion",
    "flow_frame",
    "patch_change",
    "patches",
    "reindex",
]

_FLOW_SCALE = 4  # flow on frames shrunk 4x: 2-3 ms per 224 px frame, and no less precise than at 2x


def patch_change(frame: np.ndarray, ref: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mean absolute change per patch: frames ``(H, W, 3)`` float in [0, 1] -> ``(gh * gw,)`` row-major."""
    gh, gw = grid
    h, w = frame.shape[0] // gh, frame.shape[1] // gw
    d = np.abs(frame[: gh * h, : gw * w] - ref[: gh * h, : gw * w])
    return d.reshape(gh, h, gw, w, -1).mean(axis=(1, 3, 4)).reshape(-1)


def patches(frame: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(H, W, C)`` -> ``(gh * gw, ph, pw, C)`` row-major patches (a copy)."""
    gh, gw = grid
    ph, pw = frame.shape[0] // gh, frame.shape[1] // gw
    p = frame[: gh * ph, : gw * pw].reshape(gh, ph, gw, pw, -1).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(p).reshape(gh * gw, ph, pw, -1)


def flow_frame(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H / 4, W / 4)`` uint8 grey, the input of :func:`cell_flow`."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape[0] // _FLOW_SCALE, grey.shape[1] // _FLOW_SCALE
    return cv2.resize(grey, (w, h), interpolation=cv2.INTER_AREA)


def cell_flow(
    prev_grey: np.ndarray, grey: np.ndarray, grid: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Forward flow (content displacement, pixels of the full frame) from ``prev_grey`` to ``grey``.

    Args:
        prev_grey, grey: ``(h, w)`` uint8 frames from :func:`flow_frame`.
        grid: ``(gh, gw)`` patch grid of the full frame.

    Returns:
        ``(gh * gw, 2)`` mean ``(dx, dy)`` per patch and the ``(2,)`` median over the frame.
    """
    # pyramid of 3 levels halving, 15 px window, 3 iterations, polynomial of 5 px (OpenCV's usual settings)
    flow = np.zeros((*grey.shape, 2), np.float32)
    flow = cv2.calcOpticalFlowFarneback(prev_grey, grey, flow, 0.5, 3, 15, 3, 5, 1.2, 0)
    flow = np.asarray(flow) * _FLOW_SCALE
    median = np.median(flow.reshape(-1, 2), axis=0)
    gh, gw = grid
    h, w = flow.shape[0] // gh, flow.shape[1] // gw
    per_cell = flow[: gh * h, : gw * w].reshape(gh, h, gw, w, 2).mean(axis=(1, 3)).reshape(-1, 2)
    return per_cell, median


def fit_motion(per_cell: np.ndarray, grid: tuple[int, int], patch: tuple[int, int]) -> np.ndarray:
    """A similarity transform (pan, zoom, rotation) fitted with RANSAC to the per-patch flow.

    Args:
        per_cell: ``(P, 2)`` mean flow of each patch; grid: ``(gh, gw)``; patch: ``(ph, pw)`` px.

    Returns:
        ``(2, 3)`` matrix taking a point of the previous frame to the current one (the flow's median as a
        pure translation where the fit fails): the flow of a single patch is noisy at the frame's border and
        in flat regions, that of the camera is not.
    """
    gh, gw = grid
    ph, pw = patch
    cell = np.arange(gh * gw)
    centres = np.stack([(cell % gw + 0.5) * pw, (cell // gw + 0.5) * ph], axis=1).astype(np.float32)
    m, _ = cv2.estimateAffinePartial2D(
        centres, centres + per_cell.astype(np.float32), method=cv2.RANSAC, ransacReprojThreshold=1.0
    )
    if m is None:
        dx, dy = np.median(per_cell, axis=0)
        return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])
    return np.asarray(m, dtype=np.float64)


def reindex(
    offsets: np.ndarray, displacement: np.ndarray, grid: tuple[int, int], patch: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Move each cell's cached content by a displacement; give every cell the content that lies nearest.

    Args:
        offsets: ``(P, 2)`` where each cell's cached content lies relative to the cell, ``(dx, dy)`` px.
        displacement: ``(P, 2)`` motion of each cell's cached content.
        grid: ``(gh, gw)``; patch: ``(ph, pw)`` in pixels.

    Returns:
        ``src``: ``(P,)`` the cell whose cached state each cell takes (a cell may serve several);
        ``new_offsets``: ``(P, 2)`` where that content lies relative to its new cell.
    """
    gh, gw = grid
    ph, pw = patch
    cell = np.arange(gh * gw)
    origin = np.stack([cell % gw * pw, cell // gw * ph], axis=1).astype(np.float64)
    moved = origin + offsets + displacement  # (P, 2) content positions now
    rel = moved[None, :, :] - origin[:, None, :]  # (P_cell, P_content, 2)
    src = np.argmin(rel[..., 0] ** 2 + rel[..., 1] ** 2, axis=1)
    return src, rel[cell, src]


@dataclass(frozen=True)
class MotionStep:
    """What the gate decided for one frame.

    Attributes:
        changed: ``(k,)`` patch indices to recompute (row-major, prefix tokens excluded).
        src: ``(P,)`` the patch whose cached state each patch takes; None when nothing moved.
        shift: median displacement of the frame ``(dx, dy)`` in pixels (0 without flow).
    """

    changed: np.ndarray
    src: np.ndarray | None
    shift: tuple[float, float]


class PatchGate:
    """Per-frame patch decisions with a pixel reference that follows camera motion (module docstring).

    Args:
        grid: ``(gh, gw)`` patch grid; frames are ``(gh * ph, gw * pw, 3)`` float in [0, 1].
        pixel_threshold: mean absolute change of a patch whose content stayed in place that recomputes it.
        shift_threshold: the same for a patch whose content moved since its token was computed (the larger
            of the two applies).
        flow: follow camera motion; without it this is the plain fixed-camera patch gate.
        min_motion: median displacement (px per frame) below which a frame counts as still.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        *,
        pixel_threshold: float,
        shift_threshold: float,
        flow: bool,
        min_motion: float,
    ) -> None:
        self.grid = grid
        self.pixel_threshold = pixel_threshold
        self.shift_threshold = max(shift_threshold, pixel_threshold)
        self.flow = flow
        self.min_motion = min_motion
        n = grid[0] * grid[1]
        self.ref = np.zeros((n, 1, 1, 1), np.float32)  # (P, ph, pw, C) what each token was computed on
        self.offsets = np.zeros((n, 2))  # (P, 2) where that content lies now, relative to the cell
        self._prev_grey: np.ndarray | None = None
        self._keyed = False

    def keyframe(self, px: np.ndarray, rgb: np.ndarray) -> None:
        """Every token is recomputed on ``px`` ``(H, W, 3)`` float (``rgb`` is the same frame as uint8)."""
        self.ref = patches(px, self.grid)
        self.offsets[:] = 0
        self._prev_grey = flow_frame(rgb) if self.flow else None
        self._keyed = True

    def __call__(self, px: np.ndarray, rgb: np.ndarray) -> MotionStep:
        """Decide for a frame between keyframes: ``px`` float ``(H, W, 3)`` in [0, 1], ``rgb`` its uint8."""
        if not self._keyed:
            raise ValueError("PatchGate: call keyframe() on the first frame")
        src = None
        shift = (0.0, 0.0)
        if self.flow:
            assert self._prev_grey is not None
            grey = flow_frame(rgb)
            per_cell, median = cell_flow(self._prev_grey, grey, self.grid)
            self._prev_grey = grey
            shift = (float(median[0]), float(median[1]))
            if np.hypot(*median) >= self.min_motion:
                src = self._warp(per_cell)
        current = patches(px, self.grid)
        change = np.abs(current - self.ref).mean(axis=(1, 2, 3))
        moved = np.any(self.offsets != 0, axis=1)
        changed = np.flatnonzero(change > np.where(moved, self.shift_threshold, self.pixel_threshold))
        if len(changed):  # the reference follows what was recomputed
            self.ref[changed] = current[changed]
            self.offsets[changed] = 0
        return MotionStep(changed=changed, src=src, shift=shift)

    def _warp(self, per_cell: np.ndarray) -> np.ndarray | None:
        """Move the cached contents by the camera motion fitted to the per-cell flow ``(P, 2)``; returns the
        source index, or None when every cell keeps its own content."""
        gh, gw = self.grid
        ph, pw = self.ref.shape[1:3]
        cell = np.arange(gh * gw)
        m = fit_motion(per_cell, self.grid, (ph, pw))
        centres = np.stack([(cell % gw + 0.5) * pw, (cell // gw + 0.5) * ph], axis=1) + self.offsets
        displacement = centres @ m[:, :2].T + m[:, 2] - centres
        src, self.offsets = reindex(self.offsets, displacement, self.grid, (ph, pw))
        if np.array_equal(src, cell):
            return None
        self.ref = self.ref[src]
        return src
