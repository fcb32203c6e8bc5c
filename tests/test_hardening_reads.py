"""What a worker opens and how much it reads: GeoTIFF-only scene files, a parsed href allow-list,
decompression bombs and absurd cells refused before reading, and --max-scenes chosen on SCL alone.

Everything runs against real files and real HTTP servers (cropchips.testing.cog_server): the VRTs, bombs
and redirects are crafted here, the scenes are the real S2A_29RKH COGs (downsampled 10x, see
../shared/data/README.md) or cut from them. The several dates of one place that --max-scenes needs
are derived from that one real scene (its pixels offset per date, clouds painted into its SCL),
because the reference data holds no two Sentinel-2 dates of one place.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import REPO, shared_data
from rasterio.windows import from_bounds
from shapely.geometry import box

from cropchips.testing.cog_server import CogServer
from cropchips.raster.composite import clear_mask
from cropchips.errors import ConfigError, InputDataError, MessageError
from cropchips.sources.hrefs import HrefPolicy
from cropchips.queue.messages import Cell, Task
from cropchips.sources.sentinel2 import BANDS, SCL, Sentinel2L2A
from cropchips.processing import ProcessingOptions, TaskProcessor
from cropchips.spec import DatasetSpec
from helpers import SpecProcessor
from cropchips.raster.grid import TargetGrid, cell_grid
from cropchips.raster.read import (OpenDatasets, check_scene_file, clearest_first, grid_origin, read_band,
                               read_clear_fractions, read_stack)

SENTINEL2 = Sentinel2L2A()
RES = 100.0  # the shared COGs are the real ones downsampled 10x: 10 m bands are 100 m pixels
DESERT = Cell(id="c-desert", row=0, col=0, bbox=(-11.6, 24.6, -11.5, 24.7))  # inside the real 29RKH scene
GRID = TargetGrid(epsg=32629, transform=Affine(10, 0, 500000, 0, -10, 4000000), width=64, height=64)


def write_tif(path: Path, data: np.ndarray, **profile) -> Path:
    """A small GeoTIFF on GRID's lattice."""
    base = dict(driver="GTiff", width=data.shape[1], height=data.shape[0], count=1, dtype=data.dtype.name,
                crs="EPSG:32629", transform=GRID.transform)
    with rasterio.open(path, "w", **{**base, **profile}) as dst:
        dst.write(data, 1)
    return path


def vrt_of(source: str) -> str:
    """A VRT whose one band is band 1 of ``source`` (any path or /vsicurl/ URL), on GRID's lattice."""
    return textwrap.dedent(f"""\
        <VRTDataset rasterXSize="64" rasterYSize="64">
          <SRS>EPSG:32629</SRS>
          <GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>
          <VRTRasterBand dataType="UInt16" band="1">
            <SimpleSource><SourceFilename relativeToVRT="0">{source}</SourceFilename>
              <SourceBand>1</SourceBand></SimpleSource>
          </VRTRasterBand>
        </VRTDataset>""")


def raw_vrt_of(path: str) -> str:
    """A VRT whose band is the raw bytes of any file (VRTRawRasterBand): 16 bytes a row, 4 rows."""
    return textwrap.dedent(f"""\
        <VRTDataset rasterXSize="16" rasterYSize="4">
          <VRTRasterBand dataType="Byte" band="1" subClass="VRTRawRasterBand">
            <SourceFilename relativetoVRT="0">{path}</SourceFilename>
            <ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset><LineOffset>16</LineOffset>
          </VRTRasterBand>
        </VRTDataset>""")


@pytest.fixture
def planted(tmp_path):
    """A --local-scenes-dir holding two VRTs named like band files: B02.tif reads a GeoTIFF outside
    the folder (all 4242), SCL.tif the raw bytes of a secret file outside it."""
    scenes, outside = tmp_path / "scenes", tmp_path / "outside"
    scenes.mkdir()
    outside.mkdir()
    secret_tif = write_tif(outside / "secret.tif", np.full((64, 64), 4242, dtype="uint16"))
    (outside / "secret.txt").write_text("SECRET-0123456789-SECRET-0123456789-SECRET-0123456789-SECRET\n")
    (scenes / "B02.tif").write_text(vrt_of(str(secret_tif)))
    (scenes / "SCL.tif").write_text(raw_vrt_of(str(outside / "secret.txt")))
    policy = HrefPolicy(local_dirs=(scenes.resolve(),))
    return {"B02": policy.check(str(scenes / "B02.tif")), "SCL": policy.check(str(scenes / "SCL.tif"))}


# ----------------------------------------------------------------------------- 3. GeoTIFF only


def test_a_vrt_named_b02_in_the_local_scenes_dir_is_refused_everywhere_it_could_be_opened(planted):
    href = planted["B02"]  # the href policy lets it through: it is a file inside the folder
    for read in (lambda: grid_origin(href, "B02"),
                 lambda: read_band(href, "B02", GRID),
                 lambda: read_band(href, "B02", GRID, OpenDatasets(8 * 2**20))):
        with pytest.raises(InputDataError, match=rf"{re.escape(href)} is not a GeoTIFF.*VRT or any other format"):
            read()


def test_a_vrt_raw_band_reading_a_local_file_is_refused(planted):
    for datasets in (None, OpenDatasets(8 * 2**20)):
        with pytest.raises(InputDataError, match=rf"{re.escape(planted['SCL'])} is not a GeoTIFF"):
            read_band(planted["SCL"], "SCL", GRID, datasets, categorical=True)


def test_a_task_with_a_planted_vrt_fails_for_good_naming_the_href(sample_area, sample_task, planted, tmp_path):
    """Through the whole task: a final failure (a ``failed`` result, so the task is dead-lettered),
    not a transient one that would be retried."""
    scene = sample_task.scenes[0]
    task = replace(sample_task, task_id=sample_task.task_id + "-vrt",
                   scenes=(replace(scene, assets={**scene.assets, "B03": planted["B02"]}), *sample_task.scenes[1:]))
    result = SpecProcessor("vrt@test", output_dir=tmp_path / "out", gpkg=str(sample_area.gpkg), layer=sample_area.layer,
                           chip_size=64, hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),
                                                                      Path(planted["B02"]).parent))).process(task)
    assert result.status == "failed" and f"{planted['B02']} is not a GeoTIFF" in result.error


@pytest.fixture
def outside_server(tmp_path):
    """A second server, not in the allow-list, holding a GeoTIFF and a secret."""
    root = tmp_path / "outside-root"
    root.mkdir()
    write_tif(root / "other.tif", np.full((64, 64), 4242, dtype="uint16"))
    with CogServer(root) as server:
        yield server


def test_a_vrt_served_as_b02_is_refused_and_its_sources_are_never_fetched(tmp_path, outside_server):
    root = tmp_path / f"root-{uuid.uuid4().hex[:8]}"  # a unique URL: GDAL caches by URL per process
    root.mkdir()
    (root / "B02.tif").write_text(vrt_of(f"/vsicurl/{outside_server.href('other.tif')}"))
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-0123456789-SECRET-0123456789-SECRET-0123456789-SECRET\n")
    (root / "SCL.tif").write_text(raw_vrt_of(str(secret)))
    with CogServer(root) as server:
        policy = HrefPolicy.from_options(server.url, None)
        for band in ("B02", "SCL"):
            href = policy.check(server.href(f"{band}.tif"))
            with pytest.raises(InputDataError, match=rf"{re.escape(href)} is not a GeoTIFF"):
                read_band(href, band, GRID)
    assert outside_server.stats.requests == 0


# ----------------------------------------------------------------------------- 4. the href allow-list


ALLOWED = "https://cogs.example.com,http://127.0.0.1:8080/scenes,s3://bucket/l2a"


@pytest.mark.parametrize("href, expected", [
    ("https://cogs.example.com/T29/B02.tif", "https://cogs.example.com/T29/B02.tif"),
    ("HTTPS://COGS.Example.COM:443/T29/B02.tif", "https://cogs.example.com/T29/B02.tif"),  # case, default port
    ("https://cogs.example.com/T29/./B02.tif?sig=abc", "https://cogs.example.com/T29/B02.tif?sig=abc"),
    ("http://127.0.0.1:8080/scenes/x/B02.tif", "http://127.0.0.1:8080/scenes/x/B02.tif"),
    ("http://127.0.0.1:8080/scenes", "http://127.0.0.1:8080/scenes"),  # the prefix itself
    ("s3://bucket/l2a/T29/B02.tif", "s3://bucket/l2a/T29/B02.tif"),
    ("s3://BUCKET/l2a/B02.tif", "s3://bucket/l2a/B02.tif"),
])
def test_allowed_hrefs_come_back_normalised(href, expected):
    assert HrefPolicy.from_options(ALLOWED, None).check(href) == expected


@pytest.mark.parametrize("href, needle", [
    ("https://cogs.example.com.evil.net/B02.tif", "is not allowed"),  # another host that starts the same
    ("https://cogs.example.com@evil.net/B02.tif", "user info"),  # evil.net is the host
    ("https://user:pw@cogs.example.com/B02.tif", "user info"),
    ("https://cogs.example.com:8443/B02.tif", "is not allowed"),  # another port
    ("http://cogs.example.com/B02.tif", "is not allowed"),  # another scheme
    ("http://127.0.0.1:8080/scenesX/B02.tif", "is not allowed"),  # not on a '/' boundary
    ("http://127.0.0.1:8081/scenes/B02.tif", "is not allowed"),
    ("http://127.0.0.1/scenes/B02.tif", "is not allowed"),  # port 80, not 8080
    ("http://localhost:8080/scenes/B02.tif", "is not allowed"),  # hosts are compared, not resolved
    ("s3://bucket/l2ab/B02.tif", "is not allowed"),
    ("s3://bucket.evil/l2a/B02.tif", "is not allowed"),
    ("https://cogs.example.com/a/../../etc/B02.tif", "contains '..'"),
    ("http://127.0.0.1:8080/scenes/%2e%2e/private/B02.tif", "percent-encoded"),
    ("http://127.0.0.1:8080/scenes/%2E%2E%2Fprivate/B02.tif", "percent-encoded"),
    ("http://127.0.0.1:8080/scenes/..%2fprivate/B02.tif", "percent-encoded"),
    ("https://cogs.example.com/a%00/B02.tif", "percent-encoded"),
    ("https://cogs.example.com\\@evil.net/B02.tif", "backslash"),
    ("https://cogs.example.com/a\\..\\B02.tif", "backslash"),
    ("https://cogs.example.com/B 02.tif", "whitespace"),
    ("https://cogs.example.com/B02.tif\r\nHost: evil.net", "control characters"),
    ("https://cogs.example.com\t/B02.tif", "control characters"),
    ("https://cogs.example.com/B02.tif#x", "fragment"),
    ("https://cogs.exаmple.com/B02.tif", "non-ASCII"),  # a Cyrillic 'а'
    ("ftp://cogs.example.com/B02.tif", "https://, http:// or s3://"),
    ("https://cogs.example.com:99999/B02.tif", "invalid port"),
    ("/vsicurl/https://evil.net/B02.tif", "local file href"),  # no --local-scenes-dir: no local paths
])
def test_crafted_hrefs_are_refused(href, needle):
    with pytest.raises(MessageError, match=re.escape(needle)):
        HrefPolicy.from_options(ALLOWED, None).check(href)


def test_gdal_virtual_paths_are_refused_even_under_an_allowed_folder(tmp_path):
    with pytest.raises(MessageError, match="virtual file system"):
        HrefPolicy(local_dirs=(Path("/"),)).check("/vsicurl/https://evil.net/B02.tif")


@pytest.mark.parametrize("prefix", ["cogs.example.com", "ftp://cogs.example.com/", "https://", "https://u@h/",
                                    "https://h/a/../b/", "https://h/?token=1"])
def test_unusable_prefixes_are_a_config_error(prefix):
    with pytest.raises(ConfigError, match=re.escape(prefix)):
        HrefPolicy.from_options(prefix, None)


class _Redirector(BaseHTTPRequestHandler):
    """Answers every request with a 302 to ``target`` + the same path."""

    target = ""
    requests: list[str] = []

    def do_HEAD(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's names)
        self._redirect()

    def do_GET(self) -> None:  # noqa: N802
        self._redirect()

    def _redirect(self) -> None:
        type(self).requests.append(self.path)
        self.send_response(302)
        self.send_header("Location", self.target + self.path.removeprefix("/allowed"))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_gdal_follows_a_redirect_to_another_port_which_no_href_check_can_see(tmp_path):
    """Not a fix: a fact the README's advice rests on. GDAL 3.10 (what rasterio 1.4 ships) has no
    option to stop curl following redirects, so an allowed server that answers 302 sends the read
    to any host: only an egress firewall or a proxy stops that. If this starts failing, a GDAL
    upgrade changed it: see whether redirects can now be turned off in GDAL_OPTIONS."""
    root = tmp_path / f"target-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    write_tif(root / "B02.tif", np.full((64, 64), 777, dtype="uint16"), tiled=True, blockxsize=32, blockysize=32)
    with CogServer(root) as target:
        handler = type("Redirector", (_Redirector,), {"target": target.url, "requests": []})
        redirector = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=redirector.serve_forever, daemon=True).start()
        try:
            allowed = f"http://127.0.0.1:{redirector.server_port}/allowed"
            href = HrefPolicy.from_options(allowed, None).check(f"{allowed}/B02.tif")
            band = read_band(href, "B02", GRID)
        finally:
            redirector.shutdown()
            redirector.server_close()
        assert (band == 777).all()
        assert handler.requests and target.stats.file("B02.tif").requests > 0  # read from the other port


# ----------------------------------------------------------------------------- 5a. bombs and odd files


BOMB_READ = """
import resource, sys
# A safety net: today's code would allocate 2 GiB here; under this limit it fails instead.
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
sys.path.insert(0, sys.argv[2])
from affine import Affine
from cropchips.raster.grid import TargetGrid
from cropchips.raster.read import read_band
grid = TargetGrid(epsg=32629, transform=Affine(10, 0, 500000, 0, -10, 4000000), width=700, height=700)
try:
    read_band(sys.argv[1], "B02", grid)
    print("READ")
except Exception as exc:
    print(type(exc).__name__, exc)
# VmHWM, the peak resident size of this process image (ru_maxrss would include the forking parent's).
print("HWM_KIB", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def sparse_tif(path: Path, width: int, height: int, block: int, dtype: str = "uint16") -> Path:
    """A GeoTIFF with no tile written (SPARSE_OK): a few hundred bytes on disk, whatever its size."""
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype=dtype, tiled=True,
                       blockxsize=block, blockysize=block, compress="deflate", sparse_ok=True, crs="EPSG:32629",
                       transform=GRID.transform):
        pass
    return path


def test_a_tile_bomb_is_refused_before_any_read_and_without_allocating(tmp_path):
    bomb = sparse_tif(tmp_path / "B02.tif", 32768, 32768, block=32768)
    assert bomb.stat().st_size < 4096  # 2 GiB of pixels once decoded: one 32768 x 32768 tile
    out = subprocess.run([sys.executable, "-c", BOMB_READ, str(bomb), str(REPO)], capture_output=True, text=True,
                         timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines and lines[0].startswith("InputDataError"), out.stdout + out.stderr
    assert str(bomb) in lines[0] and "blocks (tiles or strips) are 32768 x 32768 px" in lines[0]
    assert int(lines[-1].split()[1]) < 400 * 1024  # KiB: the 2 GiB block was never allocated


@pytest.mark.parametrize("name, make, needle", [
    ("huge", lambda p: sparse_tif(p, 100_001, 512, block=512), "100001 x 512 px, over 100000 px a side"),
    ("float", lambda p: write_tif(p, np.ones((64, 64), dtype="float32")), "pixel type is float32"),
    ("int16", lambda p: write_tif(p, np.ones((64, 64), dtype="int16")), "pixel type is int16"),
])
def test_files_no_sentinel2_band_looks_like_are_refused_naming_the_href(tmp_path, name, make, needle):
    path = make(tmp_path / f"{name}.tif")
    for read in (lambda: grid_origin(str(path)), lambda: read_band(str(path), "B02", GRID)):
        with pytest.raises(InputDataError, match=rf"{re.escape(str(path))} is refused: .*{re.escape(needle)}"):
            read()


def test_real_and_full_size_sentinel2_files_pass_the_checks_with_room(tmp_path):
    folder = shared_data("sentinel2", "S2A_29RKH_20200219_0_L2A")
    shaped = [sparse_tif(tmp_path / "B04.tif", 10980, 10980, block=1024),  # a real 10 m COG's shape
              sparse_tif(tmp_path / "SCL.tif", 5490, 5490, block=1024, dtype="uint8"),
              sparse_tif(tmp_path / "big.tif", 20000, 20000, block=4096)]  # the largest block allowed
    for path in [*sorted(folder.glob("*.tif")), *shaped]:
        with rasterio.open(path) as src:
            check_scene_file(src, str(path))  # raises if refused


# ----------------------------------------------------------------------------- 5c. scenes chosen on SCL


# The derived dates: (clouds painted over this share of the cell's rows in the SCL, the bands hold data).
DATES = {
    "20200219": (0.0, True),  # A: clear
    "20200220": (0.0, False),  # E: clear SCL but all-zero bands: a full read never uses it
    "20200221": (0.3, True),  # B
    "20200222": (0.6, True),  # C
    "20200223": (0.1, True),  # D
    "20200224": (None, True),  # F: SCL all nodata
}
CHOSEN = ("20200219", "20200223")  # with --max-scenes 2: the two clearest of the scenes that have data


@pytest.fixture(scope="module")
def derived(real_scene, tmp_path_factory):
    """Six dates cut from the real 29RKH COGs around DESERT (each date's DNs offset by 10 x its
    number, so that which dates are used shows in the pixels), and three fields to chip."""
    out = tmp_path_factory.mktemp("derived")
    grid = cell_grid(DESERT, 32629, grid_origin(real_scene.assets["B02"]), RES, margin_px=5)
    left, bottom, right, top = grid.bounds
    bounds = (left - 2000, bottom - 2000, right + 2000, top + 2000)  # on the 200 m lattice of the 20 m bands
    for k, (date, (cloud, has_bands)) in enumerate(DATES.items()):
        (out / date).mkdir()
        for band in (*BANDS, SCL):
            with rasterio.open(real_scene.assets[band]) as src:
                window = from_bounds(*bounds, transform=src.transform)
                assert all(abs(v - round(v)) < 1e-6 for v in (window.col_off, window.row_off, window.width,
                                                                window.height))
                window = window.round_offsets().round_lengths()
                data = src.read(1, window=window)
                profile = dict(src.profile, width=data.shape[1], height=data.shape[0], blockxsize=64,
                               blockysize=64, transform=src.window_transform(window))
            if band == SCL:
                if cloud is None:
                    data[:] = 0
                else:
                    # Cloud (high probability) over the top rows of the cell itself, below the 2 km margin.
                    margin = round(2000 / src.transform.a)
                    data[margin: margin + round(cloud * (data.shape[0] - 2 * margin))] = 9
            elif not has_bands:
                data[:] = 0
            else:
                data = np.where(data > 0, data + 10 * k, 0).astype("uint16")
            with rasterio.open(out / date / f"{band}.tif", "w", **profile) as dst:
                dst.write(data, 1)
    fields = gpd.GeoDataFrame({"EC_hcat_c": ["3301010100", "3303050000", "3301110000"],
                               "EC_hcat_n": ["common_soft_wheat", "olive_plantations", "fallow_land_not_crop"]},
                              geometry=[box(-11.56 + 0.02 * i, 24.64, -11.55 + 0.02 * i, 24.65) for i in range(3)],
                              crs="EPSG:4326").to_crs("EPSG:32629")
    fields.to_file(out / "fields.gpkg", layer="desert", driver="GPKG")
    return {"root": out, "gpkg": out / "fields.gpkg", "grid": grid, "template": real_scene}


@pytest.fixture
def served(derived, tmp_path):
    """The derived dates behind a fresh COG server, under a folder name unique to the test (GDAL
    caches what it fetched by URL for the whole process): scenes, server and how to count reads."""
    root = tmp_path / "root"
    unique = root / uuid.uuid4().hex[:8]
    for date in DATES:
        (unique / date).mkdir(parents=True)
        for path in (derived["root"] / date).iterdir():
            os.link(path, unique / date / path.name)
    with CogServer(root) as server:
        scenes = tuple(replace(derived["template"], id=f"S2A_29RKH_{date}_0_L2A", datetime=f"{date[:4]}-{date[4:6]}-"
                               f"{date[6:]}T11:00:00Z", assets={band: server.href(f"{unique.name}/{date}/{band}.tif")
                                                                for band in (*BANDS, SCL)})
                       for date in DATES)

        def requests(date: str, band: str) -> int:
            return server.stats.file(f"{unique.name}/{date}/{band}.tif").requests

        yield {"scenes": scenes, "server": server, "requests": requests, "gpkg": derived["gpkg"],
               "grid": derived["grid"], "template": derived["template"]}


def processor(served, out: Path, **over) -> TaskProcessor:
    settings = dict(output_dir=out, gpkg=str(served["gpkg"]), layer="desert", resolution=RES, chip_size=8,
                    min_clear_fraction=0.0, hrefs=HrefPolicy.from_options(served["server"].url, None))
    return SpecProcessor("hr@test", **{**settings, **over})


def task(scenes, suffix: str) -> Task:
    return Task(run_id="run-hr", task_id=f"t-{suffix}", cell=DESERT, scenes=tuple(scenes), spec=DatasetSpec())


def chip_pixels(out: Path, result) -> list[tuple[str, np.ndarray, np.ndarray, Affine]]:
    pixels = []
    for chip in result.chips:
        with rasterio.open(out / chip.image) as img, rasterio.open(out / chip.mask) as mask:
            pixels.append((chip.name, img.read(), mask.read(), img.transform))
    return pixels


def test_clearest_first_ranks_like_a_stable_sort_and_skips_scenes_without_scl():
    assert clearest_first([0.5, None, 0.9, 0.5, 0.9, 1.0, None]) == [5, 2, 4, 0, 3]
    assert clearest_first([None, None]) == []


def test_clear_fractions_from_scl_alone_equal_those_of_a_full_stack(served):
    scenes, grid = served["scenes"], served["grid"]
    fractions = read_clear_fractions(scenes, grid, SENTINEL2)
    stack = read_stack(scenes, grid, SENTINEL2)
    full = clear_mask(stack.quality).reshape(len(scenes), -1).mean(axis=1)  # the ranking a full read made
    assert fractions[-1] is None  # date F: SCL all nodata
    assert fractions[:-1] == [float(f) for f in full[:-1]]
    assert fractions[0] == fractions[1] == 1.0 > fractions[4] > fractions[2] > fractions[3]


@pytest.mark.parametrize("temporal", ["median", "stack"])
def test_max_scenes_reads_only_scl_of_the_scenes_it_leaves_out_and_gives_the_same_chips(served, tmp_path,
                                                                                         temporal):
    scenes = served["scenes"]
    chosen = processor(served, tmp_path / "chosen", max_scenes=2, composite=temporal).process(
        task(scenes, f"max2-{temporal}"))
    assert chosen.status == "ok" and len(chosen.chips) == 3, chosen.error
    assert chosen.scenes_used == tuple(f"S2A_29RKH_{d}_0_L2A" for d in CHOSEN)
    for date in DATES:
        assert served["requests"](date, SCL) > 0  # every scene is ranked on its SCL
    for date in ("20200221", "20200222", "20200224"):  # B, C (too cloudy) and F (no SCL data)
        assert all(served["requests"](date, band) == 0 for band in BANDS), date
    # The same chips, pixel for pixel, as reading everything of exactly the scenes chosen.
    only = [s for s in scenes if s.id in chosen.scenes_used]
    full = processor(served, tmp_path / "full", composite=temporal).process(task(only, f"all-{temporal}"))
    assert full.scenes_used == chosen.scenes_used
    got, expected = chip_pixels(tmp_path / "chosen", chosen), chip_pixels(tmp_path / "full", full)
    assert [g[0] for g in got] == [e[0] for e in expected]
    for (_, image, mask, transform), (_, image2, mask2, transform2) in zip(got, expected):
        assert transform == transform2 and np.array_equal(mask, mask2) and np.array_equal(image, image2)
    # And the pixels are those of dates A (the real DNs) and D (the real DNs + 40), from the real B04.
    b04, differences = BANDS.index("B04"), set()
    with rasterio.open(served["template"].assets["B04"]) as src:
        for _, image, _, transform in got:
            window = from_bounds(*rasterio.transform.array_bounds(8, 8, transform), transform=src.transform)
            real = src.read(1, window=window.round_offsets().round_lengths()).astype(int)
            if temporal == "stack":  # date A's 10 bands, then date D's
                assert np.array_equal(image[b04], real)
                assert np.array_equal(image[len(BANDS) + b04], real + 40)
            else:  # the median of A and D where D is clear (A + 20), A alone under D's clouds
                differences |= set(np.unique(image[b04] - real).tolist())
    assert temporal == "stack" or differences == {20}  # the fields lie south of D's clouds


def test_max_scenes_above_the_usable_count_uses_every_scene_with_data(served, tmp_path):
    result = processor(served, tmp_path, max_scenes=5).process(task(served["scenes"], "max5"))
    assert result.status == "ok", result.error
    assert result.scenes_used == tuple(f"S2A_29RKH_{d}_0_L2A" for d in ("20200219", "20200221", "20200222",
                                                                          "20200223"))


# ----------------------------------------------------------------------------- 5b. the memory budget


BUDGET_MESSAGE = (r"cell c-desert needs ~\d+ MiB for {n} scenes on a 116x106 grid, over --max-task-memory-mb {mb}; "
                  r"use smaller cells \(--grid-step\) or fewer scenes \(--max-scenes\)")


def test_a_task_over_the_memory_budget_fails_for_good_before_any_band_is_read(served, tmp_path):
    assert (served["grid"].height, served["grid"].width) == (124, 114)  # the scenes' grid: 4 px wider a side
    # The worker's grid is the cell and one pixel (116 x 106): (6 scenes x 48 bytes + 64 bytes) a pixel, 4.1 MiB.
    result = processor(served, tmp_path, max_task_memory_mb=4).process(task(served["scenes"], "budget"))
    assert result.status == "failed" and re.fullmatch(BUDGET_MESSAGE.format(n=6, mb=4), result.error), result.error
    assert all(served["requests"](date, band) == 0 for date in DATES for band in (SCL, "B04", "B12"))
    fits = processor(served, tmp_path / "fits", max_task_memory_mb=5).process(task(served["scenes"], "ok"))
    assert fits.status == "ok", fits.error


def test_the_budget_applies_to_the_scenes_max_scenes_keeps(served, tmp_path):
    scenes = served["scenes"]
    # One scene needs (48 + 64) x 116 x 106 bytes = 1.3 MiB: over 1 MiB, refused before the SCL pass.
    tiny = processor(served, tmp_path / "tiny", max_scenes=4, max_task_memory_mb=1).process(task(scenes, "t1"))
    assert tiny.status == "failed" and re.fullmatch(BUDGET_MESSAGE.format(n=1, mb=1), tiny.error), tiny.error
    assert all(served["requests"](date, SCL) == 0 for date in DATES)
    # Four scenes need 3.002 MiB: over 3 MiB, refused after ranking on SCL, before any other band.
    four = processor(served, tmp_path / "four", max_scenes=4, max_task_memory_mb=3).process(task(scenes, "t4"))
    assert four.status == "failed" and re.fullmatch(BUDGET_MESSAGE.format(n=4, mb=3), four.error), four.error
    assert all(served["requests"](date, SCL) > 0 for date in DATES)
    assert all(served["requests"](date, "B04") == 0 for date in DATES)
    # Three scenes (2.4 MiB) fit: what counts is the scenes read, 3 of the 6.
    three = processor(served, tmp_path / "three", max_scenes=3, max_task_memory_mb=3).process(task(scenes, "t3"))
    assert three.status == "ok", three.error


def test_max_task_memory_mb_is_a_worker_flag_with_an_env_twin():
    import worker

    assert worker.parse_args(["1"], env={})[0].max_task_memory_mb == 4096
    assert worker.parse_args(["1", "--max-task-memory-mb", "512"], env={})[0].max_task_memory_mb == 512
    assert worker.parse_args(["1"], env={"CROPCHIPS_MAX_TASK_MEMORY_MB": "256"})[0].max_task_memory_mb == 256
    with pytest.raises(ConfigError, match="--max-task-memory-mb"):
        ProcessingOptions(output_dir="/tmp", gpkg="x.gpkg", max_task_memory_mb=0)


def test_the_estimate_covers_what_a_task_really_allocates(served, tmp_path):
    """numpy reports its allocations to tracemalloc: the peak of a whole task (read, composite,
    rasterize, write) stays under the estimate the budget refuses by, and is of its order when the
    whole cell is read (``read_whole_cell``); reading the chips' box only, it is a fraction of it."""
    import tracemalloc

    from cropchips.raster.read import task_memory_bytes

    scenes = [s for s in served["scenes"] if s.id.split("_")[2] in ("20200219", "20200221", "20200222", "20200223")]
    grid = cell_grid(DESERT, 32629, grid_origin(scenes[0].assets["B02"]), 20.0, margin_px=9)
    peaks = {}
    for whole in (True, False):
        worker = processor(served, tmp_path / str(whole), resolution=20.0, chip_size=16, read_whole_cell=whole)
        tracemalloc.start()
        try:
            result = worker.process(task(scenes, "mem"))
            peaks[whole] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert result.status == "ok" and result.chips, result.error
    estimate = task_memory_bytes(len(scenes), grid)
    assert 0.5 * estimate < peaks[True] <= estimate, (peaks, estimate)
    assert peaks[False] < 0.5 * peaks[True], (peaks, estimate)
