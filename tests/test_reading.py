"""Reading real Sentinel-2 COGs onto a cell's grid: alignment, exact copies, 20 m upsampling, nodata."""


from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import from_bounds

from cropchips import retry
from cropchips.queue.messages import Cell

from cropchips.sources.sentinel2 import BANDS, Sentinel2L2A
from cropchips.raster.grid import TargetGrid, cell_grid, choose_epsg, utm_epsg
from cropchips.raster.read import grid_origin, read_band, read_stack

SENTINEL2 = Sentinel2L2A()

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


@pytest.mark.parametrize("margin_px", [3, 4])  # the grid starts on an odd, then an even 10 m pixel of the 20 m files
def test_20m_bands_are_upsampled_bilinear_and_scl_nearest(scene, margin_px):
    grid = cell_grid(CLOUDY, 32629, grid_origin(scene.assets["B02"]), RES, margin_px=margin_px)
    scl = read_band(scene.assets["SCL"], "SCL", grid, categorical=True)
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
    stack = read_stack([scene, scene], grid, SENTINEL2, threads=4)
    assert stack.data.shape == (2, len(BANDS), grid.height, grid.width) and stack.data.dtype == np.uint16
    assert stack.quality.shape == (2, grid.height, grid.width) and stack.quality.dtype == np.uint8
    assert np.array_equal(stack.data[0, BANDS.index("B08")], read_band(scene.assets["B08"], "B08", grid))
    assert np.array_equal(stack.data[0], stack.data[1])


def test_missing_file_is_a_clear_error(scene, tmp_path):
    from cropchips.errors import InputDataError
    grid = cell_grid(CELL, 32629, grid_origin(scene.assets["B02"]), RES, margin_px=2)
    with pytest.raises(InputDataError, match="cannot open B02"):
        read_band(str(tmp_path / "nope.tif"), "B02", grid)


def test_transient_read_errors_are_retried_with_backoff_then_reported(monkeypatch, caplog):
    import cropchips.raster.read as reading
    from rasterio.errors import RasterioIOError

    from cropchips.errors import RetryableError

    sleeps = []
    monkeypatch.setattr(retry, "sleep", sleeps.append)
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


# --- 20 m bands: bilinear x2 in numpy on the file's own lattice, checked against GDAL's warper.

def _warped(path, grid, resampling="bilinear"):
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    with rasterio.open(path) as src, WarpedVRT(src, crs=grid.crs, transform=grid.transform, width=grid.width,
                                                height=grid.height, resampling=Resampling[resampling],
                                                src_nodata=0, nodata=0) as vrt:
        return vrt.read(1)


def _bilinear_oracle(path, grid):
    """Bilinear x2 written out from its definition, pixel by pixel in float: each grid pixel's centre in
    the file's pixel coordinates, the four surrounding file pixels weighted by distance, nodata (0) and
    pixels outside the file left out and the rest renormalised; nodata where the pixel under the centre is."""
    with rasterio.open(path) as src:
        native, t = src.read(1).astype(np.float64), src.transform
    x = (grid.transform.c + grid.resolution * (np.arange(grid.width) + 0.5) - t.c) / t.a - 0.5
    y = (t.f - (grid.transform.f - grid.resolution * (np.arange(grid.height) + 0.5))) / -t.e - 0.5
    num = np.zeros((grid.height, grid.width))
    den = np.zeros_like(num)
    for dy in (0, 1):
        for dx in (0, 1):
            r = (np.floor(y).astype(int) + dy)[:, None]
            c = (np.floor(x).astype(int) + dx)[None, :]
            wy = 1 - np.abs(y[:, None] - r)
            wx = 1 - np.abs(x[None, :] - c)
            inside = (r >= 0) & (r < native.shape[0]) & (c >= 0) & (c < native.shape[1])
            v = np.where(inside, native[np.clip(r, 0, native.shape[0] - 1), np.clip(c, 0, native.shape[1] - 1)], 0)
            ok = v > 0
            num += np.where(ok, wx * wy * v, 0)
            den += np.where(ok, wx * wy, 0)
    rc = np.floor(y + 0.5).astype(int)[:, None], np.floor(x + 0.5).astype(int)[None, :]
    inside = (rc[0] >= 0) & (rc[0] < native.shape[0]) & (rc[1] >= 0) & (rc[1] < native.shape[1])
    centre = np.where(inside, native[np.clip(rc[0], 0, native.shape[0] - 1), np.clip(rc[1], 0, native.shape[1] - 1)], 0)
    return np.where(centre > 0, num / np.maximum(den, 1e-12), 0.0)


def _grids(path, offsets):
    """10 m-lattice grids (here 100 m: the COGs are downsampled 10x) at the given (col, row, width, height)
    offsets in grid pixels from the file's corner: even and odd offsets, and grids reaching past every edge."""
    with rasterio.open(path) as src:
        t = src.transform
    return [TargetGrid(epsg=32629, transform=Affine(RES, 0, t.c + RES * col, 0, -RES, t.f - RES * row), width=w, height=h)
            for col, row, w, h in offsets]


OFFSETS = [(0, 0, 256, 192), (1, 1, 255, 193), (301, 177, 400, 333), (-7, -5, 64, 40),
           (2 * 549 - 50, 3, 80, 60), (2 * 549 - 51, 2 * 549 - 41, 90, 70)]


def _check_against_warper_and_oracle(path, grid):
    ours = read_band(str(path), "B11", grid)
    warped = _warped(path, grid)
    exact = _bilinear_oracle(path, grid)
    assert ours.dtype == np.uint16 and ours.shape == (grid.height, grid.width)
    # Nodata exactly where the warper has it: nothing invented, nothing lost.
    assert np.array_equal(ours == 0, warped == 0)
    # Our pixels are the exact bilinear values rounded half up ...
    assert np.array_equal(ours, np.floor(exact + 0.5).astype(np.uint16))
    # ... and the warper's differ by at most 1 DN, only where the exact value is a tie (x.5): its float
    # coordinates put the weights a hair off 1/4 and 3/4, so it rounds some ties down. 1 DN of
    # reflectance is 0.0001, far below Sentinel-2's noise; ties are at most 1/16 of the pixels.
    diff = ours.astype(int) - warped.astype(int)
    assert np.abs(diff).max() <= 1
    ties = np.isclose(exact - np.floor(exact), 0.5)
    assert not (diff != 0)[~ties].any()
    return ours, warped


def test_20m_bilinear_matches_the_warper_on_the_real_cog(scene):
    path = scene.assets["B11"]
    compared = 0
    for grid in _grids(path, OFFSETS):
        ours, _ = _check_against_warper_and_oracle(path, grid)
        compared += int((ours > 0).sum())
    assert compared > 200_000  # the grids really cover data


@pytest.fixture(scope="module")
def holed_b11(scene, tmp_path_factory):
    """The real B11 with nodata as in real scenes: a diagonal swath edge and scattered 0 pixels."""
    with rasterio.open(scene.assets["B11"]) as src:
        profile, data = src.profile, src.read(1)
    rows, cols = np.mgrid[: data.shape[0], : data.shape[1]]
    data = data.copy()
    data[rows + cols < 500] = 0
    data[np.random.default_rng(0).random(data.shape) < 0.02] = 0
    assert (data == 0).mean() > 0.2 and data.min() == 0
    path = tmp_path_factory.mktemp("holes") / "B11.tif"
    profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path


def test_20m_nodata_is_never_blended_into_valid_pixels(holed_b11):
    for grid in _grids(holed_b11, OFFSETS + [(400, 300, 400, 300)]):
        ours, _ = _check_against_warper_and_oracle(holed_b11, grid)
    # The last grid straddles the swath edge and the holes: a valid pixel next to nodata keeps the
    # level of its valid neighbours (a plain bilinear read would pull it towards 0).
    with rasterio.open(holed_b11) as src:
        native = src.read(1)
    t = src.transform
    r0, c0 = int((t.f - grid.transform.f) / t.a), int((grid.transform.c - t.c) / t.a)
    window = native[r0 - 1: r0 + grid.height // 2 + 2, c0 - 1: c0 + grid.width // 2 + 2]
    assert (ours == 0).any() and (ours > 0).any()
    assert ours[ours > 0].min() >= window[window > 0].min()


def test_grids_off_the_files_lattice_go_through_the_warper(scene):
    # Another UTM zone, and the scene's zone shifted by a third of a pixel: neither lies on the file's
    # pixel lattice, so both must give exactly the warper's pixels (nothing read from the wrong place).
    zone28 = cell_grid(CELL, 32628, (0.0, 0.0), RES, margin_px=2)
    shifted = cell_grid(CELL, 32629, grid_origin(scene.assets["B02"]), RES, margin_px=2)
    shifted = TargetGrid(epsg=32629, transform=shifted.transform @ Affine.translation(1 / 3, 0),
                         width=shifted.width, height=shifted.height)
    for grid in (zone28, shifted):
        for band, resampling in (("B04", "nearest"), ("B11", "bilinear"), ("SCL", "nearest")):
            ours = read_band(scene.assets[band], band, grid, categorical=band == "SCL")
            assert (ours > 0).mean() > 0.9
            assert np.array_equal(ours, _warped(scene.assets[band], grid, resampling))


# --- Band files kept open across tasks: shared tiles are fetched and decoded once.

def test_open_datasets_fetch_shared_tiles_once_and_give_the_same_pixels(scene):
    from cropchips.testing.cog_server import CogServer
    from cropchips.raster.read import OpenDatasets

    folder = Path(scene.assets["B02"]).parent
    origin = grid_origin(scene.assets["B02"])
    # Two neighbouring cells whose grids (with margin) share tiles of every band file.
    west = cell_grid(Cell(id="w", row=0, col=0, bbox=(-11.6, 24.6, -11.5, 24.7)), 32629, origin, RES, margin_px=5)
    east = cell_grid(Cell(id="e", row=0, col=1, bbox=(-11.5, 24.6, -11.4, 24.7)), 32629, origin, RES, margin_px=5)
    with CogServer(folder) as server:
        remote = replace(scene, assets={band: server.href(path) for band, path in scene.assets.items()})
        fetched = {}
        stacks = {}
        for label, datasets in (("closed", None), ("kept open", OpenDatasets(64 * 2**20))):
            server.reset_stats()
            stacks[label] = [read_stack([remote], grid, SENTINEL2, threads=4, datasets=datasets) for grid in (west, east)]
            fetched[label] = server.stats.bytes
            if datasets is not None:
                assert len(datasets) == len(scene.assets)  # one handle per band file, reused by the second cell
                datasets.close()
                assert len(datasets) == 0
    for a, b in zip(stacks["closed"], stacks["kept open"]):
        assert np.array_equal(a.data, b.data) and np.array_equal(a.quality, b.quality)
    # Closing every file after reading it fetches the shared tiles (and headers) twice.
    assert fetched["kept open"] < 0.5 * fetched["closed"], fetched


def test_open_datasets_close_the_least_recently_used_and_survive_concurrent_use(scene):
    from cropchips.raster.read import OpenDatasets

    datasets = OpenDatasets(16 * 2**20, max_open=3)
    grid = cell_grid(CELL, 32629, grid_origin(scene.assets["B02"]), RES, margin_px=2)
    for band in ("B02", "B03", "B04", "B08"):
        read_band(scene.assets[band], band, grid, datasets)
    assert len(datasets) == 3
    # The same files read by several threads at once (one scene twice): same pixels as without the cache.
    stack = read_stack([scene, scene, scene], grid, SENTINEL2, threads=6, datasets=datasets)
    expected = read_stack([scene], grid, SENTINEL2, threads=1)
    assert all(np.array_equal(stack.data[i], expected.data[0]) for i in range(3))
    assert len(datasets) == 3
    datasets.close()


def test_a_failed_read_drops_the_kept_file_and_the_retry_reopens_it(scene, tmp_path, monkeypatch):
    import cropchips.raster.read as reading
    from rasterio.errors import RasterioIOError

    from cropchips.raster.read import OpenDatasets

    monkeypatch.setattr(retry, "sleep", lambda s: None)
    datasets = OpenDatasets(16 * 2**20)
    grid = cell_grid(CELL, 32629, grid_origin(scene.assets["B02"]), RES, margin_px=2)
    first = read_band(scene.assets["B02"], "B02", grid, datasets)
    with datasets.dataset(scene.assets["B02"]) as kept:
        pass
    real = reading.read_onto_grid
    calls = []

    def fail_once(src, grid, **kwargs):
        calls.append(src)
        if len(calls) == 1:
            raise RasterioIOError("CURL error: Connection reset by peer")
        return real(src, grid, **kwargs)

    monkeypatch.setattr(reading, "read_onto_grid", fail_once)
    again = read_band(scene.assets["B02"], "B02", grid, datasets)
    assert np.array_equal(again, first)
    assert calls[0] is kept and kept.closed and calls[1] is not kept  # the retry used a fresh handle
    datasets.close()


def test_the_grid_origin_comes_from_the_kept_open_file_that_the_task_then_reads(scene, monkeypatch):
    """A task opens its origin band once: for the grid's origin and for its pixels."""
    import cropchips.raster.read as reading
    from cropchips.raster.read import CogReader

    href = scene.assets["B02"]
    expected = grid_origin(href)
    grid = cell_grid(CELL, 32629, expected, RES, margin_px=2)
    fresh = read_band(href, "B02", grid)
    opened = []
    real_open = reading.open_scene
    monkeypatch.setattr(reading, "open_scene", lambda href, tiles=None: opened.append(href) or real_open(href, tiles))
    reader = CogReader(threads=1, cache_bytes=16 * 2**20)
    assert reader.origin(href, "B02") == expected  # the same corner as a fresh open gives
    ours = reader.bands([scene], grid, SENTINEL2, bands=("B02",), within=None)
    assert np.array_equal(ours[0, 0], fresh)
    assert opened == [href]
    reader.close()


def test_the_pixel_grid_geometry_needs_no_gdal():
    """cropchips.raster.grid is arithmetic only: importing it in a fresh interpreter loads no rasterio."""
    import subprocess
    import sys

    code = "import sys, cropchips.raster.grid; print('rasterio' in sys.modules, 'osgeo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
