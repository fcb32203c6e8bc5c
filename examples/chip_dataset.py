"""A PyTorch-style Dataset over a cropchips output folder, using only the chip index and rasterio.

It needs no PyTorch: any framework that takes an object with ``__len__`` and
``__getitem__`` can use it (``torch.utils.data.DataLoader(ChipDataset(...))``).

    from examples.chip_dataset import ChipDataset
    train = ChipDataset("/mnt/mimmo", split="train")
    image, mask = train[0]        # (10, 256, 256) float32 reflectance, (256, 256) int64 classes

The root may also be an object-store URL (``s3://bucket/prefix``): geopandas reads the index
through fsspec and rasterio the chips through GDAL's ``/vsis3/``, both with the usual AWS
settings (for an S3-compatible server GDAL also wants ``AWS_S3_ENDPOINT=host:port``, and
``AWS_HTTPS=NO`` / ``AWS_VIRTUAL_HOSTING=FALSE`` when it is plain HTTP with path-style URLs).
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio


class ChipDataset:
    """(image, mask) pairs of one split, read on demand."""

    def __init__(self, root: str | Path, split: str | None = "train", scale: float = 1e-4):
        self.root = str(root).rstrip("/")
        index = gpd.read_parquet(self._path("index.parquet"))
        self.rows = index if split is None else index[index["split"] == split]
        self.rows = self.rows.sort_values("name").reset_index(drop=True)
        self.scale = scale  # harmonised DN x 1e-4 = surface reflectance

    def _path(self, rel: str) -> str:
        """``root/rel`` for a folder or a URL alike."""
        return f"{self.root}/{rel}"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        row = self.rows.iloc[i]
        with rasterio.open(self._path(row["image"])) as src:
            image = src.read().astype("float32") * self.scale
        with rasterio.open(self._path(row["mask"])) as src:
            mask = src.read(1).astype("int64")
        return image, mask
