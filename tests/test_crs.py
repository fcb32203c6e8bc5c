"""Coordinate transformers are made once per pair of CRSs and shared by threads (cropchips.crs)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pyproj import CRS

from cropchips.crs import transformer


def test_one_transformer_per_pair_of_crss_in_lon_lat_order():
    to_utm = transformer("EPSG:4326", "EPSG:32630")
    assert transformer("EPSG:4326", "EPSG:32630") is to_utm
    assert transformer("EPSG:32630", "EPSG:4326") is not to_utm
    assert transformer(CRS.from_epsg(25830), "EPSG:4326") is transformer(CRS.from_epsg(25830), "EPSG:4326")
    # The central meridian of UTM zone 30 (3 deg W) on the equator is easting 500 km, northing 0: x/y order.
    x, y = to_utm.transform(-3.0, 0.0)
    assert abs(x - 500_000) < 1e-6 and abs(y) < 1e-6


def test_threads_share_a_transformer_and_get_the_same_coordinates():
    to_lonlat = transformer("EPSG:32630", "EPSG:4326")
    rng = np.random.default_rng(0)
    xs, ys = rng.uniform(200_000, 800_000, (16, 1000)), rng.uniform(4_000_000, 4_500_000, (16, 1000))
    alone = [to_lonlat.transform(x, y) for x, y in zip(xs, ys)]
    with ThreadPoolExecutor(8) as pool:
        shared = list(pool.map(lambda xy: to_lonlat.transform(*xy), zip(xs, ys)))
    for (a_lon, a_lat), (s_lon, s_lat) in zip(alone, shared):
        assert np.array_equal(a_lon, s_lon) and np.array_equal(a_lat, s_lat)
