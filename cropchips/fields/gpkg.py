"""Field polygons from a EuroCrops GeoPackage: layer checks, bbox reads and class labels."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import geopandas as gpd
import numpy as np
import pyogrio
import shapely
from pyproj import CRS

from cropchips.crs import transformer
from cropchips.errors import InputDataError
from cropchips.fields.classes import IGNORE_LABEL, MAX_CLASS_ID, check_unmapped_label

if TYPE_CHECKING:
    from cropchips.fields.classes import ClassMap

log = logging.getLogger(__name__)

CODE_COLUMN = "EC_hcat_c"
NAME_COLUMN = "EC_hcat_n"
EUROCROPS_COLUMNS = (CODE_COLUMN, NAME_COLUMN)


@dataclass(frozen=True)
class FieldLayer:
    """A checked GeoPackage layer of EuroCrops parcels."""

    path: str
    """Path (or GDAL URL such as ``zip://...``) of the dataset."""
    layer: str
    """Layer name."""
    crs: CRS
    """The layer's CRS (national CRSs are common: EPSG:25830, EPSG:3794, ...)."""
    columns: tuple[str, ...]
    """The EuroCrops label columns present (``EC_hcat_c`` and/or ``EC_hcat_n``)."""
    feature_count: int
    """Number of features in the layer (-1 if unknown)."""


def open_layer(path: str | Path, layer: str | None = None) -> FieldLayer:
    """Check that ``path`` holds a polygon layer with EuroCrops columns; raise InputDataError otherwise."""
    text = str(path)
    if "://" not in text and not Path(text).exists():
        raise InputDataError(f"GeoPackage not found: {text}. Pass --gpkg with the path of your EuroCrops "
                             "GeoPackage (on workers, the NFS-mounted copy).")
    try:
        layers = [(str(name), geom) for name, geom in pyogrio.list_layers(text)]
    except Exception as exc:  # pyogrio raises DataSourceError and friends
        raise InputDataError(f"cannot read {text} as a vector dataset ({exc}); is it a GeoPackage?") from exc
    names = [name for name, _ in layers]
    if layer is None:
        candidates = [name for name, geom in layers if geom is not None and _has_eurocrops_columns(text, name)]
        if not candidates:
            raise InputDataError(
                f"no layer of {text} has EuroCrops columns ({CODE_COLUMN} or {NAME_COLUMN}); layers: {names}. "
                "Use a EuroCrops GeoPackage (e.g. es_2023_all.gpkg) or add the HCAT columns.")
        layer = candidates[0]
        if len(candidates) > 1:
            log.warning("%s has several EuroCrops layers %s; using %s (choose with --layer)", text, candidates, layer)
    elif layer not in names:
        raise InputDataError(f"layer {layer!r} not found in {text}; available layers: {names}")
    info = pyogrio.read_info(text, layer=layer)
    columns = tuple(c for c in EUROCROPS_COLUMNS if c in list(info["fields"]))
    if not columns:
        raise InputDataError(
            f"layer {layer!r} of {text} has no EuroCrops columns ({CODE_COLUMN} or {NAME_COLUMN}); "
            f"its columns are {list(info['fields'])}. Use a EuroCrops GeoPackage or add the HCAT columns.")
    if info["geometry_type"] is None:
        raise InputDataError(f"layer {layer!r} of {text} has no geometry column")
    if not info["crs"]:
        raise InputDataError(f"layer {layer!r} of {text} has no CRS; assign one (e.g. ogr2ogr -a_srs EPSG:25830)")
    return FieldLayer(path=text, layer=layer, crs=CRS.from_user_input(info["crs"]), columns=columns,
                      feature_count=int(info.get("features", -1)))


def _has_eurocrops_columns(path: str, layer: str) -> bool:
    try:
        fields = list(pyogrio.read_info(path, layer=layer)["fields"])
    except Exception:
        return False
    return any(c in fields for c in EUROCROPS_COLUMNS)


def bbox_in_crs(bbox_4326: tuple[float, float, float, float], crs: CRS) -> tuple[float, float, float, float]:
    """Transform a lon/lat box to ``crs`` (densified edges, so the result contains the whole box)."""
    to_crs = transformer("EPSG:4326", crs)
    return tuple(to_crs.transform_bounds(*bbox_4326, densify_pts=21))  # type: ignore[return-value]


def representative_lonlat(geoms: np.ndarray, crs: CRS) -> tuple[np.ndarray, np.ndarray]:
    """Lon/lat of each polygon's representative point (always inside the polygon)."""
    points = shapely.point_on_surface(geoms)
    x, y = shapely.get_x(points), shapely.get_y(points)
    to_lonlat = transformer(crs, "EPSG:4326")
    lon, lat = to_lonlat.transform(x, y)
    return np.asarray(lon), np.asarray(lat)


def read_points(layer: FieldLayer, bbox_4326: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Representative points (lon, lat) of every polygon intersecting the box; geometry only is read."""
    result = pyogrio.read_arrow(layer.path, layer=layer.layer, columns=[], bbox=bbox_in_crs(bbox_4326, layer.crs))
    meta, table = result
    geom_col = meta.get("geometry_name") or "wkb_geometry"
    if table.num_rows == 0:
        return np.empty(0), np.empty(0)
    geoms = shapely.from_wkb(table.column(geom_col).to_numpy(zero_copy_only=False))
    geoms = geoms[~shapely.is_empty(geoms) & ~shapely.is_missing(geoms)]
    return representative_lonlat(geoms, layer.crs)


def read_fields(layer: FieldLayer, bbox_4326: tuple[float, float, float, float], class_map: ClassMap,
                unmapped_label: int = IGNORE_LABEL) -> gpd.GeoDataFrame:
    """Polygons intersecting the box with ``field_id``, ``class_id``, ``lon``/``lat`` of the
    representative point, and ``geometry`` in the layer CRS.

    ``class_id`` is 1..8 for a field of a class, 255 (:data:`~cropchips.fields.classes.IGNORE_LABEL`)
    for a field the class map marks ``ignore``, and ``unmapped_label`` for a field of none of the
    classes: its code maps to 0, no rule covers it, or neither its code nor its name can be used.
    ``unmapped_label`` is 255 (ignore, the default) or 0 (draw such fields as background, the
    behaviour before cropchips 0.3), or another value 9..254.
    """
    check_unmapped_label(unmapped_label)
    frame = pyogrio.read_dataframe(layer.path, layer=layer.layer, columns=list(layer.columns),
                                   bbox=bbox_in_crs(bbox_4326, layer.crs), fid_as_index=True)
    frame = frame[~frame.geometry.is_empty & frame.geometry.notna()]
    codes = frame[CODE_COLUMN] if CODE_COLUMN in frame else None
    names = frame[NAME_COLUMN] if NAME_COLUMN in frame else None
    if codes is None:
        codes = np.full(len(frame), None, dtype=object)
    class_id = (class_map.classify(codes, names, unmapped=unmapped_label) if len(frame)
                else np.empty(0, dtype="uint8"))
    lon, lat = representative_lonlat(frame.geometry.values, layer.crs) if len(frame) else (np.empty(0), np.empty(0))
    of_a_class = int(((class_id >= 1) & (class_id <= MAX_CLASS_ID)).sum())
    log.debug("%d fields read, %d of a class, the others labelled %d (unmapped) or %d (ignore)",
              len(frame), of_a_class, unmapped_label, IGNORE_LABEL)
    out = gpd.GeoDataFrame(
        {"field_id": [str(i) for i in frame.index], "class_id": np.asarray(class_id, dtype="uint8"),
         "lon": lon, "lat": lat},
        geometry=frame.geometry.values, crs=layer.crs)
    return out


#: Features hashed at each end of the layer by :func:`layer_fingerprint`.
FINGERPRINT_FEATURES = 256


def layer_fingerprint(layer: FieldLayer) -> str:
    """A short content id of the layer: its name, feature count, extent and CRS and the geometry and
    label values of its first and last features. Two copies of one GeoPackage (the master's and a
    worker's mount) have the same fingerprint whatever their paths and times; a re-export, an edited
    or another country's file has another. It reads two small slices, not the file."""
    info = pyogrio.read_info(layer.path, layer=layer.layer, force_feature_count=True, force_total_bounds=True)
    count = int(info.get("features", -1))
    digest = hashlib.sha256()
    bounds = info.get("total_bounds")
    header = {"layer": layer.layer, "features": count, "crs": layer.crs.to_string(),
              "bounds": [round(float(v), 6) for v in bounds] if bounds is not None else None,
              "columns": list(layer.columns)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    n = max(0, min(FINGERPRINT_FEATURES, count))
    for skip in sorted({0, max(0, count - n)}):
        if n == 0:
            break
        _, table = pyogrio.read_arrow(layer.path, layer=layer.layer, columns=list(layer.columns),
                                      skip_features=skip, max_features=n)
        for name in table.column_names:
            for value in table.column(name).to_pylist():
                digest.update(value if isinstance(value, bytes) else str(value).encode())
                digest.update(b"\0")
    return digest.hexdigest()[:16]
