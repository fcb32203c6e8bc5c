"""Benchmark inputs: sample areas with Earth-Search-like 1024 x 1024-tiled COGs, their tile
index (offsets and byte counts of every tile), the master's options for an area, and a large
synthetic EuroCrops GeoPackage.

Everything generated is deterministic and cached under ``bench/.cache/`` (ignored by git), keyed
by its parameters, so a second run of the harness starts at once.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import from_bounds

from cropchips.demo.sample import CROPS, SampleArea, generate_sample

if TYPE_CHECKING:
    from cropchips.plan.plan import MasterOptions

#: The repository's root (worker.py, the working directory of the programs the harness starts).
REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".cache"

#: Bump when the generated files change in a way the key does not capture.
AREA_VERSION = 1


@dataclass(frozen=True)
class AreaSpec:
    """A synthetic area: ``x_cells`` x ``y_cells`` cells of ``grid_step`` degrees, ``dates`` scenes."""

    x_cells: int = 4
    y_cells: int = 2
    grid_step: float = 0.05
    dates: int = 3
    fields_per_cell: int = 12
    margin_m: float = 3000.0
    blocksize: int = 1024
    """Internal tile size of the COGs (Earth Search's Sentinel-2 COGs use 1024)."""
    seed: int = 0
    start_x: float = -5.80
    start_y: float = 37.20

    @property
    def key(self) -> str:
        return (f"area-v{AREA_VERSION}-{self.x_cells}x{self.y_cells}-s{self.grid_step:g}-d{self.dates}"
                f"-f{self.fields_per_cell}-m{self.margin_m:g}-b{self.blocksize}-seed{self.seed}"
                f"-at{self.start_x:g}_{self.start_y:g}")


def build_area(spec: AreaSpec, cache: Path = CACHE) -> SampleArea:
    """Generate (or reuse from the cache) the sample area of ``spec``, its COGs re-tiled to ``spec.blocksize``."""
    root = cache / spec.key
    done = root / "DONE.json"
    if not done.exists():
        if root.exists():
            shutil.rmtree(root)
        started = time.perf_counter()
        area = generate_sample(root, start_x=spec.start_x, start_y=spec.start_y, grid_step=spec.grid_step,
                               x_cells=spec.x_cells, y_cells=spec.y_cells, dates=spec.dates,
                               margin_m=spec.margin_m, fields_per_cell=spec.fields_per_cell, seed=spec.seed)
        for tif in sorted((area.root / "scenes").glob("*/*.tif")):
            retile(tif, spec.blocksize)
        done.write_text(json.dumps({"spec": asdict(spec), "area": {k: str(v) for k, v in asdict(area).items()},
                                    "seconds": round(time.perf_counter() - started, 1)}, indent=1))
    info = json.loads(done.read_text())["area"]
    return SampleArea(root=Path(info["root"]), gpkg=Path(info["gpkg"]), layer=info["layer"], items=Path(info["items"]),
                      start_x=float(info["start_x"]), start_y=float(info["start_y"]),
                      grid_step=float(info["grid_step"]), x_cells=int(info["x_cells"]), y_cells=int(info["y_cells"]),
                      datetime=info["datetime"], collection=info["collection"], epsg=int(info["epsg"]))


def area_options(area: SampleArea, items: Path, spec: dict[str, Any] | None = None,
                 **options: Any) -> MasterOptions:
    """The master's options for ``area``: its grid, layer, collection and dates, every cell with a field
    (min_polygons 1) and every scene (max_cloud 100) of the local STAC ``items`` file. ``spec`` changes the
    run's dataset spec (chip_size, max_chips_per_cell, ...), ``options`` the master's own (kafka, topics, ...)."""
    from cropchips.plan.plan import MasterOptions
    from cropchips.spec import DatasetSpec

    dataset = DatasetSpec(start_x=area.start_x, start_y=area.start_y, grid_step=area.grid_step,
                          x_cells=area.x_cells, y_cells=area.y_cells, layer=area.layer, min_polygons=1,
                          collection=area.collection, datetime=area.datetime, max_cloud=100.0, **(spec or {}))
    return MasterOptions(gpkg=str(area.gpkg), spec=dataset, stac_api=None, stac_items=str(items), **options)


def retile(path: Path, blocksize: int) -> None:
    """Rewrite a COG in place with ``blocksize`` x ``blocksize`` internal tiles (same compression, overviews kept)."""
    with rasterio.open(path) as src:
        if src.block_shapes[0] == (blocksize, blocksize):
            return
        resampling = "nearest" if src.dtypes[0] == "uint8" else "average"
    tmp = path.with_name(path.name + ".retile.tif")
    rasterio.shutil.copy(path, tmp, driver="COG", blocksize=blocksize, compress="DEFLATE", predictor=2,
                         overview_resampling=resampling, bigtiff="NO")
    tmp.replace(path)


# --------------------------------------------------------------------------- tile index


@dataclass(frozen=True)
class TileIndex:
    """Where the full-resolution tiles of a single-band COG lie in the file."""

    path: str
    size: int
    """File size in bytes."""
    crs: str
    transform: tuple[float, ...]
    width: int
    height: int
    block: tuple[int, int]
    """(rows, cols) of one tile."""
    offsets: np.ndarray
    """(tile rows, tile cols) byte offset of each tile."""
    sizes: np.ndarray
    """(tile rows, tile cols) byte count of each tile."""


@lru_cache(maxsize=4096)
def tile_index(path: str) -> TileIndex:
    """Read TileOffsets/TileByteCounts of band 1 (GDAL's ``TIFF`` metadata domain) from a local COG."""
    with rasterio.open(path) as src:
        by, bx = src.block_shapes[0]
        rows, cols = math.ceil(src.height / by), math.ceil(src.width / bx)
        offsets = np.zeros((rows, cols), dtype="int64")
        sizes = np.zeros((rows, cols), dtype="int64")
        for r in range(rows):
            for c in range(cols):
                offsets[r, c] = int(src.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1) or 0)
                sizes[r, c] = int(src.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1) or 0)
        return TileIndex(path=path, size=Path(path).stat().st_size, crs=src.crs.to_string(),
                         transform=tuple(src.transform)[:6], width=src.width, height=src.height, block=(by, bx),
                         offsets=offsets, sizes=sizes)


def tiles_for_bounds(index: TileIndex, bounds: tuple[float, float, float, float], crs: str) -> set[tuple[int, int]]:
    """Full-resolution tiles of ``index`` that a box (in ``crs``) intersects (20 m files: half the pixels)."""
    from affine import Affine
    from rasterio.warp import transform_bounds

    if crs != index.crs:
        bounds = transform_bounds(crs, index.crs, *bounds, densify_pts=21)
    window = from_bounds(*bounds, transform=Affine(*index.transform))
    eps = 1e-6  # a chip edge on a pixel edge must not pull in the next pixel
    col0 = max(0, math.floor(window.col_off + eps))
    row0 = max(0, math.floor(window.row_off + eps))
    col1 = min(index.width, math.ceil(window.col_off + window.width - eps))
    row1 = min(index.height, math.ceil(window.row_off + window.height - eps))
    if col1 <= col0 or row1 <= row0:
        return set()
    by, bx = index.block
    return {(r, c) for r in range(row0 // by, (row1 - 1) // by + 1) for c in range(col0 // bx, (col1 - 1) // bx + 1)}


def tile_bytes(index: TileIndex, tiles: set[tuple[int, int]]) -> int:
    return int(sum(int(index.sizes[r, c]) for r, c in tiles))


# --------------------------------------------------------------------------- items over HTTP


def serve_items(area: SampleArea, server, path: Path) -> dict[str, str]:
    """Write ``area``'s STAC items with every asset href pointing at ``server``; return URL -> local path."""
    doc = json.loads(area.items.read_text())
    urls = {}
    for item in doc["features"]:
        for asset in item["assets"].values():
            local = asset["href"]
            asset["href"] = server.href(local)
            urls[asset["href"]] = local
    path.write_text(json.dumps(doc))
    return urls


# --------------------------------------------------------------------------- a large GeoPackage


@dataclass(frozen=True)
class ParcelsSpec:
    """``n`` small convex parcels (EPSG:25830) spread over a grid of ``x_cells`` x ``y_cells`` cells."""

    n: int = 1_000_000
    start_x: float = -6.0
    start_y: float = 37.0
    grid_step: float = 0.05
    x_cells: int = 20
    y_cells: int = 20
    seed: int = 0

    @property
    def key(self) -> str:
        return (f"parcels-v1-{self.n}-{self.x_cells}x{self.y_cells}-s{self.grid_step:g}"
                f"-at{self.start_x:g}_{self.start_y:g}-seed{self.seed}")

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        return (self.start_x, self.start_y, self.start_x + self.grid_step * self.x_cells,
                self.start_y + self.grid_step * self.y_cells)


LAYER = "es_synthetic_parcels"


def build_parcels(spec: ParcelsSpec, cache: Path = CACHE) -> tuple[Path, float]:
    """The GeoPackage of ``spec`` (generated once, then cached); returns its path and the generation seconds
    (0 when it came from the cache)."""
    import geopandas as gpd
    import pyogrio
    import shapely
    from pyproj import Transformer

    path = cache / f"{spec.key}.gpkg"
    if path.exists():
        return path, 0.0
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rng = np.random.default_rng(spec.seed)
    n = spec.n
    minx, miny, maxx, maxy = spec.bbox
    # Stored in the order of a coarse grid (municipality by municipality, like real EuroCrops files).
    lon = rng.uniform(minx, maxx, n)
    lat = rng.uniform(miny, maxy, n)
    order = np.lexsort((lon, np.floor((lat - miny) / spec.grid_step), np.floor((lon - minx) / spec.grid_step)))
    lon, lat = lon[order], lat[order]
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:25830", always_xy=True).transform(lon, lat)
    width = rng.uniform(30.0, 150.0, n)
    height = rng.uniform(30.0, 150.0, n)
    angle = rng.uniform(0.0, np.pi, n)
    corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])[None] * np.stack([width, height], 1)[:, None]
    # Small corner moves keep a rectangle convex (at most 10% of its shorter side).
    corners = corners + rng.uniform(-0.1, 0.1, (n, 4, 2)) * np.minimum(width, height)[:, None, None]
    corners = np.concatenate([corners, corners[:, :1]], axis=1)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    xs = corners[..., 0] * cos - corners[..., 1] * sin + np.asarray(x)[:, None]
    ys = corners[..., 0] * sin + corners[..., 1] * cos + np.asarray(y)[:, None]
    geoms = shapely.polygons(np.round(np.stack([xs, ys], -1), 2))
    crop = rng.integers(0, len(CROPS), n)
    frame = gpd.GeoDataFrame(
        {"ID": np.arange(1, n + 1, dtype="int64"),
         "EC_trans_n": np.array([c.trans_name for c in CROPS], dtype=object)[crop],
         "EC_hcat_n": np.array([c.hcat_name for c in CROPS], dtype=object)[crop],
         "EC_hcat_c": np.array([c.code for c in CROPS], dtype=object)[crop]},
        geometry=geoms, crs="EPSG:25830")
    tmp = path.with_name(path.name + ".tmp.gpkg")
    tmp.unlink(missing_ok=True)
    pyogrio.write_dataframe(frame, tmp, layer=LAYER, driver="GPKG")
    tmp.replace(path)
    return path, time.perf_counter() - started
