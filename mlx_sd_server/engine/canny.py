"""Canny edge detection in numpy: the preprocessor that turns a photo into a canny ControlNet's input.

The classic steps: grayscale, Gaussian blur, Sobel gradients, non-maximum suppression (thin edges to one
pixel), double threshold, hysteresis (weak edges survive only when connected to strong ones).
Thresholds are in OpenCV's units: the L1 Sobel magnitude |gx| + |gy| of a 0..255 image, as
`cv2.Canny(image, low, high)` uses them, so the usual 100/200 behave as users expect.
"""

from __future__ import annotations

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as OpenCV's RGB2GRAY
GAUSSIAN_5 = np.array([1, 4, 6, 4, 1], dtype=np.float32) / 16  # binomial, sigma ~ 1
SOBEL_SMOOTH = np.array([1, 2, 1], dtype=np.float32)
SOBEL_DIFF = np.array([-1, 0, 1], dtype=np.float32)
TAN_22_5 = np.tan(np.pi / 8)


def canny(pixels: np.ndarray, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """HxWx3 (or HxWx1) float pixels in [0, 1] -> HxWx3 float32 edge map: 1 on edges, 0 elsewhere."""
    gray = pixels[..., :3] @ LUMA if pixels.shape[-1] >= 3 else pixels[..., 0]
    blurred = _separable_filter(gray.astype(np.float32) * 255, GAUSSIAN_5, GAUSSIAN_5)
    gx = _separable_filter(blurred, SOBEL_SMOOTH, SOBEL_DIFF)
    gy = _separable_filter(blurred, SOBEL_DIFF, SOBEL_SMOOTH)
    magnitude = np.abs(gx) + np.abs(gy)
    thin = _non_maximum_suppression(magnitude, gx, gy)
    edges = _hysteresis(strong=thin > high, weak=thin > low)
    return np.repeat(edges[..., None], 3, axis=-1).astype(np.float32)


def _separable_filter(image: np.ndarray, kernel_y: np.ndarray, kernel_x: np.ndarray) -> np.ndarray:
    """Correlate with kernel_y down the rows, then kernel_x along them; borders reflect (OpenCV's default)."""
    ry, rx = len(kernel_y) // 2, len(kernel_x) // 2
    padded = np.pad(image, ((ry, ry), (rx, rx)), mode="reflect")
    h, w = image.shape
    rows = sum(k * padded[i : i + h, :] for i, k in enumerate(kernel_y))
    return sum(k * rows[:, i : i + w] for i, k in enumerate(kernel_x))


def _non_maximum_suppression(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep a pixel only where it is the maximum across the edge (along its gradient direction).

    The direction is quantised to horizontal, vertical or one of the two diagonals. Ties go to the first
    pixel (strictly greater than one neighbour, at least the other), so a symmetric edge stays one wide.
    """
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape

    def neighbour(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay <= TAN_22_5 * ax  # gradient points along x: compare left and right
    vertical = ax <= TAN_22_5 * ay
    same_sign = (gx * gy) > 0  # gradient points down-right (y grows downwards): the main diagonal
    directions = [
        (horizontal, (0, -1), (0, 1)),
        (vertical & ~horizontal, (-1, 0), (1, 0)),
        (~horizontal & ~vertical & same_sign, (-1, -1), (1, 1)),
        (~horizontal & ~vertical & ~same_sign, (-1, 1), (1, -1)),
    ]
    keep = np.zeros_like(magnitude, dtype=bool)
    for where, before, after in directions:
        keep |= where & (magnitude > neighbour(*before)) & (magnitude >= neighbour(*after))
    return np.where(keep, magnitude, 0.0)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Strong pixels, plus weak ones 8-connected to them through other weak ones."""
    edges = strong.copy()
    frontier = strong
    while frontier.any():
        grown = _dilate(frontier) & weak & ~edges
        edges |= grown
        frontier = grown
    return edges


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + h, dx : dx + w]
    return out
