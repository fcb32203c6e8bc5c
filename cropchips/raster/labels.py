"""Label rasters on the exact pixel grid of the image: classes, field instances and field boundaries.

The field polygons are rasterized once per cell (with geocube) into an *owner* raster: which field
each pixel centre lies in, the smaller field winning where fields overlap. The classes mask and the
instance raster are both read off that raster, so they always agree on which field owns a pixel.
Boundaries are computed from the instances of the whole cell; chips are cut from these rasters after.
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import xarray as xr

from cropchips.fields.classes import IGNORE_LABEL
from cropchips.raster.grid import TargetGrid

#: Values of a boundary raster (the Fields of The World convention).
BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2


def load_rasterizer() -> None:
    """Import geocube and rioxarray now (about 1.4 CPU seconds) rather than in a worker's first task:
    a worker runs this in a thread at start, while it joins the group, so no task pays for it."""
    import rioxarray  # noqa: F401
    from geocube.api.core import make_geocube  # noqa: F401


def grid_template(grid: TargetGrid) -> xr.DataArray:
    """An empty DataArray carrying ``grid`` (CRS, transform, shape), for geocube's ``like=``."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    res = grid.resolution
    left, _, _, top = grid.bounds
    xs = left + res * (np.arange(grid.width) + 0.5)
    ys = top - res * (np.arange(grid.height) + 0.5)
    template = xr.DataArray(np.zeros((grid.height, grid.width), dtype="uint8"), coords={"y": ys, "x": xs},
                            dims=("y", "x"))
    return template.rio.write_crs(grid.crs).rio.write_transform(grid.transform)


def rasterize_instances(fields: gpd.GeoDataFrame, grid: TargetGrid) -> np.ndarray:
    """A (rows, cols) uint32 raster of field ids: ``k`` where a pixel centre lies in the field at
    position ``k - 1`` of ``fields`` (``fields.iloc[k - 1]``), 0 where it lies in no field. Where
    fields overlap, the smaller field wins, as in :func:`rasterize_classes`.

    The ids are unique over the cell; :func:`chip_instances` renumbers a chip's window 1..n.
    """
    if fields.empty:
        return np.zeros((grid.height, grid.width), dtype="uint32")
    if len(fields) >= 2**31:  # geocube burns int32 values
        raise ValueError(f"{len(fields)} fields are too many for one cell; use smaller cells")
    from geocube.api.core import make_geocube

    local = gpd.GeoDataFrame({"owner": np.arange(1, len(fields) + 1, dtype="int32")},
                             geometry=fields.to_crs(grid.crs).geometry.values, crs=grid.crs)
    # Burnt in order of decreasing area: the last (smallest) field covering a pixel owns it.
    local = local.iloc[np.argsort(-local.geometry.area.to_numpy(), kind="stable")]
    cube = make_geocube(vector_data=local, measurements=["owner"], like=grid_template(grid), fill=0)
    values = np.nan_to_num(cube["owner"].to_numpy(), nan=0.0)
    owners = values.astype("uint32")
    if owners.shape != (grid.height, grid.width):  # geocube must honour ``like`` exactly
        raise RuntimeError(f"geocube returned {owners.shape}, expected {(grid.height, grid.width)}")
    return owners


def classes_of_instances(fields: gpd.GeoDataFrame, instances: np.ndarray) -> np.ndarray:
    """The classes mask (uint8) of an instance raster made by :func:`rasterize_instances` from the
    same ``fields``: each pixel gets its field's ``class_id``, 0 where there is no field. Use it to
    rasterize a cell once when both layers are needed."""
    class_id = np.asarray(fields["class_id"].to_numpy(), dtype="int64") if len(fields) else np.empty(0, "int64")
    if class_id.size and (class_id.min() < 0 or class_id.max() > 255):
        raise ValueError(f"class_id must be 0..255 to fit a uint8 mask, got {class_id.min()}..{class_id.max()}")
    if instances.size and int(instances.max()) > len(fields):
        raise ValueError(f"the instance raster has id {int(instances.max())} but there are {len(fields)} fields; "
                         "give the fields it was rasterized from")
    lookup = np.concatenate([[0], class_id]).astype("uint8")
    return lookup[instances]


def rasterize_classes(fields: gpd.GeoDataFrame, grid: TargetGrid) -> np.ndarray:
    """A (rows, cols) uint8 mask: each pixel whose centre lies in a field gets the field's
    ``class_id`` (1..8, or 255 and the spec's ``unmapped_label`` for fields of no class); 0 where
    there is no field. Where fields overlap, the smaller field wins (drawn last)."""
    return classes_of_instances(fields, rasterize_instances(fields, grid))


def chip_instances(window: np.ndarray) -> np.ndarray:
    """A chip's instance window renumbered 1..n (uint32): ids in order of first appearance, row by
    row, 0 (no field) kept. Deterministic, and independent of the cell-wide ids."""
    window = np.asarray(window)
    if window.ndim != 2:
        raise ValueError(f"chip_instances needs a (rows, cols) window, got shape {window.shape}")
    flat = window.ravel()
    uniques, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    lookup = np.zeros(len(uniques), dtype="uint32")
    nonzero = np.flatnonzero(uniques != 0)
    ranked = nonzero[np.argsort(first[nonzero], kind="stable")]
    lookup[ranked] = np.arange(1, len(ranked) + 1, dtype="uint32")
    return lookup[inverse].reshape(window.shape)


def field_boundaries(instances: np.ndarray) -> np.ndarray:
    """The boundary raster (uint8) of an instance raster: 0 background, 1 field interior, 2 field
    boundary, a field pixel one of whose 8 neighbours has another id (another field or no field).

    Compute it on the whole cell and cut chips from the result: a chip's edge is then no boundary
    unless the field really ends there. Beyond the raster's own edge nothing is known, so the edge
    does not make a boundary either."""
    instances = np.asarray(instances)
    if instances.ndim != 2:
        raise ValueError(f"field_boundaries needs a (rows, cols) instance raster, got shape {instances.shape}")
    rows, cols = instances.shape
    # Edge padding repeats border pixels: a pixel's neighbours beyond the edge are itself or its own
    # in-raster neighbours, so the raster's edge adds no boundary.
    padded = np.pad(instances, 1, mode="edge")
    differs = np.zeros(instances.shape, dtype=bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                differs |= padded[1 + dr:1 + dr + rows, 1 + dc:1 + dc + cols] != instances
    out = np.where(instances != 0, INTERIOR, BACKGROUND).astype("uint8")
    out[(instances != 0) & differs] = BOUNDARY
    return out


def mask_nodata(mask: np.ndarray, covered: np.ndarray, label: int = IGNORE_LABEL) -> np.ndarray:
    """A copy of ``mask`` with ``label`` (default 255, the ignore index) wherever the image has no
    data (``covered`` False): a pixel nobody saw is never learned from."""
    mask = np.asarray(mask)
    covered = np.asarray(covered)
    if covered.shape != mask.shape:
        raise ValueError(f"covered has shape {covered.shape} but the mask {mask.shape}; give both on one grid")
    if covered.dtype != bool:
        raise ValueError(f"covered must be a boolean array (True where the image has data), got {covered.dtype}")
    if np.issubdtype(mask.dtype, np.integer) and not np.iinfo(mask.dtype).min <= label <= np.iinfo(mask.dtype).max:
        raise ValueError(f"label {label} does not fit the mask's {mask.dtype}")
    out = mask.copy()
    out[~covered] = label
    return out
