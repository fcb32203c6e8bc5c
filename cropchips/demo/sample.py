"""A synthetic sample area for demos and tests: Sentinel-2 L2A COGs, Earth Search STAC items, EuroCrops fields."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import shapely
import shapely.affinity
import shapely.geometry
from affine import Affine
from pyproj import Transformer
from rasterio.features import rasterize

log = logging.getLogger(__name__)

#: Like real scenes of processing baseline >= 04.00, the sample's DNs carry a +1000 offset.
BOA_ADD_OFFSET_DN = 1000

COLLECTION = "sentinel-2-l2a"
FIELDS_CRS = "EPSG:25830"  # ETRS89 / UTM 30N: the national CRS of the Spanish EuroCrops files
SEASON_START = date(2023, 5, 15)
SEASON_END = date(2023, 6, 30)
SNAP_M = 60.0  # scene origins on multiples of 60 m, so the 10 m and 20 m (and 60 m) grids align

#: Reflective bands in processing order: the 10 m ones, then the 20 m ones.
BANDS_10M: tuple[str, ...] = ("B02", "B03", "B04", "B08")
BANDS_20M: tuple[str, ...] = ("B05", "B06", "B07", "B8A", "B11", "B12")
SPECTRAL_BANDS: tuple[str, ...] = BANDS_10M + BANDS_20M

#: Earth Search v1 asset key, title, centre wavelength and FWHM (micrometres) of each band.
_BAND_INFO: dict[str, tuple[str, str, float, float]] = {
    "B02": ("blue", "Blue (band 2)", 0.49, 0.098),
    "B03": ("green", "Green (band 3)", 0.56, 0.045),
    "B04": ("red", "Red (band 4)", 0.665, 0.038),
    "B08": ("nir", "NIR 1 (band 8)", 0.842, 0.145),
    "B05": ("rededge1", "Red edge 1 (band 5)", 0.704, 0.019),
    "B06": ("rededge2", "Red edge 2 (band 6)", 0.74, 0.018),
    "B07": ("rededge3", "Red edge 3 (band 7)", 0.783, 0.028),
    "B8A": ("nir08", "NIR 2 (band 8A)", 0.865, 0.033),
    "B11": ("swir16", "SWIR 1 (band 11)", 1.61, 0.143),
    "B12": ("swir22", "SWIR 2 (band 12)", 2.19, 0.242),
}

# Surface reflectance * 10000, in wavelength order (_SPECTRUM_ORDER), rearranged to SPECTRAL_BANDS below.
_SPECTRUM_ORDER: tuple[str, ...] = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
_GREEN = np.array([250, 550, 300, 1000, 2800, 3700, 4200, 4400, 2100, 1000], dtype="float32")  # dense canopy
_BARE = np.array([900, 1250, 1700, 2000, 2150, 2300, 2450, 2550, 3300, 2700], dtype="float32")  # ploughed soil
_DRY = np.array([700, 1050, 1400, 1700, 1900, 2050, 2200, 2350, 3400, 2600], dtype="float32")  # straw, stubble
_WATER = np.array([600, 700, 450, 350, 250, 220, 200, 180, 100, 80], dtype="float32")
_CLOUD = np.array([8200, 8100, 8200, 8100, 8000, 7900, 7900, 7800, 6500, 6000], dtype="float32")
_ORDER = [_SPECTRUM_ORDER.index(band) for band in SPECTRAL_BANDS]
_GREEN, _BARE, _DRY, _WATER, _CLOUD = (spectrum[_ORDER] for spectrum in (_GREEN, _BARE, _DRY, _WATER, _CLOUD))

# Scene classification (SCL) values used.
SCL_NODATA, SCL_SHADOW, SCL_VEGETATION, SCL_BARE, SCL_WATER = 0, 3, 4, 5, 6
SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS = 8, 9, 10
CLOUD_SCL: tuple[int, ...] = (SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS)
_VEGETATION_THRESHOLD = 0.3  # green cover above which SCL says vegetation (4) rather than bare soil (5)


@dataclass(frozen=True)
class _Crop:
    code: str
    """HCAT3 code (10 digits), checked against EuroCrops HCAT3.csv."""
    hcat_name: str
    """HCAT3 name of the code."""
    trans_name: str
    """English name of the declared crop, as in the Spanish EuroCrops translation table."""
    green_start: float
    """Green cover fraction on 2023-05-15."""
    green_end: float
    """Green cover fraction on 2023-06-30 (linear in between)."""
    dry: float
    """The non-green part: 0 = bare soil, 1 = dry straw."""
    weight: float
    """Relative frequency in the landscape."""


#: Real HCAT3 rows (verified against EuroCrops HCAT3.csv), all 8 target classes plus unlabelled ones.
CROPS: tuple[_Crop, ...] = (
    _Crop("3303050000", "olive_plantations", "OLIVE", 0.40, 0.37, 0.0, 4.0),
    _Crop("3303060000", "vineyards_wine_vine_rebland_grapes", "VINEYARD", 0.22, 0.48, 0.0, 1.5),
    _Crop("3303040000", "citrus_plantations", "ORANGE TREE", 0.75, 0.74, 0.0, 1.0),
    _Crop("3303030100", "almond", "ALMOND", 0.50, 0.44, 0.0, 1.0),
    _Crop("3301010100", "common_soft_wheat", "SOFT WHEAT", 0.55, 0.05, 1.0, 2.5),
    _Crop("3301010400", "barley", "BARLEY", 0.35, 0.02, 1.0, 1.5),
    _Crop("3301020200", "chickpeas", "CHICKPEA", 0.60, 0.15, 0.8, 1.0),
    _Crop("3301280000", "tomato", "TOMATO", 0.18, 0.80, 0.0, 1.0),
    _Crop("3301140300", "melon", "Melon", 0.12, 0.62, 0.0, 0.7),
    _Crop("3301110000", "fallow_land_not_crop", "TRADITIONAL FALLOW", 0.08, 0.03, 0.3, 2.0),
    _Crop("3301010600", "grain_maize_corn_popcorn", "Corn", 0.30, 0.92, 0.0, 1.0),
    _Crop("3302000000", "pasture_meadow_grassland_grass", "PERMANENT PASTURES OF 5 OR MORE YEARS",
          0.45, 0.15, 1.0, 1.0),
)


@dataclass(frozen=True)
class SampleArea:
    """Where a generated sample area lies on disk and the grid and search settings that fit it."""

    root: Path
    gpkg: Path
    """EuroCrops-like GeoPackage of field polygons."""
    layer: str
    """Its layer name."""
    items: Path
    """STAC FeatureCollection JSON of Earth Search shaped items (hrefs are local paths)."""
    start_x: float
    """Longitude of the grid's south-west corner (EPSG:4326)."""
    start_y: float
    """Latitude of the grid's south-west corner (EPSG:4326)."""
    grid_step: float
    """Cell size in degrees."""
    x_cells: int
    y_cells: int
    datetime: str
    """A ``--datetime`` range covering every scene date."""
    collection: str
    epsg: int
    """UTM EPSG code of the scenes."""


def utm_epsg(lon: float, lat: float) -> int:
    """WGS 84 / UTM zone EPSG code holding a point (326xx north, 327xx south)."""
    zone = min(60, int(math.floor((lon + 180.0) / 6.0)) + 1)
    return (32600 if lat >= 0 else 32700) + zone


def mgrs_square(lon: float, lat: float, easting: float, northing: float) -> tuple[int, str, str]:
    """UTM zone, latitude band and 100 km square letters of a point (its UTM coordinates given)."""
    zone = min(60, int(math.floor((lon + 180.0) / 6.0)) + 1)
    bands = "CDEFGHJKLMNPQRSTUVWX"
    band = bands[min(len(bands) - 1, max(0, int(math.floor((lat + 80.0) / 8.0))))]
    column_sets = ("ABCDEFGH", "JKLMNPQR", "STUVWXYZ")
    column = column_sets[(zone - 1) % 3][int(easting // 100_000) - 1]
    rows = "ABCDEFGHJKLMNPQRSTUV"
    row = rows[(int(northing // 100_000) + (5 if zone % 2 == 0 else 0)) % 20]
    return zone, band, column + row


def scene_dates(dates: int) -> list[date]:
    """``dates`` acquisition days within 2023-05-15..2023-06-30, every 10 days when they fit."""
    last = (SEASON_END - SEASON_START).days  # 46: the season has 47 days
    if not 1 <= dates <= last + 1:
        raise ValueError(f"dates must be 1..{last + 1} (one scene a day at most in the season), got {dates}")
    step = min(10, last // max(dates - 1, 1))
    first = SEASON_START + timedelta(days=min(5, last - step * (dates - 1)))
    return [first + timedelta(days=step * k) for k in range(dates)]


# --------------------------------------------------------------------------- fields


def _to_crs(transformer: Transformer) -> Callable[[np.ndarray], np.ndarray]:
    def func(coords: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])
    return func


def _slot_boxes(x0: float, y0: float, step: float, count: int, aspect: float,
                rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """``count`` jittered sub-boxes of a cell (rows of ``nx``, the last row may be short), in degrees."""
    ny = max(1, round(math.sqrt(count * aspect)))
    nx = max(1, math.ceil(count / ny))
    boxes = []
    for n, axis_start in ((nx, x0), (ny, y0)):
        edges = np.linspace(0.0, 1.0, n + 1)
        edges[1:-1] += rng.uniform(-0.12, 0.12, n - 1) / n
        boxes.append(axis_start + edges * step)
    xs, ys = boxes
    out = [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(ny) for i in range(nx)]
    return out[:count] if len(out) > count else out


def _field_in(slot: shapely.Geometry, angle: float, rng: np.random.Generator) -> shapely.Geometry | None:
    """A convex quadrilateral or rotated rectangle of 100-400 m inside ``slot`` (projected metres)."""
    gap = rng.uniform(12.0, 35.0)
    inner = slot.buffer(-gap)
    if inner.is_empty:
        return None
    minx, miny, maxx, maxy = inner.bounds
    room_x, room_y = (maxx - minx) * 0.9, (maxy - miny) * 0.9
    if min(room_x, room_y) < 80.0:
        return None
    width = rng.uniform(min(100.0, room_x), min(400.0, room_x))
    height = rng.uniform(min(100.0, room_y), min(400.0, room_y))
    centre = inner.centroid
    cx = centre.x + rng.uniform(-0.5, 0.5) * max(0.0, room_x - width) * 0.6
    cy = centre.y + rng.uniform(-0.5, 0.5) * max(0.0, room_y - height) * 0.6
    corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]) * [width, height]
    if rng.random() < 0.5:  # irregular: small corner moves keep a rectangle convex
        corners = corners + rng.uniform(-0.12, 0.12, (4, 2)) * min(width, height)
    shape = shapely.affinity.rotate(shapely.Polygon(corners), angle, origin=(0, 0))
    envelope = np.asarray(shapely.oriented_envelope(shape).exterior.coords)
    longest = float(np.hypot(*np.diff(envelope[:3], axis=0).T).max())
    if longest > 390.0:  # moved corners may stretch a 400 m field a little
        shape = shapely.affinity.scale(shape, 390.0 / longest, 390.0 / longest, origin=(0, 0))
    for _ in range(20):
        field = shapely.affinity.translate(shape, cx, cy)
        if field.within(inner):
            return shapely.set_precision(field, 0.01)
        shape = shapely.affinity.scale(shape, 0.9, 0.9, origin=(0, 0))
        cx, cy = (cx + centre.x) / 2, (cy + centre.y) / 2
    return None


def _make_fields(bbox: tuple[float, float, float, float], step: float, x_cells: int, y_cells: int,
                 fields_per_cell: int, water: shapely.Geometry, rng: np.random.Generator) -> gpd.GeoDataFrame:
    """Fields (EPSG:25830): ``fields_per_cell`` in every grid cell, some more in a ring around the grid."""
    to_local = _to_crs(Transformer.from_crs("EPSG:4326", FIELDS_CRS, always_xy=True))
    grid_local = shapely.transform(shapely.segmentize(shapely.box(*bbox), step / 20), to_local)
    mid_lat = (bbox[1] + bbox[3]) / 2
    aspect = 1.0 / math.cos(math.radians(mid_lat))  # a cell is taller than wide, in metres
    geoms: list[shapely.Geometry] = []
    inside: list[bool] = []
    for row in range(-1, y_cells + 1):
        for col in range(-1, x_cells + 1):
            in_grid = 0 <= row < y_cells and 0 <= col < x_cells
            x0, y0 = bbox[0] + col * step, bbox[1] + row * step
            cell_angle = rng.uniform(-20.0, 20.0)
            for slot_box in _slot_boxes(x0, y0, step, fields_per_cell, aspect, rng):
                slot = shapely.transform(shapely.segmentize(shapely.box(*slot_box), step / 40), to_local)
                angle = cell_angle + rng.normal(0.0, 4.0)
                keep_ring = rng.random() < 0.6
                if not in_grid and (not keep_ring or slot.centroid.distance(grid_local) > 900.0
                                    or slot.intersects(water.buffer(60.0))):
                    continue
                field = _field_in(slot, angle, rng)
                if field is not None:
                    geoms.append(field)
                    inside.append(in_grid)
    inside_arr = np.array(inside)
    crop = np.empty(len(geoms), dtype="int64")
    weights = np.array([c.weight for c in CROPS])
    n_in = int(inside_arr.sum())
    # Every crop (so every class) appears in the grid; the rest follow the landscape's frequencies.
    pool = list(range(len(CROPS)))[:n_in]
    pool += list(rng.choice(len(CROPS), size=n_in - len(pool), p=weights / weights.sum()))
    crop[inside_arr] = rng.permutation(np.array(pool, dtype="int64"))
    crop[~inside_arr] = rng.choice(len(CROPS), size=int((~inside_arr).sum()), p=weights / weights.sum())
    return gpd.GeoDataFrame(
        {"ID": np.arange(1, len(geoms) + 1, dtype="int64"),
         "EC_trans_n": [CROPS[k].trans_name for k in crop],
         "EC_hcat_n": [CROPS[k].hcat_name for k in crop],
         "EC_hcat_c": [CROPS[k].code for k in crop],
         "crop": crop},
        geometry=geoms, crs=FIELDS_CRS)


# --------------------------------------------------------------------------- rasters


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Spatially smooth noise in [0, 1]: a coarse random grid bilinearly interpolated (float32)."""
    rows, cols = shape
    coarse = rng.random((int(rows / scale_px) + 2, int(cols / scale_px) + 2))

    def weights(n: int, m: int) -> np.ndarray:
        pos = np.arange(n) / scale_px
        i0 = np.minimum(pos.astype(int), m - 2)
        frac = pos - i0
        out = np.zeros((n, m))
        out[np.arange(n), i0] = 1 - frac
        out[np.arange(n), i0 + 1] = frac
        return out

    field = weights(rows, coarse.shape[0]) @ coarse @ weights(cols, coarse.shape[1]).T
    low, high = field.min(), field.max()
    return ((field - low) / (high - low if high > low else 1.0)).astype("float32")


def _block_mean(array: np.ndarray) -> np.ndarray:
    """2 x 2 block mean: 10 m -> 20 m."""
    rows, cols = array.shape
    return array.reshape(rows // 2, 2, cols // 2, 2).mean(axis=(1, 3))


def _upsample(array: np.ndarray) -> np.ndarray:
    """20 m -> 10 m, each pixel repeated 2 x 2."""
    return np.repeat(np.repeat(array, 2, axis=0), 2, axis=1)


@dataclass
class _Clouds:
    opacity: np.ndarray
    """20 m float32: 0 clear .. 1 opaque."""
    scl: np.ndarray
    """20 m uint8: 0 clear, 3 shadow, 8/9 cloud."""


def _clouds(shape: tuple[int, int], target: float, rng: np.random.Generator) -> _Clouds:
    """Smooth cloud blobs covering about ``target`` of the scene, with a thin shadow to the north-west."""
    rows, cols = shape
    opacity = np.zeros(shape, dtype="float32")
    scl = np.zeros(shape, dtype="uint8")
    if target <= 0:
        return _Clouds(opacity, scl)
    heavy = target > 0.1
    n_blobs = int(rng.integers(5, 8) if heavy else rng.integers(2, 4))
    yy, xx = np.mgrid[0:rows, 0:cols].astype("float32")
    density = np.zeros(shape, dtype="float32")
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0, rows), rng.uniform(0, cols)
        sigma = rng.uniform(25, 50) if heavy else rng.uniform(8, 18)  # 20 m pixels
        squeeze = rng.uniform(0.6, 1.0)
        density += np.exp(-(((yy - cy) * squeeze) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    density *= 0.75 + 0.5 * _smooth_noise(rng, shape, 6.0)
    threshold = float(np.quantile(density, 1.0 - target))
    cloud = density > threshold
    strength = np.clip((density - threshold) / max(float(density.max()) - threshold, 1e-6), 0, 1)
    opacity[cloud] = 0.65 + 0.35 * strength[cloud]
    scl[cloud] = np.where(strength[cloud] > 0.25, SCL_CLOUD_HIGH, SCL_CLOUD_MEDIUM)
    # Shadow: the cloud mask moved ~120 m north-west (sun in the south-east), where it is not cloud.
    shift = 6
    shadow = np.zeros(shape, dtype=bool)
    shadow[:-shift, :-shift] = cloud[shift:, shift:]
    shadow &= ~cloud
    scl[shadow] = SCL_SHADOW
    return _Clouds(opacity, scl)


def _write_cog(path: Path, array: np.ndarray, transform: Affine, epsg: int, *, resampling: str) -> None:
    with rasterio.open(path, "w", driver="COG", height=array.shape[0], width=array.shape[1], count=1,
                       dtype=array.dtype.name, crs=f"EPSG:{epsg}", transform=transform, nodata=0,
                       compress="deflate", predictor=2, blocksize=512, overview_resampling=resampling,
                       bigtiff="NO") as dst:
        dst.write(array, 1)


def _sun_position(lon: float, lat: float, when: datetime) -> tuple[float, float]:
    """Approximate solar azimuth and elevation in degrees (good to about a degree)."""
    day = when.timetuple().tm_yday
    hours = when.hour + when.minute / 60 + when.second / 3600
    gamma = 2 * math.pi / 365 * (day - 1 + (hours - 12) / 24)
    decl = (0.006918 - 0.399912 * math.cos(gamma) + 0.070257 * math.sin(gamma) - 0.006758 * math.cos(2 * gamma)
            + 0.000907 * math.sin(2 * gamma) - 0.002697 * math.cos(3 * gamma) + 0.00148 * math.sin(3 * gamma))
    eqtime = 229.18 * (0.000075 + 0.001868 * math.cos(gamma) - 0.032077 * math.sin(gamma)
                       - 0.014615 * math.cos(2 * gamma) - 0.040849 * math.sin(2 * gamma))
    hour_angle = math.radians((hours * 60 + eqtime + 4 * lon) / 4 - 180)
    phi = math.radians(lat)
    cos_zenith = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(hour_angle)
    zenith = math.acos(max(-1.0, min(1.0, cos_zenith)))
    azimuth = math.degrees(math.atan2(math.sin(hour_angle),
                                      math.cos(hour_angle) * math.sin(phi) - math.tan(decl) * math.cos(phi))) + 180
    return azimuth % 360, 90 - math.degrees(zenith)


# --------------------------------------------------------------------------- generate


def generate_sample(root: Path, *, start_x: float = -5.80, start_y: float = 37.20, grid_step: float = 0.02,
                    x_cells: int = 2, y_cells: int = 2, dates: int = 3, margin_m: float = 3000.0,
                    fields_per_cell: int = 12, seed: int = 0) -> SampleArea:
    """Write a synthetic sample area under ``root`` and return where everything is.

    ``root`` gets ``scenes/<ID>/*.tif`` (Earth Search-style single-band COGs in the grid's UTM
    zone, covering the grid plus ``margin_m``), ``items.json`` (their STAC items),
    ``fields.gpkg`` (EuroCrops-like parcels in EPSG:25830: ``fields_per_cell`` in each cell,
    so 8 or more keep every cell at ``--min-polygons 5``) and ``README.txt``. The same
    arguments always give the same data. Date 1 (of 0..) is the cloudy one, date 0 is clear.
    """
    started = time.perf_counter()
    if not grid_step > 0 or x_cells < 1 or y_cells < 1:
        raise ValueError(f"need grid_step > 0 and at least one cell, got {grid_step} and {x_cells} x {y_cells}")
    if fields_per_cell < 1 or margin_m < 0:
        raise ValueError(f"need fields_per_cell >= 1 and margin_m >= 0, got {fields_per_cell} and {margin_m}")
    days = scene_dates(dates)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bbox = (start_x, start_y, start_x + grid_step * x_cells, start_y + grid_step * y_cells)
    centre_lon, centre_lat = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    epsg = utm_epsg(centre_lon, centre_lat)
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    to_lonlat = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)

    # The scene grid: the grid's box in UTM plus the margin, snapped outwards to 60 m.
    gminx, gminy, gmaxx, gmaxy = to_utm.transform_bounds(*bbox, densify_pts=21)
    left = math.floor((gminx - margin_m) / SNAP_M) * SNAP_M
    right = math.ceil((gmaxx + margin_m) / SNAP_M) * SNAP_M
    bottom = math.floor((gminy - margin_m) / SNAP_M) * SNAP_M
    top = math.ceil((gmaxy + margin_m) / SNAP_M) * SNAP_M
    width, height = int(round((right - left) / 10)), int(round((top - bottom) / 10))
    transform10 = Affine(10.0, 0.0, left, 0.0, -10.0, top)
    transform20 = Affine(20.0, 0.0, left, 0.0, -20.0, top)
    shape20 = (height // 2, width // 2)

    # A small reservoir just south of the grid, then the fields (none on the water).
    to_local = _to_crs(Transformer.from_crs("EPSG:4326", FIELDS_CRS, always_xy=True))
    south_mid = shapely.transform(shapely.Point(centre_lon, bbox[1]), to_local)
    water = shapely.affinity.rotate(shapely.affinity.scale(
        shapely.Point(south_mid.x, south_mid.y - 450.0).buffer(1.0, quad_segs=16), 220.0, 130.0), 20.0)
    fields = _make_fields(bbox, grid_step, x_cells, y_cells, fields_per_cell, water, rng)
    fields_utm = fields.to_crs(epsg=epsg)
    water_utm = shapely.transform(water, _to_crs(Transformer.from_crs(FIELDS_CRS, f"EPSG:{epsg}", always_xy=True)))

    # Land cover on the 10 m grid: field index (0 = no field), water mask, per-field parameters.
    field_index = rasterize(((g, i + 1) for i, g in enumerate(fields_utm.geometry.values)),
                            out_shape=(height, width), transform=transform10, fill=0, dtype="int32")
    is_water = rasterize([(water_utm, 1)], out_shape=(height, width), transform=transform10, fill=0,
                         dtype="uint8").astype(bool)
    crop = np.concatenate([[-1], fields["crop"].to_numpy()])
    n = len(fields)
    green0 = np.concatenate([[0.0], [CROPS[k].green_start for k in crop[1:]]]) * np.r_[1.0, rng.uniform(0.85, 1.15, n)]
    green1 = np.concatenate([[0.0], [CROPS[k].green_end for k in crop[1:]]]) * np.r_[1.0, rng.uniform(0.85, 1.15, n)]
    dryness = np.concatenate([[0.0], [CROPS[k].dry for k in crop[1:]]])
    brightness = np.r_[1.0, rng.uniform(0.92, 1.08, n)].astype("float32")
    in_field = field_index > 0
    # Background: scrub and soil, patchy; fields: a little texture.
    scrub = 0.06 + 0.24 * _smooth_noise(rng, (height, width), 40.0)
    litter = _smooth_noise(rng, (height, width), 25.0)
    texture = (_smooth_noise(rng, (height, width), 4.0) - 0.5) * 0.08
    background_bright = 0.9 + 0.2 * _smooth_noise(rng, (height, width), 60.0)

    # Orbit edge: a slanted strip of nodata in the last scene, 2 km or more east of the grid.
    edge_x = gmaxx + 2000.0
    rows20, cols20 = np.mgrid[0:shape20[0], 0:shape20[1]]
    x20 = left + 20.0 * (cols20 + 0.5)
    y20 = top - 20.0 * (rows20 + 0.5)
    nodata_strip = x20 > edge_x + 0.05 * (y20 - bottom)
    del rows20, cols20, x20, y20

    scenes_dir = root / "scenes"
    scenes_dir.mkdir(exist_ok=True)
    zone, band, square = mgrs_square(centre_lon, centre_lat, (gminx + gmaxx) / 2, (gminy + gmaxy) / 2)
    features = []
    cloudy = 1 if dates > 1 else -1
    for k, day in enumerate(days):
        t = (day - SEASON_START).days / (SEASON_END - SEASON_START).days
        satellite = "S2A" if ((day - date(2023, 5, 15)).days // 5) % 2 else "S2B"
        scene_id = f"{satellite}_{zone}{band}{square}_{day:%Y%m%d}_0_L2A"
        when = datetime(day.year, day.month, day.day, 11, 7, 0, tzinfo=timezone.utc) + timedelta(
            seconds=float(rng.uniform(0, 60)))
        target = 0.0 if k == 0 else float(rng.uniform(0.25, 0.38) if k == cloudy else rng.uniform(0.01, 0.05))
        clouds = _clouds(shape20, target, rng)
        strip = nodata_strip if (k == dates - 1 and dates > 1) else np.zeros(shape20, dtype=bool)

        green = np.where(in_field, (green0 + (green1 - green0) * t)[field_index] + texture,
                         scrub * (1.0 - 0.25 * t)).clip(0.0, 1.0).astype("float32")
        dry = np.where(in_field, dryness[field_index], litter).astype("float32")
        bright = np.where(in_field, brightness[field_index], background_bright).astype("float32")
        bright *= np.float32(rng.uniform(0.97, 1.03))  # the atmosphere differs a little per date
        opacity10 = _upsample(clouds.opacity)
        shadow10 = _upsample(clouds.scl == SCL_SHADOW)
        strip10 = _upsample(strip)

        folder = scenes_dir / scene_id
        folder.mkdir(exist_ok=True)
        hrefs: dict[str, Path] = {}
        for b, name in enumerate(SPECTRAL_BANDS):
            surface = (green * _GREEN[b] + (1 - green) * (dry * _DRY[b] + (1 - dry) * _BARE[b])) * bright
            surface = np.where(is_water, _WATER[b], surface)
            surface *= 1.0 + rng.normal(0.0, 0.025, surface.shape).astype("float32")
            surface = np.where(shadow10, surface * 0.45, surface)
            value = surface * (1 - opacity10) + _CLOUD[b] * opacity10 * (0.95 + 0.1 * opacity10)
            if name in BANDS_20M:
                value = _block_mean(value)
                nodata = strip
            else:
                nodata = strip10
            # Processing baseline 05.09 stores DN = reflectance x 10000 + 1000 (BOA_ADD_OFFSET -1000).
            data = np.where(nodata, 0, np.clip(np.rint(value), 0, 10000) + BOA_ADD_OFFSET_DN).astype("uint16")
            hrefs[name] = folder / f"{name}.tif"
            _write_cog(hrefs[name], data, transform10 if name in BANDS_10M else transform20, epsg,
                       resampling="average")

        green20 = _block_mean(green)
        water20 = _block_mean(is_water.astype("float32")) >= 0.5
        scl = np.where(green20 >= _VEGETATION_THRESHOLD, SCL_VEGETATION, SCL_BARE).astype("uint8")
        scl[water20] = SCL_WATER
        scl = np.where(clouds.scl > 0, clouds.scl, scl)
        scl[strip] = SCL_NODATA
        hrefs["SCL"] = folder / "SCL.tif"
        _write_cog(hrefs["SCL"], scl, transform20, epsg, resampling="nearest")

        footprint = shapely.box(left, bottom, right, top)
        if strip.any():
            footprint = footprint.intersection(shapely.Polygon(
                [(left, bottom), (edge_x, bottom), (edge_x + 0.05 * (top - bottom), top), (left, top)]))
        footprint_ll = shapely.transform(shapely.segmentize(footprint, 500.0), _to_crs(to_lonlat))
        features.append(_item(scene_id, satellite, when, epsg, (zone, band, square), hrefs, scl,
                              transform10, (height, width), footprint_ll, (centre_lon, centre_lat)))
        log.debug("scene %s: %.1f%% cloud", scene_id, features[-1]["properties"]["eo:cloud_cover"])

    for feature in features:
        # Each item also lies in scenes/<ID>/<ID>.json, its "self" link (as Earth Search items carry one).
        path = scenes_dir / feature["id"] / f"{feature['id']}.json"
        feature["links"] = [{"rel": "self", "href": str(path.resolve()), "type": "application/geo+json"}]
        path.write_text(json.dumps(feature, indent=1))
    items_path = root / "items.json"
    items_path.write_text(json.dumps({"type": "FeatureCollection", "features": features}, indent=1))
    gpkg = root / "fields.gpkg"
    layer = "es_2023_sample"
    if gpkg.exists():
        gpkg.unlink()
    fields.drop(columns="crop").to_file(gpkg, layer=layer, driver="GPKG", engine="pyogrio")
    area = SampleArea(root=root, gpkg=gpkg, layer=layer, items=items_path, start_x=start_x, start_y=start_y,
                      grid_step=grid_step, x_cells=x_cells, y_cells=y_cells,
                      datetime=f"{SEASON_START.isoformat()}/{SEASON_END.isoformat()}", collection=COLLECTION,
                      epsg=epsg)
    _write_readme(area, features, len(fields), margin_m, seed)
    log.info("sample area under %s: %d scenes, %d fields, %d x %d cells (%.1f s)", root, len(features),
             len(fields), x_cells, y_cells, time.perf_counter() - started)
    return area


def _percent(scl: np.ndarray, values: Sequence[int]) -> float:
    valid = int(np.count_nonzero(scl))
    return round(100.0 * int(np.isin(scl, values).sum()) / valid, 6) if valid else 0.0


def _item(scene_id: str, satellite: str, when: datetime, epsg: int, mgrs: tuple[int, str, str],
          hrefs: dict[str, Path], scl: np.ndarray, transform10: Affine, shape10: tuple[int, int],
          footprint: shapely.Geometry, centre: tuple[float, float]) -> dict[str, Any]:
    """An Earth Search v1 ``sentinel-2-l2a`` item for one generated scene."""
    zone, band, square = mgrs
    stamp = when.strftime("%Y%m%dT%H%M%S")
    produced = when + timedelta(hours=1, minutes=23)
    iso = when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    azimuth, elevation = _sun_position(centre[0], centre[1], when)
    tile = f"{zone}{band}{square}"
    props: dict[str, Any] = {
        "created": produced.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "platform": f"sentinel-2{satellite[-1].lower()}",
        "constellation": "sentinel-2",
        "instruments": ["msi"],
        "eo:cloud_cover": _percent(scl, CLOUD_SCL),
        "proj:epsg": epsg,
        "mgrs:utm_zone": zone,
        "mgrs:latitude_band": band,
        "mgrs:grid_square": square,
        "grid:code": f"MGRS-{tile}",
        "view:sun_azimuth": round(azimuth, 6),
        "view:sun_elevation": round(elevation, 6),
        "s2:nodata_pixel_percentage": round(100.0 * float(np.mean(scl == 0)), 6),
        "s2:dark_features_percentage": _percent(scl, (2,)),
        "s2:cloud_shadow_percentage": _percent(scl, (SCL_SHADOW,)),
        "s2:vegetation_percentage": _percent(scl, (SCL_VEGETATION,)),
        "s2:not_vegetated_percentage": _percent(scl, (SCL_BARE,)),
        "s2:water_percentage": _percent(scl, (SCL_WATER,)),
        "s2:unclassified_percentage": _percent(scl, (7,)),
        "s2:medium_proba_clouds_percentage": _percent(scl, (SCL_CLOUD_MEDIUM,)),
        "s2:high_proba_clouds_percentage": _percent(scl, (SCL_CLOUD_HIGH,)),
        "s2:thin_cirrus_percentage": _percent(scl, (SCL_CIRRUS,)),
        "s2:snow_ice_percentage": _percent(scl, (11,)),
        "s2:product_type": "S2MSI2A",
        "s2:processing_baseline": "05.09",
        "s2:product_uri": f"{satellite}_MSIL2A_{stamp}_N0509_R137_T{tile}_{produced:%Y%m%dT%H%M%S}.SAFE",
        "s2:generation_time": produced.strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
        "s2:datatake_type": "INS-NOBS",
        "datetime": iso,
        "s2:sequence": "0",
        "earthsearch:boa_offset_applied": True,
        "processing:software": {"cropchips.demo.sample": "synthetic"},
        "updated": produced.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
    }
    assets: dict[str, Any] = {}
    for name, href in hrefs.items():
        res = 10 if name in BANDS_10M else 20
        shape = [shape10[0] * 10 // res, shape10[1] * 10 // res]
        asset: dict[str, Any] = {
            "href": str(href.resolve()),
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
        }
        if name == "SCL":
            asset["title"] = "Scene classification map (SCL)"
            bands = [{"nodata": 0, "data_type": "uint8", "spatial_resolution": res}]
        else:
            key, title, wavelength, fwhm = _BAND_INFO[name]
            asset["title"] = f"{title} - {res}m"
            asset["eo:bands"] = [{"name": key, "common_name": "rededge" if key.startswith("rededge") else key,
                                  "description": title, "center_wavelength": wavelength,
                                  "full_width_half_max": fwhm}]
            asset["gsd"] = res
            bands = [{"nodata": 0, "data_type": "uint16", "bits_per_sample": 15, "spatial_resolution": res,
                      "scale": 0.0001, "offset": -BOA_ADD_OFFSET_DN / 10000}]
        asset["proj:shape"] = shape
        asset["proj:transform"] = [res, 0, transform10.c, 0, -res, transform10.f]
        asset["raster:bands"] = bands
        asset["roles"] = ["data", "reflectance"]
        assets["scl" if name == "SCL" else _BAND_INFO[name][0]] = asset
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/processing/v1.1.0/schema.json",
            "https://stac-extensions.github.io/grid/v1.0.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
            "https://stac-extensions.github.io/view/v1.0.0/schema.json",
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
        ],
        "id": scene_id,
        "collection": COLLECTION,
        "properties": props,
        "geometry": shapely.geometry.mapping(footprint),
        "bbox": list(footprint.bounds),
        "links": [],
        "assets": assets,
    }


def _write_readme(area: SampleArea, features: list[dict[str, Any]], n_fields: int, margin_m: float,
                  seed: int) -> None:
    lines = [
        "SYNTHETIC sample area - not real satellite data or real parcels.",
        "",
        f"Generated by cropchips.demo.sample.generate_sample (seed {seed}) for the demo and the tests;",
        "regenerate it any time, the same arguments always give the same data.",
        "",
        f"grid: south-west corner {area.start_x}, {area.start_y} (EPSG:4326), {area.x_cells} x {area.y_cells} "
        f"cells of {area.grid_step} degrees",
        "",
        f"scenes/<ID>/  {len(features)} Sentinel-2 L2A-like scenes in EPSG:{area.epsg}, laid out like Earth Search's",
        "              sentinel-2-l2a: one COG per band (B02 B03 B04 B08 at 10 m; B05 B06 B07 B8A B11 B12",
        "              and SCL at 20 m), uint16 reflectance x 10000 (SCL uint8), nodata 0, covering the grid",
        f"              plus {margin_m:g} m. Clouds (SCL 8/9) with shadows (SCL 3) on some dates, a reservoir",
        "              (SCL 6) south of the grid and an orbit-edge strip of nodata in the last scene.",
    ]
    for feature in features:
        lines.append(f"                {feature['id']}  {feature['properties']['datetime']}  "
                     f"cloud {feature['properties']['eo:cloud_cover']:.2f}%")
    lines += [
        "items.json    STAC FeatureCollection of those scenes (Earth Search v1 item shape, local hrefs);",
        "              use it with --stac-items.",
        f"{area.gpkg.name}   {n_fields} EuroCrops-like field polygons, layer {area.layer}, EPSG:25830, columns",
        "              ID, EC_trans_n, EC_hcat_n, EC_hcat_c (real HCAT3 codes and names):",
    ]
    lines += [f"                {crop.code}  {crop.hcat_name}" for crop in CROPS]
    lines += ["", f"search: --collection {area.collection} --datetime {area.datetime}", ""]
    (area.root / "README.txt").write_text("\n".join(lines))
