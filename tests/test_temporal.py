"""Fixed-shape time series: monthly bins of real Sentinel-2 pixels, same-day merging, checked by plain loops.

The shared data holds two real L2A dates of one place (austria_T33UUP_2021: 2021-06-17 and
2021-09-25, R/G/B/NIR, no SCL) and one real SCL band with real clouds (S2A_29RKH_20200219). It has
no two tiles of one day and no series of several dates, so the stack below is *derived* from them:
scenes are the two real dates, some shifted in space, given dates of a 2021 summer; their clear
masks are windows of the real SCL; the two "tiles" of 2021-06-17 are the two real images each cut
to an overlapping half of the grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from conftest import shared_data
from cropchips.errors import ConfigError, InputDataError
from cropchips.raster.temporal import Binned, bin_index, compose_bins, merge_day, time_bins
from cropchips.sources import Sentinel2L2A

S2 = Sentinel2L2A()
H, W = 120, 300
RANGE = "2021-06-01/2021-08-31"
OVERLAP = slice(120, 180)  # columns both 2021-06-17 tiles cover


@pytest.fixture(scope="module")
def real():
    """(two dates, 4 bands, H, W) real pixels and the real SCL's cloudy corner (rows 0..239, cols 249..548)."""
    with rasterio.open(shared_data("sentinel2", "austria_T33UUP_2021_rgbn_2dates.tif")) as src:
        pixels = src.read(window=((100, 100 + H), (100, 100 + W))).reshape(2, 4, H, W)
    with rasterio.open(shared_data("sentinel2", "S2A_29RKH_20200219_0_L2A", "SCL.tif")) as src:
        scl = src.read(1)[:2 * H, 249:249 + W]
    return pixels, scl


def scl_window(scl, k):
    """Differently placed real clouds: window k of the cloudy corner, flipped for odd k."""
    win = scl[(20 * k) % H:(20 * k) % H + H]
    return win[:, ::-1] if k % 2 else win


@pytest.fixture(scope="module")
def stack(real):
    """A derived 8-scene stack in date order: (data, clear, valid, dates)."""
    (a0, a1), scl = real
    scenes, clears, valids, dates = [], [], [], []

    def add(day, pixels, k, cols=slice(None)):
        valid = np.zeros((H, W), dtype=bool)
        valid[:, cols] = True
        data = np.where(valid, pixels, 0).astype("uint16")
        scenes.append(data)
        clears.append(S2.clear_mask(scl_window(scl, k), S2.default_clear_classes) & valid)
        valids.append(valid)
        dates.append(day)

    add("2021-05-30", a0, 0)                                  # 0: before the range: never used
    add("2021-06-05", np.roll(a0, 13, axis=-1), 1)            # 1
    add("2021-06-17", a0, 2, cols=slice(0, OVERLAP.stop))     # 2: first tile of the day
    add("2021-06-17", a1, 3, cols=slice(OVERLAP.start, W))    # 3: second tile, overlapping 2 on OVERLAP
    add("2021-06-27T10:56:21Z", np.roll(a1, 7, axis=-2), 4)   # 4: a datetime, cut to its date
    # July: no scene at all.
    add("2021-08-09", a1, 5)                                  # 5
    add("2021-08-20", np.zeros_like(a0), 0, cols=slice(0, 0))  # 6: no data at all: never used
    add("2021-08-21", np.roll(a0, -9, axis=-1), 0)            # 7
    return np.stack(scenes), np.stack(clears), np.stack(valids), dates


def merged_pixel(data, clear, valid, positions, b, r, c):
    """Reference same-day merge of one pixel: the first scene clear there, else the first valid, else 0."""
    for p in positions:
        if clear[p, r, c]:
            return int(data[p, b, r, c]), True
    for p in positions:
        if valid[p, r, c]:
            return int(data[p, b, r, c]), False
    return 0, False


def day_groups(dates, lo, hi, keep):
    """Reference: positions per day in [lo, hi), days in order, scenes in stack order."""
    groups = {}
    for p, day in enumerate(dates):
        if p in keep and lo <= day[:10] < hi:
            groups.setdefault(day[:10], []).append(p)
    return [groups[d] for d in sorted(groups)]


WINDOWS = [(slice(0, 24), slice(110, 190)), (slice(60, 72), slice(0, 20)), (slice(100, 120), slice(280, 300))]
USABLE = {1, 2, 3, 4, 5, 7}


def test_monthly_bins_and_bin_index():
    bins = time_bins(RANGE, "P1M")
    assert bins == (("2021-06-01", "2021-07-01"), ("2021-07-01", "2021-08-01"), ("2021-08-01", "2021-09-01"))
    assert [bin_index(bins, d) for d in ("2021-05-31", "2021-06-01", "2021-06-30", "2021-07-01", "2021-08-31",
                                         "2021-09-01")] == [-1, 0, 0, 1, 2, -1]


def test_every_stack_gives_the_same_number_of_bins(stack):
    data, clear, valid, dates = stack
    bins = time_bins(RANGE, "P1M")
    # The whole stack, June only, one August scene, and only the scene outside the range.
    for keep in ([*range(8)], [1, 2, 3, 4], [5], [0]):
        made = compose_bins(data[keep], clear[keep], valid[keep], [dates[p] for p in keep], bins, "median")
        assert isinstance(made, Binned)
        assert made.image.shape == (len(bins) * 4, H, W) and made.image.dtype == np.uint16
        assert made.bin_clear.shape == (len(bins), H, W) and made.bin_clear.dtype == bool
        assert made.clear_fraction.shape == (H, W) and made.clear_fraction.dtype == np.float32
        assert len(made.descriptions(("B04", "B03", "B02", "B08"))) == len(bins) * 4
    assert made.used == () and not made.image.any()  # [0] lies before the range


def test_bins_of_adjacent_single_scene_days_match_the_merged_path(stack):
    # Scenes 5 and 7 alone are next to each other in the stack (a slice, no copy); in the whole
    # stack the empty scene 6 lies between them (a copy). Both must give the same August.
    data, clear, valid, dates = stack
    bins = time_bins(RANGE, "P1M")
    whole = compose_bins(data, clear, valid, dates, bins, "median")
    pair = compose_bins(data[[5, 7]], clear[[5, 7]], valid[[5, 7]], [dates[5], dates[7]], bins, "median")
    assert pair.bin_used == ((), (), (0, 1)) and whole.bin_used[2] == (5, 7)
    assert np.array_equal(pair.image[8:12], whole.image[8:12])
    assert np.array_equal(pair.bin_clear[2], whole.bin_clear[2])


def test_median_bins_match_a_loop_reference(stack):
    data, clear, valid, dates = stack
    bins = time_bins(RANGE, "P1M")
    made = compose_bins(data, clear, valid, dates, bins, "median")
    assert made.used == (1, 2, 3, 4, 5, 7)
    assert made.bin_used == ((1, 2, 3, 4), (), (5, 7))
    # July has no scene: nodata, never clear.
    assert not made.image[4:8].any() and not made.bin_clear[1].any()
    assert made.clear_fraction.max() <= 2 / 3 + 1e-6
    checked_even = checked_odd = 0
    for t, (lo, hi) in enumerate(bins):
        groups = day_groups(dates, lo, hi, USABLE)
        for rows, cols in WINDOWS:
            for r in range(rows.start, rows.stop):
                for c in range(cols.start, cols.stop):
                    for b in range(4):
                        values = []
                        for group in groups:
                            value, is_clear = merged_pixel(data, clear, valid, group, b, r, c)
                            if is_clear:
                                values.append(value)
                        values.sort()
                        n = len(values)
                        if n == 0:
                            expected = 0
                        elif n % 2:
                            expected = values[n // 2]
                            checked_odd += n > 1
                        else:
                            expected = (values[n // 2 - 1] + values[n // 2] + 1) // 2  # half up
                            checked_even += 1
                        assert made.image[t * 4 + b, r, c] == expected, (t, b, r, c, values)
                    assert made.bin_clear[t, r, c] == (len(values) > 0)
                    expected_share = sum(
                        any(merged_pixel(data, clear, valid, g, 0, r, c)[1] for g in day_groups(dates, lo2, hi2,
                                                                                                 USABLE))
                        for lo2, hi2 in bins) / len(bins)
                    assert made.clear_fraction[r, c] == pytest.approx(expected_share)
    assert checked_even > 0 and checked_odd > 0  # both median cases were met


def test_least_cloudy_bins_take_the_clearest_merged_day(stack):
    data, clear, valid, dates = stack
    bins = time_bins(RANGE, "P1M")
    made = compose_bins(data, clear, valid, dates, bins, "least-cloudy")
    for t, (lo, hi) in enumerate(bins):
        groups = day_groups(dates, lo, hi, USABLE)
        if not groups:
            assert not made.image[t * 4:(t + 1) * 4].any() and made.bin_used[t] == ()
            continue
        # Clear share of each merged day over the whole grid, by counting; ties go to the earlier day.
        shares = []
        for group in groups:
            count = sum(1 for r in range(H) for c in range(W) if any(clear[p, r, c] for p in group))
            shares.append(count / (H * W))
        best = max(range(len(groups)), key=lambda d: (shares[d], -d))
        for rows, cols in WINDOWS:
            for r in range(rows.start, rows.stop):
                for c in range(cols.start, cols.stop):
                    for b in range(4):
                        value, is_clear = merged_pixel(data, clear, valid, groups[best], b, r, c)
                        assert made.image[t * 4 + b, r, c] == value
                    assert made.bin_clear[t, r, c] == is_clear
        assert set(made.bin_used[t]) <= set(groups[best])
    assert made.used == tuple(sorted(p for ps in made.bin_used for p in ps))


def test_same_day_tiles_merge_preferring_the_clear_one(stack):
    data, clear, valid, dates = stack
    one_day = time_bins("2021-06-17/2021-06-17", "P1D")
    assert len(one_day) == 1
    pair = [2, 3]
    made = compose_bins(data[pair], clear[pair], valid[pair], [dates[p] for p in pair], one_day, "median")
    assert made.used == (0, 1) and made.descriptions(("B04",)) == ("2021-06-17 B04",)
    first_cloudy = valid[2] & ~clear[2] & clear[3]   # where the first tile is cloudy but the second clear
    both_clear = clear[2] & clear[3]
    assert first_cloudy.sum() > 50 and both_clear.sum() > 50  # the real clouds make both cases occur
    assert (data[2][:, first_cloudy] != data[3][:, first_cloudy]).any()  # so the choice is visible
    for r in range(H):
        for c in range(W):
            if first_cloudy[r, c]:
                assert (made.image[:, r, c] == data[3][:, r, c]).all()
            elif clear[2, r, c]:
                assert (made.image[:, r, c] == data[2][:, r, c]).all()
            elif clear[3, r, c]:
                assert (made.image[:, r, c] == data[3][:, r, c]).all()
            else:  # cloudy everywhere: the median has no clear value
                assert (made.image[:, r, c] == 0).all()
            assert made.bin_clear[0, r, c] == (clear[2, r, c] or clear[3, r, c])
    # merge_day itself: the cloudy-but-valid pixels come from the first valid tile.
    merged, merged_clear, merged_valid, pick = merge_day(data[pair], clear[pair], valid[pair])
    for r in range(0, H, 3):
        for c in range(W):
            value, is_clear = merged_pixel(data, clear, valid, pair, 3, r, c)
            assert merged[3, r, c] == value and merged_clear[r, c] == is_clear
            assert merged_valid[r, c] == (valid[2, r, c] or valid[3, r, c])
    assert set(np.unique(pick).tolist()) == {0, 1}
    assert (pick[:, :OVERLAP.start] == 0).all() and (pick[:, OVERLAP.stop:] == 1).all()


def test_a_tile_hidden_under_an_earlier_clear_tile_is_not_used(real):
    (a0, a1), _ = real
    data = np.stack([a0, a1])
    clear = np.ones((2, H, W), dtype=bool)
    valid = np.ones((2, H, W), dtype=bool)
    made = compose_bins(data, clear, valid, ["2021-07-04", "2021-07-04"], time_bins(RANGE, "P1M"), "median")
    assert made.used == (0,) and made.bin_used == ((), (0,), ())
    assert np.array_equal(made.image[4:8], a0)
    assert made.clear_fraction.min() == pytest.approx(1 / 3)


def test_a_gap_between_same_day_tiles_stays_nodata(real):
    (a0, a1), scl = real
    valid = np.zeros((2, H, W), dtype=bool)
    valid[0, :, :100] = True   # west tile
    valid[1, :, 200:] = True   # east tile; columns 100..199 lie in neither
    data = np.where(valid[:, None], np.stack([a0, a1]), 0).astype("uint16")
    clear = valid & S2.clear_mask(np.stack([scl_window(scl, 0), scl_window(scl, 1)]), (4, 5, 6))
    made = compose_bins(data, clear, valid, ["2021-08-02", "2021-08-02"], time_bins(RANGE, "P1M"), "least-cloudy")
    assert made.bin_used == ((), (), (0, 1))
    august = made.image[8:12]
    assert not august[:, :, 100:200].any() and not made.bin_clear[2][:, 100:200].any()
    assert np.array_equal(august[:, :, :100], a0[:, :, :100])  # cloudy or not, each tile's own pixels
    assert np.array_equal(august[:, :, 200:], a1[:, :, 200:])
    assert np.array_equal(made.bin_clear[2], clear[0] | clear[1])


def test_descriptions_are_dated_bin_by_bin(stack):
    data, clear, valid, dates = stack
    made = compose_bins(data, clear, valid, dates, time_bins(RANGE, "P1M"), "median")
    assert made.descriptions(("B04", "B08")) == ("2021-06-01 B04", "2021-06-01 B08", "2021-07-01 B04",
                                                 "2021-07-01 B08", "2021-08-01 B04", "2021-08-01 B08")


def test_clear_bins_counts_bins_clear_enough_over_a_window(stack):
    data, clear, valid, dates = stack
    made = compose_bins(data, clear, valid, dates, time_bins(RANGE, "P1M"), "median")
    rows, cols = slice(0, 40), slice(100, 200)
    for threshold in (0.0, 0.5, 0.9, 1.0):
        expected = 0
        for t in range(3):
            clear_px = sum(1 for r in range(rows.start, rows.stop) for c in range(cols.start, cols.stop)
                           if made.bin_clear[t, r, c])
            expected += clear_px / ((rows.stop - rows.start) * (cols.stop - cols.start)) >= threshold
        assert made.clear_bins(rows, cols, threshold) == expected
    assert made.clear_bins(rows, cols, 0.0) == 3 and made.clear_bins(rows, cols, 1.0) < 3


def test_bad_inputs_say_what_to_change(stack):
    data, clear, valid, dates = stack
    bins = time_bins(RANGE, "P1M")
    with pytest.raises(ConfigError, match="median"):
        compose_bins(data, clear, valid, dates, bins, "stack")
    with pytest.raises(ConfigError, match="least-cloudy"):
        compose_bins(data, clear, valid, dates, bins, "mean")
    with pytest.raises(InputDataError, match="one date per scene"):
        compose_bins(data, clear, valid, dates[:-1], bins, "median")
    with pytest.raises(InputDataError, match="rows, cols"):
        compose_bins(data, clear[:, :10], valid, dates, bins, "median")
