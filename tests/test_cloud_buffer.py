"""Cloud buffer: clouds and shadows of a real SCL band grown by a square, checked against a brute force."""

from __future__ import annotations


import numpy as np
import pytest
import rasterio

from conftest import shared_data
from cropchips.errors import ConfigError
from cropchips.raster.composite import buffer_clear, dilate_square
from cropchips.sources import Sentinel2L2A, Source

SENTINEL2 = Sentinel2L2A()


@pytest.fixture(scope="module")
def scl():
    """The real SCL of S2A_29RKH_20200219 (549 x 549 at 200 m): classes 2, 5, 7, 8, 9 and 10."""
    with rasterio.open(shared_data("sentinel2", "S2A_29RKH_20200219_0_L2A", "SCL.tif")) as src:
        return src.read(1)


def brute_dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Independent reference: every True pixel paints the square of side 2r+1 around it, clipped."""
    out = np.zeros_like(mask, dtype=bool)
    rows, cols = mask.shape
    for r, c in zip(*np.nonzero(mask)):
        out[max(r - radius, 0):min(r + radius + 1, rows), max(c - radius, 0):min(c + radius + 1, cols)] = True
    return out


def brute_window_any(mask: np.ndarray, radius: int) -> np.ndarray:
    """A second reference, pixel by pixel: is any pixel at Chebyshev distance <= radius True?"""
    rows, cols = mask.shape
    out = np.zeros_like(mask, dtype=bool)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = any(mask[rr, cc] for rr in range(max(r - radius, 0), min(r + radius + 1, rows))
                            for cc in range(max(c - radius, 0), min(c + radius + 1, cols)))
    return out


def test_sentinel2_cloud_classes_are_shadow_clouds_and_cirrus():
    scl = np.arange(12, dtype="uint8")
    assert np.flatnonzero(SENTINEL2.cloud_mask(scl)).tolist() == [3, 8, 9, 10]
    assert SENTINEL2.cloud_mask(scl).dtype == bool


def test_a_source_that_names_no_cloud_classes_buffers_nothing():
    class Bare(Source):  # the minimum a source defines: no cloud classes
        collections = ("bare",)
        bands = ("B1",)
        resolutions = {"B1": 10.0, "Q": 10.0}
        quality_band = "Q"
        quality_classes = range(256)
        default_clear_classes = (1,)
        origin_band = "B1"
        constellation = "x"
        instruments = ("y",)

        def scene_from_item(self, item):
            raise NotImplementedError

        def radiometry(self, scene, harmonize):
            raise NotImplementedError

    quality = np.arange(24, dtype="uint16").reshape(2, 3, 4)
    mask = Bare().cloud_mask(quality)
    assert mask.shape == quality.shape and mask.dtype == bool and not mask.any()
    clear = quality % 2 == 1
    assert np.array_equal(buffer_clear(clear, mask, 3), clear)


@pytest.mark.parametrize("radius", [1, 2, 5])
def test_buffer_on_a_real_scl_matches_brute_force(scl, radius):
    cloud = SENTINEL2.cloud_mask(scl)
    clear = SENTINEL2.clear_mask(scl, SENTINEL2.default_clear_classes)
    assert cloud.sum() > 10_000 and clear.sum() > 250_000  # the real band has clouds and clear land
    out = buffer_clear(clear, cloud, radius)
    expected = clear & ~brute_dilate(cloud, radius)
    assert out.dtype == bool and out.shape == clear.shape
    assert np.array_equal(out, expected)
    # The buffer really takes clear pixels away (more for a wider one), and never adds any.
    removed = int(clear.sum() - out.sum())
    assert removed > 0 and not (out & ~clear).any()
    assert removed == int((clear & brute_dilate(cloud, radius)).sum())


def test_dilation_of_a_real_cloudy_corner_matches_pixel_by_pixel_reference(scl):
    # The top-right corner holds SCL 8, 9 and 10 up to the image edges: the clipping at borders matters.
    corner = SENTINEL2.cloud_mask(scl[:40, -40:])
    assert corner.any() and not corner.all()
    for radius in (1, 3):
        assert np.array_equal(dilate_square(corner, radius), brute_window_any(corner, radius))


def test_each_scene_is_buffered_by_its_own_clouds_only(scl):
    # Three scenes made of the real SCL: as it is, flipped left-right, and cloudless (all bare soil).
    stack = np.stack([scl, scl[:, ::-1], np.full_like(scl, 5)])
    cloud = SENTINEL2.cloud_mask(stack)
    clear = SENTINEL2.clear_mask(stack, (4, 5, 6))
    out = buffer_clear(clear, cloud, 2)
    for k in range(3):
        assert np.array_equal(out[k], clear[k] & ~brute_dilate(cloud[k], 2))
    assert out[2].all()  # no cloud in that scene: nothing leaks in from the others


def test_zero_buffer_returns_the_clear_mask_itself(scl):
    clear = SENTINEL2.clear_mask(scl, (4, 5, 6))
    assert buffer_clear(clear, SENTINEL2.cloud_mask(scl), 0) is clear


def test_buffer_wider_than_the_image_and_bad_values():
    cloud = np.zeros((1, 5, 7), dtype=bool)
    cloud[0, 4, 6] = True
    clear = ~cloud
    assert not buffer_clear(clear, cloud, 50).any()
    assert np.array_equal(buffer_clear(clear, np.zeros_like(cloud), 50), clear)
    with pytest.raises(ConfigError, match=">= 0"):
        buffer_clear(clear, cloud, -1)
    with pytest.raises(ConfigError, match="whole number"):
        buffer_clear(clear, cloud, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        buffer_clear(clear, cloud[:, :4], 1)

