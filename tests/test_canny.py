"""The canny preprocessor on synthetic images whose edges are known."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_sd_server.engine.canny import canny

SIZE = 48
# In OpenCV units after our blur, a straight step of height c (0..1) peaks at 637.5 * c and a square's
# corner at 836.7 * c; so with the default thresholds (100, 200) a 0.2 square is weak all round
# (128 .. 167) and a 0.5 one strong (319 ..).
WEAK_STEP, STRONG_STEP = 0.2, 0.5
FULL_STEP_PEAK = 836.7


def square(value: float = 1.0, top: int = 12, left: int = 12, side: int = 24, background: float = 0.0) -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), background, np.float32)
    image[top : top + side, left : left + side] = value
    return image


def outline(top: int, left: int, side: int) -> np.ndarray:
    """The pixels on either side of a square's boundary."""
    inside = np.zeros((SIZE, SIZE), bool)
    inside[top : top + side, left : left + side] = True
    ring = np.zeros_like(inside)
    ring[top - 1 : top + side + 1, left - 1 : left + side + 1] = True
    shrunk = np.zeros_like(inside)
    shrunk[top + 1 : top + side - 1, left + 1 : left + side - 1] = True
    return ring & ~shrunk


def near(mask: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """For each pixel of `pixels`, whether `mask` has a pixel within one step (8-neighbourhood)."""
    padded = np.pad(mask, 1)
    around = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            around |= padded[dy : dy + SIZE, dx : dx + SIZE]
    return around[pixels]


def test_output_is_a_three_channel_binary_map():
    edges = canny(square())
    assert edges.shape == (SIZE, SIZE, 3) and edges.dtype == np.float32
    assert set(np.unique(edges)) == {0.0, 1.0}
    assert (edges == edges[..., :1]).all()


def test_filled_square_gives_its_outline():
    edges = canny(square(top=12, left=12, side=24))[..., 0] > 0
    boundary = outline(12, 12, 24)
    assert not (edges & ~boundary).any(), "edge pixels away from the square's boundary"
    assert near(edges, boundary).all(), "gaps in the outline"
    assert edges.sum() <= boundary.sum() / 2 + 8, "the outline is not one pixel wide"


@pytest.mark.parametrize("grey", [0.0, 0.5, 1.0])
def test_flat_image_gives_nothing(grey):
    assert not canny(np.full((SIZE, SIZE, 3), grey, np.float32)).any()


def test_thresholds_are_in_opencv_units():
    assert canny(square(STRONG_STEP)).any()  # 319 > 200
    assert not canny(square(WEAK_STEP)).any()  # weak everywhere: nothing strong to seed it
    assert canny(square(WEAK_STEP), low=100, high=150).any()
    assert canny(square(1.0), low=FULL_STEP_PEAK - 10, high=FULL_STEP_PEAK - 5).any()
    assert not canny(square(1.0), low=FULL_STEP_PEAK + 5, high=FULL_STEP_PEAK + 10).any()


def test_hysteresis_keeps_weak_edges_connected_to_strong_ones():
    # A band fading from a strong step on its left to a weak one on its right, and an isolated weak square.
    image = np.zeros((SIZE, SIZE, 3), np.float32)
    image[4:16, 4:44] = np.linspace(STRONG_STEP, WEAK_STEP, 40)[None, :, None]
    image[28:40, 16:28] = WEAK_STEP
    top_edge = slice(2, 6), slice(8, 40)
    with_hysteresis = canny(image)[..., 0] > 0
    assert with_hysteresis[top_edge].any(axis=0).all(), "the whole top edge, weak end included"
    assert not with_hysteresis[24:44].any(), "an isolated weak square has nothing strong to connect to"
    strong_only = canny(image, low=200, high=200)[..., 0] > 0
    assert not strong_only[top_edge].any(axis=0).all(), "without hysteresis the weak end is lost"
