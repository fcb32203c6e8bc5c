"""Compositing on real Sentinel-2 pixels, checked against an independent float NaN-median."""

import warnings

import numpy as np
import pytest
import rasterio

from conftest import shared_data
from cropchips.raster.composite import clear_mask, composite, median_composite


def reference_median(data, clear):
    """Independent reference: float64 NaN-median, rounded half up, 0 where no scene is clear."""
    values = np.where(clear[:, None], data.astype("float64"), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: expected, they become 0
        med = np.nanmedian(values, axis=0)
    return np.where(np.isnan(med), 0, np.floor(med + 0.5)).astype("uint16")


@pytest.fixture(scope="module")
def austria():
    """Real 10 m L2A stack: R,G,B,NIR of 2021-06-17 then of 2021-09-25 -> (2 scenes, 4 bands, rows, cols)."""
    with rasterio.open(shared_data("sentinel2", "austria_T33UUP_2021_rgbn_2dates.tif")) as src:
        data = src.read()
    return data.reshape(2, 4, *data.shape[1:])


def test_median_of_real_scenes_matches_reference(austria):
    rng = np.random.default_rng(1)
    # Three scenes: the two real dates and a real date shifted in space, with random clear masks.
    third = np.roll(austria[0], 7, axis=-1)
    data = np.concatenate([austria, third[None]], axis=0)
    clear = rng.random((3, *data.shape[2:])) < 0.7
    out = median_composite(data, clear)
    assert out.dtype == np.uint16
    assert np.array_equal(out, reference_median(data, clear))
    # Where exactly one scene is clear, the composite is that scene's value.
    only0 = clear[0] & ~clear[1] & ~clear[2]
    assert np.array_equal(out[:, only0], data[0][:, only0])
    assert (out[:, ~clear.any(axis=0)] == 0).all()


@pytest.mark.parametrize("n_scenes", [1, 2, 5, 16, 17])
def test_median_of_few_or_many_scenes_matches_reference(austria, n_scenes):
    # 1 scene (a masked copy), 2..16 (a sorting network) and 17 (a full sort): the same medians.
    rng = np.random.default_rng(n_scenes)
    data = np.stack([np.roll(austria[k % 2], 3 * k, axis=-1) for k in range(n_scenes)])
    clear = rng.random((n_scenes, *data.shape[2:])) < 0.6
    out = median_composite(data, clear)
    assert np.array_equal(out, reference_median(data, clear))
    if n_scenes == 1:
        assert np.array_equal(out[:, clear[0]], data[0][:, clear[0]]) and not out[:, ~clear[0]].any()


def test_median_of_the_extreme_values_does_not_overflow():
    # The mean of the middle two is taken in uint16 (lo + half the gap): 0 and 65535 give 32768, not 0.
    data = np.array([0, 65535, 65535, 7, 9, 9], dtype="uint16").reshape(6, 1, 1, 1)
    data = np.concatenate([data, data[::-1]], axis=3)  # (6 scenes, 1 band, 1 row, 2 cols)
    clear = np.zeros((6, 1, 2), dtype=bool)
    clear[:2, 0, 0] = True  # column 0: the values 0 and 65535 are clear
    clear[3:, 0, 1] = True  # column 1 (reversed): 65535, 0 and 65535
    out = median_composite(data, clear)
    assert out.tolist() == [[[32768, 65535]]]
    assert np.array_equal(out, reference_median(data, clear))


def test_median_uses_scl_clear_classes_and_skips_empty_scenes(austria):
    data = np.concatenate([austria, np.zeros_like(austria[:1])], axis=0)  # an all-nodata third scene
    scl = np.full((3, *data.shape[2:]), 4, dtype="uint8")
    scl[1, :50] = 9  # cloud high probability on the second date's top rows
    scl[2] = 0
    result = composite(data, scl, "median")
    assert result.scene_indices == (0, 1)
    top_expected = austria[0][:, :50]
    assert np.array_equal(result.image[:, :50], top_expected)
    rest = ((austria[0][:, 50:].astype("uint32") + austria[1][:, 50:] + 1) // 2).astype("uint16")
    assert np.array_equal(result.image[:, 50:], rest)


def test_least_cloudy_picks_the_clearest_non_empty_scene(austria):
    data = np.concatenate([np.zeros_like(austria[:1]), austria], axis=0)
    scl = np.full((3, *data.shape[2:]), 4, dtype="uint8")
    scl[0] = 0  # empty scene: no data at all, "no cloud" must not make it win
    scl[1, :200] = 8
    scl[2, :20] = 10
    result = composite(data, scl, "least-cloudy")
    assert result.scene_indices == (2,)
    assert np.array_equal(result.image, austria[1])


def test_all_scenes_empty_gives_no_scene():
    data = np.zeros((2, 10, 8, 8), dtype="uint16")
    scl = np.zeros((2, 8, 8), dtype="uint8")
    assert composite(data, scl).scene_indices == ()


def test_clear_classes():
    scl = np.arange(12, dtype="uint8")
    assert np.flatnonzero(clear_mask(scl)).tolist() == [4, 5, 6]


def test_unknown_method():
    with pytest.raises(ValueError, match="least-cloudy"):
        composite(np.zeros((1, 10, 2, 2), "uint16"), np.zeros((1, 2, 2), "uint8"), "mean")
