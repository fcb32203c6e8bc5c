"""Class masks: field polygons rasterized (with geocube) onto the exact pixel grid of the image."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import xarray as xr

from cropchips.raster.grid import TargetGrid


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


def rasterize_classes(fields: gpd.GeoDataFrame, grid: TargetGrid) -> np.ndarray:
    """A (rows, cols) uint8 mask: each pixel whose centre lies in a field gets the field's
    ``class_id``; 0 elsewhere. Where fields overlap, the smaller field wins (drawn last)."""
    if fields.empty:
        return np.zeros((grid.height, grid.width), dtype="uint8")
    from geocube.api.core import make_geocube

    local = fields.to_crs(grid.crs)[["class_id", "geometry"]].copy()
    local["class_id"] = local["class_id"].astype("int32")
    local = local.iloc[np.argsort(-local.geometry.area.to_numpy(), kind="stable")]
    cube = make_geocube(vector_data=local, measurements=["class_id"], like=grid_template(grid), fill=0)
    values = np.nan_to_num(cube["class_id"].to_numpy(), nan=0.0)
    mask = values.astype("uint8")
    if mask.shape != (grid.height, grid.width):  # geocube must honour ``like`` exactly
        raise RuntimeError(f"geocube returned {mask.shape}, expected {(grid.height, grid.width)}")
    return mask
