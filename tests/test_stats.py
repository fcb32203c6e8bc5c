"""stats.json: exact per-band statistics of the train split, checked against numpy on the pixels themselves.

The chips are small uint16 GeoTIFFs cut from real Sentinel-2 L2A pixels (the 29RKH COGs and the
Austrian two-date stack in ../shared/data); no-data holes are punched in them by the tests.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import rasterio
from affine import Affine
from conftest import shared_data
from rasterio.enums import Resampling
from rasterio.windows import Window

from cropchips.dataset.stats import (STATS_NAME, compute_stats, parse_band_description, read_stats, summarise,
                                     write_stats)
from cropchips.errors import InputDataError
from cropchips.output.storage import open_storage

S2_BANDS = ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12")
SIZE = 24  # pixels per chip side


def _s2_block(row: int, col: int) -> np.ndarray:
    """(10, SIZE, SIZE) real uint16 DNs of the 29RKH scene at 10 m pixel (row, col); the 20 m bands
    read onto the same grid (nearest)."""
    folder = shared_data("sentinel2", "S2A_29RKH_20200219_0_L2A")
    layers = []
    for band in S2_BANDS:
        with rasterio.open(folder / f"{band}.tif") as src:
            factor = round(src.res[0] / 100)  # 1 for the 10 m bands (100 m here), 2 for the 20 m ones
            window = Window(col // factor, row // factor, SIZE // factor, SIZE // factor)
            layers.append(src.read(1, window=window, out_shape=(SIZE, SIZE), resampling=Resampling.nearest))
    return np.stack(layers)


def _write(path, array: np.ndarray, descriptions) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=array.dtype.name, crs="EPSG:32629", nodata=0,
                       transform=Affine(100, 0, 300000, 0, -100, 3000000)) as dst:
        dst.write(array)
        for i, text in enumerate(descriptions, start=1):
            dst.set_band_description(i, text)


@pytest.fixture(scope="module")
def s2_chips():
    """Four chips of real pixels (three train, one val) with no-data holes, and their arrays."""
    arrays = {"a": _s2_block(100, 100), "b": _s2_block(400, 240), "c": _s2_block(700, 820), "v": _s2_block(10, 1000)}
    arrays["a"][0, :5, :] = 0        # B02 only: a strip without data (the other bands keep theirs)
    arrays["a"][9, :, :7] = 0        # B12 only
    arrays["b"][:, 10:, 15:] = 0     # every band: a corner outside the swath
    arrays["c"][4, :, :] = 0         # B05 wholly missing in one chip
    arrays["c"][4, 3, 3] = 1         # ... but one pixel, of the smallest valid value
    splits = {"a": "train", "b": "train", "c": "train", "v": "val"}
    return arrays, splits


def _folder(tmp_path, arrays, splits, descriptions=S2_BANDS, dataset_id="abc123abc123"):
    for name, array in arrays.items():
        _write(tmp_path / "images" / f"{name}.tif", array, descriptions)
    return pd.DataFrame({"name": list(arrays), "image": [f"images/{n}.tif" for n in arrays],
                         "mask": [f"masks/{n}.tif" for n in arrays], "split": [splits[n] for n in arrays],
                         "dataset_id": dataset_id, "bands": [list(descriptions)] * len(arrays)})


def _valid(arrays, names, band: int) -> np.ndarray:
    values = np.concatenate([arrays[n][band].ravel() for n in names])
    return values[values != 0]


def _check_entry(entry, values: np.ndarray):
    assert entry["count"] == values.size
    assert entry["mean"] == pytest.approx(np.mean(values.astype(np.float64)), rel=1e-12)
    assert entry["std"] == pytest.approx(np.std(values.astype(np.float64)), rel=1e-9)
    assert entry["p2"] == pytest.approx(np.percentile(values, 2), rel=1e-12)
    assert entry["p98"] == pytest.approx(np.percentile(values, 98), rel=1e-12)
    assert (entry["min"], entry["max"]) == (values.min(), values.max())


def test_train_statistics_equal_numpys_on_the_valid_pixels(tmp_path, s2_chips):
    arrays, splits = s2_chips
    frame = _folder(tmp_path, arrays, splits)
    stats = compute_stats(tmp_path, frame)
    assert (stats["split"], stats["chips"], stats["dataset_id"], stats["nodata"]) == ("train", 3, "abc123abc123", 0)
    assert [b["description"] for b in stats["bands"]] == list(S2_BANDS)
    assert all(b["date"] is None and b["band"] == b["description"] for b in stats["bands"])
    train = [n for n in arrays if splits[n] == "train"]
    for k, entry in enumerate(stats["bands"]):
        values = _valid(arrays, train, k)
        _check_entry(entry, values)
        # The holes were left out, and the val chip too (it would change the numbers).
        with_val = _valid(arrays, list(arrays), k)
        assert entry["count"] < with_val.size and entry["mean"] != pytest.approx(with_val.mean(), rel=1e-6)
    total = 3 * SIZE * SIZE
    assert stats["bands"][0]["count"] == total - 5 * SIZE - 14 * 9       # B02: its strip and b's corner
    assert stats["bands"][4]["count"] == total - SIZE * SIZE + 1 - 14 * 9  # B05: chip c all but one pixel
    assert stats["bands"][4]["min"] == 1
    # Undated bands: pooled is the same per band; normalize lists mean/std in file order.
    assert [(p["band"], p["count"], p["mean"]) for p in stats["pooled"]] == [
        (b["band"], b["count"], b["mean"]) for b in stats["bands"]]
    assert stats["normalize"]["bands"] == list(S2_BANDS)
    assert stats["normalize"]["mean"] == pytest.approx([np.mean(_valid(arrays, train, k)) for k in range(10)])
    assert stats["normalize"]["std"] == pytest.approx([np.std(_valid(arrays, train, k)) for k in range(10)])
    # Another split on request.
    val = compute_stats(tmp_path, frame, split="val")
    assert val["chips"] == 1
    _check_entry(val["bands"][3], _valid(arrays, ["v"], 3))


def test_a_time_series_gets_statistics_per_band_and_date(tmp_path):
    """Real two-date 10 m stack (R, G, B, NIR of 2021-06-17, then of 2021-09-25), written bin-major."""
    path = shared_data("sentinel2", "austria_T33UUP_2021_rgbn_2dates.tif")
    with rasterio.open(path) as src:
        stack = src.read()
    dates, bands = ("2021-06-17", "2021-09-25"), ("B04", "B03", "B02", "B08")
    descriptions = [f"{d} {b}" for d in dates for b in bands]
    arrays = {f"t{i}": stack[:, 40 * i:40 * i + 32, 50 * i:50 * i + 48].copy() for i in range(4)}
    arrays["t1"][5, :8] = 0  # 2021-09-25 B03: a cloud masked out of that date only
    splits = {"t0": "train", "t1": "train", "t2": "train", "t3": "test"}
    stats = compute_stats(tmp_path, _folder(tmp_path, arrays, splits, descriptions))
    assert [(b["date"], b["band"]) for b in stats["bands"]] == [(d, b) for d in dates for b in bands]
    train = ["t0", "t1", "t2"]
    for k, entry in enumerate(stats["bands"]):
        _check_entry(entry, _valid(arrays, train, k))
    assert stats["bands"][5]["count"] == 3 * 32 * 48 - 8 * 48
    # pooled: each band over both dates.
    assert [p["band"] for p in stats["pooled"]] == list(bands)
    for j, entry in enumerate(stats["pooled"]):
        _check_entry(entry, np.concatenate([_valid(arrays, train, j), _valid(arrays, train, 4 + j)]))
        assert entry["date"] is None
    assert stats["normalize"]["bands"] == descriptions
    assert parse_band_description("2021-06-17 B04") == ("2021-06-17", "B04")
    assert parse_band_description("B8A") == (None, "B8A")


def test_summarise_matches_numpy_for_tiny_and_skewed_samples():
    rng = np.random.default_rng(7)
    samples = [np.array([5], np.uint16), np.array([3, 65535], np.uint16), np.array([1, 1, 1, 2], np.uint16),
               rng.integers(1, 65536, 1001).astype(np.uint16), rng.geometric(0.01, 5000).astype(np.uint16)]
    for values in samples:
        _check_entry(summarise(np.bincount(values, minlength=2**16)), values)
    empty = summarise(np.zeros(2**16, np.int64))
    assert empty["count"] == 0 and empty["mean"] is None and empty["p98"] is None


def test_write_stats_publishes_the_file_whole_and_none_without_train_chips(tmp_path, s2_chips):
    arrays, splits = s2_chips
    frame = _folder(tmp_path, arrays, splits)
    stats = write_stats(tmp_path, frame)
    on_disk = json.loads((tmp_path / STATS_NAME).read_text())
    assert on_disk == json.loads(json.dumps(stats)) and on_disk["chips"] == 3
    assert read_stats(tmp_path) == on_disk == read_stats(tmp_path / STATS_NAME)
    assert not list(tmp_path.glob(".tmp~*"))
    # No train chip: nothing to describe, and the stale file goes.
    assert write_stats(tmp_path, frame.assign(split="val")) is None
    assert not (tmp_path / STATS_NAME).exists()
    with pytest.raises(InputDataError, match="compute the statistics first"):
        read_stats(tmp_path)
    (tmp_path / STATS_NAME).write_text('{"bands": []}')
    with pytest.raises(InputDataError, match="not a version 1"):
        read_stats(tmp_path)


def test_missing_or_foreign_images_are_clear_errors(tmp_path, s2_chips):
    arrays, splits = s2_chips
    frame = _folder(tmp_path, arrays, splits)
    (tmp_path / "images" / "b.tif").unlink()
    with pytest.raises(InputDataError, match=r"images/b.tif is listed .* missing.*cropchips index"):
        compute_stats(tmp_path, frame)
    _write(tmp_path / "images" / "b.tif", arrays["b"].astype(np.float32), S2_BANDS)
    with pytest.raises(InputDataError, match="not uint16"):
        compute_stats(tmp_path, frame)
    (tmp_path / "images" / "b.tif").write_bytes(b"not a tiff")
    with pytest.raises(InputDataError, match="not a readable GeoTIFF"):
        compute_stats(tmp_path, frame)
    with pytest.raises(InputDataError, match="lacks the column"):
        compute_stats(tmp_path, frame.drop(columns=["split"]))


def test_statistics_of_chips_in_an_object_store_equal_the_folders(tmp_path, s2_chips, s3_bucket):
    arrays, splits = s2_chips
    frame = _folder(tmp_path, arrays, splits)
    url = f"s3://{s3_bucket}/dataset"
    store = open_storage(url)
    for rel in frame["image"]:
        store.write_bytes(rel, (tmp_path / rel).read_bytes())
    stats = write_stats(url, frame)
    assert stats == compute_stats(tmp_path, frame)
    assert store.read_json(STATS_NAME) == json.loads(json.dumps(stats))
    assert read_stats(f"{url}/{STATS_NAME}")["chips"] == 3
