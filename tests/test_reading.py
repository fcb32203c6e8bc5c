"""Reading real Sentinel-2 COGs onto a cell's grid: alignment, exact copies, 20 m upsampling, nodata."""


import numpy as np
import pytest
import rasterio
from rasterio.windows import from_bounds

from cropchips.messages import BANDS, Cell
from cropchips.reading import TargetGrid, cell_grid, choose_epsg, grid_origin, read_band, read_stack, utm_epsg

RES = 100.0  # the shared COGs are the real ones downsampled 10x: 10 m bands are 100 m pixels


@pytest.fixture(scope="module")
def scene(real_scene):
    return real_scene


CELL = Cell(id="c", row=0, col=0, bbox=(-11.6, 24.6, -11.5, 24.7))


def test_utm_zone_of_cell_centre():
    assert utm_epsg(-5.78, 37.22) == 32630  # Seville (the seed's EPSG:32630)
    assert utm_epsg(-11.55, 24.65) == 32629
    assert utm_epsg(-39.0, -5.0) == 32724
    assert utm_epsg(179.99, 0.0) == 32660


def test_grid_is_aligned_to_the_scene_and_covers_the_cell_with_margin(scene):
    epsg = choose_epsg(CELL, [scene])
    assert epsg == 32629
    origin = grid_origin(scene.assets["B02"])
    grid = cell_grid(CELL, epsg, origin, RES, margin_px=5)
    left, bottom, right, top = grid.bounds
    # Whole pixels from the scene's own origin: nothing is shifted.
    assert ((left - origin[0]) / RES) == pytest.approx(round((left - origin[0]) / RES), abs=1e-9)
    assert ((origin[1] - top) / RES) == pytest.approx(round((origin[1] - top) / RES), abs=1e-9)
    # Covers the cell (transformed to UTM) plus at least the margin.
    from pyproj import Transformer
    minx, miny, maxx, maxy = Transformer.from_crs(4326, epsg, always_xy=True).transform_bounds(*CELL.bbox)
    assert left <= minx - 5 * RES and right >= maxx + 5 * RES
    assert bottom <= miny - 5 * RES and top >= maxy + 5 * RES


def test_same_resolution_band_is_an_exact_copy(scene):
    grid = cell_grid(CELL, 32629, grid_origin(scene.assets["B02"]), RES, margin_px=3)
    ours = read_band(scene.assets["B04"], "B04", grid)
    with rasterio.open(scene.assets["B04"]) as src:
        window = from_bounds(*grid.bounds, transform=src.transform).round_offsets().round_lengths()
        expected = src.read(1, window=window)
    assert ours.dtype == np.uint16 and ours.shape == expected.shape
    assert np.array_equal(ours, expected)


CLOUDY = Cell(id="cloudy", row=0, col=0, bbox=(-11.25, 25.05, -11.0, 25.28))  # has SCL 5, 8, 9 and 10


def test_20m_bands_are_upsampled_bilinear_and_scl_nearest(scene):
    grid = cell_grid(CLOUDY, 32629, grid_origin(scene.assets["B02"]), RES, margin_px=3)
    scl = read_band(scene.assets["SCL"], "SCL", grid)
    with rasterio.open(scene.assets["SCL"]) as src:
        coarse, coarse_transform = src.read(1), src.transform
    # Independent nearest neighbour: the coarse pixel that contains each fine pixel's centre.
    left, _, _, top = grid.bounds
    xs = left + RES * (np.arange(grid.width) + 0.5)
    ys = top - RES * (np.arange(grid.height) + 0.5)
    cols = np.floor((xs - coarse_transform.c) / coarse_transform.a).astype(int)
    rows = np.floor((ys - coarse_transform.f) / coarse_transform.e).astype(int)
    expected = coarse[np.ix_(rows, cols)]
    assert len(np.unique(expected)) >= 3  # the window really has several classes
    assert np.array_equal(scl, expected)
    # Bilinear for reflectance: within the range of the source pixels, smoother than a nearest copy.
    b11 = read_band(scene.assets["B11"], "B11", grid)
    with rasterio.open(scene.assets["B11"]) as src:
        source = src.read(1)[np.ix_(rows, cols)]
    assert b11.dtype == np.uint16
    assert b11.min() >= source.min() and b11.max() <= source.max()
    assert len(np.unique(b11)) > len(np.unique(source))
    assert not np.array_equal(b11, source)


def test_outside_the_scene_is_nodata(scene):
    # A grid straddling the east edge of the tile: the part outside must read as 0, not garbage.
    origin = grid_origin(scene.assets["B02"])
    with rasterio.open(scene.assets["B02"]) as src:
        right = src.bounds.right
    from affine import Affine
    grid = TargetGrid(epsg=32629, transform=Affine(RES, 0, right - 10 * RES, 0, -RES, origin[1] - 100 * RES), width=20,
                      height=5)
    band = read_band(scene.assets["B02"], "B02", grid)
    assert (band[:, 10:] == 0).all() and (band[:, :10] > 0).all()


def test_read_stack_shapes_and_band_order(scene):
    grid = cell_grid(CELL, 32629, grid_origin(scene.assets["B02"]), RES, margin_px=2)
    stack = read_stack([scene, scene], grid, threads=4)
    assert stack.data.shape == (2, len(BANDS), grid.height, grid.width) and stack.data.dtype == np.uint16
    assert stack.scl.shape == (2, grid.height, grid.width) and stack.scl.dtype == np.uint8
    assert np.array_equal(stack.data[0, BANDS.index("B08")], read_band(scene.assets["B08"], "B08", grid))
    assert np.array_equal(stack.data[0], stack.data[1])


def test_missing_file_is_a_clear_error(scene, tmp_path):
    from cropchips.errors import InputDataError
    grid = cell_grid(CELL, 32629, grid_origin(scene.assets["B02"]), RES, margin_px=2)
    with pytest.raises(InputDataError, match="cannot open B02"):
        read_band(str(tmp_path / "nope.tif"), "B02", grid)


def test_transient_read_errors_are_retried_with_backoff_then_reported(monkeypatch, caplog):
    import cropchips.reading as reading
    from rasterio.errors import RasterioIOError

    from cropchips.errors import RetryableError

    sleeps = []
    monkeypatch.setattr(reading.time, "sleep", sleeps.append)
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise RasterioIOError("CURL error: Empty reply from server")
        return "pixels"

    assert reading.with_read_retries(flaky, "B04", "https://x/B04.tif") == "pixels"
    assert len(attempts) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.5
    assert "Empty reply from server" in caplog.text and "retry 1/2" in caplog.text

    def broken():
        raise RasterioIOError("HTTP response code: 503")

    with pytest.raises(RetryableError, match="failed 3 times: HTTP response code: 503"):
        reading.with_read_retries(broken, "B04", "https://x/B04.tif")
