"""Output formats and the example loader: COG chips pass `rio cogeo validate`, the dataset loads as (image, mask)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from conftest import REPO
from cropchips.dataset.index import finalize
from cropchips.sources.hrefs import HrefPolicy
from helpers import SpecProcessor


def process(sample_area, sample_task, out, **over):
    return SpecProcessor("o@test", output_dir=out, gpkg=str(sample_area.gpkg), layer=sample_area.layer,
                         hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),)), **over).process(sample_task)


def whole_sample_task(sample_area, sample_task):
    """One task over the whole sample area (2 x 2 cells of 0.02 degrees: 3.5 x 4.4 km), which holds the
    default 256 px chips that a single cell does not."""
    from dataclasses import replace

    from cropchips.queue.messages import Cell

    x0, y0, step = sample_area.start_x, sample_area.start_y, sample_area.grid_step
    cell = Cell(id="whole-sample", row=0, col=0,
                bbox=(x0, y0, x0 + step * sample_area.x_cells, y0 + step * sample_area.y_cells))
    return replace(sample_task, cell=cell, task_id="whole-sample-t")


def test_cog_chips_are_valid_cogs_with_the_same_pixels(sample_area, sample_task, tmp_path):
    task = whole_sample_task(sample_area, sample_task)
    cog = process(sample_area, task, tmp_path / "cog", format="cog", chip_size=256)
    plain = process(sample_area, task, tmp_path / "plain", chip_size=256)
    assert cog.status == plain.status == "ok" and len(cog.chips) == len(plain.chips) > 0
    rio = [str(Path(sys.executable).parent / "rio")]  # the venv's rio, with the rio-cogeo plugin
    for a, b in zip(cog.chips, plain.chips):
        for rel in (a.image, a.mask):
            checked = subprocess.run([*rio, "cogeo", "validate", str(tmp_path / "cog" / rel)], capture_output=True,
                                     text=True)
            assert "is a valid cloud optimized GeoTIFF" in checked.stdout, checked.stdout + checked.stderr
        with rasterio.open(tmp_path / "cog" / a.image) as x, rasterio.open(tmp_path / "plain" / b.image) as y:
            assert np.array_equal(x.read(), y.read()) and x.descriptions == y.descriptions
            assert x.overviews(1) == [2] and x.block_shapes[0] == (128, 128)
        with rasterio.open(tmp_path / "cog" / a.mask) as m:
            overview = m.read(1, out_shape=(128, 128))
            assert set(np.unique(overview)) <= set(np.unique(m.read(1)))  # majority, no invented classes


def test_example_dataset_loads_image_and_mask_pairs(sample_area, sample_task, tmp_path):
    result = process(sample_area, sample_task, tmp_path, chip_size=64)
    finalize(tmp_path)
    sys.path.insert(0, str(REPO))
    try:
        from examples.chip_dataset import ChipDataset
    finally:
        sys.path.remove(str(REPO))
    every = ChipDataset(tmp_path, split=None)
    assert len(every) == len(result.chips)
    image, mask = every[0]
    assert image.shape == (10, 64, 64) and mask.shape == (64, 64)
    assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() < 1.0  # reflectance
    assert set(np.unique(mask)) <= {*range(9), 255}  # 255: fields of no class
    splits = sum(len(ChipDataset(tmp_path, split=s)) for s in ("train", "val", "test"))
    assert splits == len(every)
    with pytest.raises(IndexError):
        every[len(every)]
