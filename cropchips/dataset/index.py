"""The dataset as a whole: a GeoParquet chip index with spatially disjoint train/val/test splits.

The index is built from the chips' provenance (the results topic or the ``metadata/``
sidecars, which hold the same records), so it can always be rebuilt from the files alone.
Each chip's split is the one the master gave its cell (:mod:`cropchips.plan.splits`); chips
stay inside their cells, so chips of different splits never overlap and none is dropped.
Records of older versions carry no split: they are split here by their spatial block
(:class:`SplitPolicy`), and a chip that would overlap a chip of another split is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import shapely

from cropchips.crs import transformer
from cropchips.errors import InputDataError
from cropchips.spec import DatasetSpec
from cropchips.output.spec_file import SPEC_FILE, read_folder_spec
from cropchips.output.storage import Storage, open_storage
from cropchips.raster.write import IMAGES_DIR, MASKS_DIR, METADATA_DIR
from cropchips.fields.classes import IGNORE_LABEL
from cropchips.spec import LABEL_LAYERS

log = logging.getLogger(__name__)

INDEX_NAME = "index.parquet"
from cropchips.queue.messages import SPLITS


@dataclass(frozen=True)
class SplitPolicy:
    """Spatial blocks of ``block_size_m`` metres go whole to one split, by a deterministic hash."""

    block_size_m: float = 10_000.0
    """Side of the square blocks, in the chips' own (UTM) metres."""
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Shares of train, val and test blocks."""
    salt: str = ""
    """Changes the assignment while keeping it deterministic."""

    def __post_init__(self) -> None:
        if not self.block_size_m > 0:
            raise ValueError("the split block size must be > 0 metres")
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or not np.isclose(sum(self.ratios), 1.0):
            raise ValueError(f"split ratios must be three non-negative numbers adding up to 1, got {self.ratios}")

    def split_of(self, crs: str, x: float, y: float) -> str:
        """The split of the block holding (x, y) in ``crs``."""
        bx, by = int(np.floor(x / self.block_size_m)), int(np.floor(y / self.block_size_m))
        digest = hashlib.sha256(f"{self.salt}|{crs}|{self.block_size_m}|{bx}|{by}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        edges = np.cumsum(self.ratios)
        return SPLITS[int(np.searchsorted(edges, u, side="right").clip(0, 2))]


def split_policy(output: Storage | Path | str, spec: DatasetSpec | None = None) -> SplitPolicy:
    """The splits of ``spec`` (the run's), else of the folder's ``dataset.yaml``, else the defaults."""
    if spec is None:
        spec = read_folder_spec(open_storage(output))
        if spec is None:
            log.warning("%s has no %s: splitting with the default spec's blocks", output, SPEC_FILE)
            spec = DatasetSpec()
    return SplitPolicy(block_size_m=spec.split_block_size, ratios=spec.split_ratios)


def records_from_metadata(output: Storage | Path | str, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The provenance records in ``metadata/*.json`` of every chip (or of the chips ``names``),
    for the chips whose image and mask exist. The sidecars are the record of the dataset: the
    results on Kafka carry only what the monitor needs to count."""
    storage = open_storage(output)
    if names is None:
        sidecars = [rel for rel in storage.list(METADATA_DIR) if rel.endswith(".json")]
        if not sidecars and (not storage.is_local or not Path(storage.url(METADATA_DIR)).is_dir()):
            raise InputDataError(f"{storage.url(METADATA_DIR)} does not exist or holds no chip sidecars: is "
                                 f"{storage} a dataset written by the workers?")
    else:
        sidecars = [f"{METADATA_DIR}/{name}.json" for name in names]
    files = set(storage.list(IMAGES_DIR)) | set(storage.list(MASKS_DIR))

    def read(rel: str) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(rel))
        except FileNotFoundError:
            log.warning("%s is missing; its chip is left out of the index", rel)
            return None

    # Object stores answer each read in tens of milliseconds: read the sidecars concurrently.
    with ThreadPoolExecutor(max_workers=1 if storage.is_local else 16) as pool:
        loaded = list(pool.map(read, sidecars))
    records = []
    for rel, record in zip(sidecars, loaded):
        if record is None:
            continue
        if record["image"] in files and record["mask"] in files:
            records.append(record)
        else:
            log.warning("%s: its image or mask is missing; left out of the index", rel)
    return records


def build_index(records: Iterable[dict[str, Any]], policy: SplitPolicy = SplitPolicy()) -> tuple[gpd.GeoDataFrame, Counter]:
    """One row per chip with its footprint (EPSG:4326) and split (the record's, else ``policy``'s); chips
    that would overlap a chip of another split are dropped (the counter says how many, per split: never
    one for chips that carry their cell's split)."""
    rows = []
    for r in records:
        layers = r.get("layers") or {"classes": r["mask"]}
        left, bottom, right, top = r["bounds"]
        cx, cy = (left + right) / 2, (bottom + top) / 2
        to_lonlat = transformer(r["crs"], "EPSG:4326")
        footprint = shapely.box(*to_lonlat.transform_bounds(left, bottom, right, top, densify_pts=5))
        rows.append({
            "name": r["name"], "image": r["image"], "mask": r["mask"], "cell_id": r.get("cell_id", ""),
            "crs": r["crs"], "left": left, "bottom": bottom, "right": right, "top": top,
            "scene_ids": [s["id"] for s in r.get("scenes", ())],
            "scene_dates": [s["datetime"][:10] for s in r.get("scenes", ())],
            "method": r.get("method", ""), "dataset_id": r.get("dataset_id", ""),
            "clear_fraction": r.get("clear_fraction"),
            "nodata_fraction": r.get("nodata_fraction"),
            **{f"class_{k}_pixels": int(r.get("class_pixels", {}).get(str(k), 0)) for k in (*range(9), IGNORE_LABEL)},
            "label_layers": sorted(layers, key=LABEL_LAYERS.index),
            "instances": layers.get("instances", ""), "boundaries": layers.get("boundaries", ""),
            "bands": list(r.get("bands", ())), "bin_dates": list(r.get("bin_dates", ())),
            "bin_clear_fractions": [float(f) for f in r.get("bin_clear_fractions", ())],
            "bin_valid": [bool(v) for v in r.get("bin_valid", ())],
            "split": r.get("split") or policy.split_of(r["crs"], cx, cy), "worker_id": r.get("worker_id", ""),
            "run_id": r.get("run_id", ""), "task_id": r.get("task_id", ""), "geometry": footprint})
    frame = gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326") if rows else gpd.GeoDataFrame(
        {"name": [], "split": []}, geometry=[], crs="EPSG:4326")
    frame, dropped = drop_cross_split_overlaps(frame)
    return frame.reset_index(drop=True), dropped


def drop_cross_split_overlaps(frame: gpd.GeoDataFrame) -> tuple[gpd.GeoDataFrame, Counter]:
    """Chips near a block edge can overlap chips of a neighbouring block in another split, which
    would leak pixels between splits. For each such pair the chip of the larger split is dropped
    (the smaller splits are scarcer). Overlap is tested on the chips' exact native boxes, within
    each CRS (chips of two UTM zones are compared only if they share a zone)."""
    dropped: Counter = Counter()
    if frame.empty:
        return frame, dropped
    sizes = frame["split"].value_counts().to_dict()
    keep = np.ones(len(frame), dtype=bool)
    splits = frame["split"].to_numpy()
    names = frame["name"].to_numpy()
    for _, group in frame.groupby("crs").indices.items():
        boxes = shapely.box(frame["left"].to_numpy()[group], frame["bottom"].to_numpy()[group],
                            frame["right"].to_numpy()[group], frame["top"].to_numpy()[group])
        tree = shapely.STRtree(boxes)
        a, b = tree.query(boxes, predicate="intersects")
        for i, j in sorted(zip(group[a].tolist(), group[b].tolist())):
            if i >= j or splits[i] == splits[j] or not (keep[i] and keep[j]):
                continue
            gi, gj = boxes[np.searchsorted(group, i)], boxes[np.searchsorted(group, j)]
            if gi.intersection(gj).area <= 0:  # touching edges share no pixel
                continue
            victim = i if (sizes[splits[i]], names[i]) >= (sizes[splits[j]], names[j]) else j
            keep[victim] = False
            dropped[splits[victim]] += 1
    if dropped:
        log.info("dropped %d chips overlapping chips of another split: %s", sum(dropped.values()), dict(dropped))
    return frame[keep], dropped


def of_folder_dataset(storage: Storage, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the dataset the folder's ``dataset.yaml`` names: chips that another spec left behind
    (a run with ``--force`` over fewer cells) are left out of the index, with a warning."""
    spec = read_folder_spec(storage)
    if spec is None:
        return records
    wanted = spec.dataset_id()
    kept = [r for r in records if r.get("dataset_id", wanted) in ("", wanted)]
    if len(kept) < len(records):
        log.warning("%d chips in %s belong to another dataset than its %s (%s) and are left out of the index; "
                    "delete them or run the master with --force over their cells", len(records) - len(kept),
                    storage, SPEC_FILE, wanted)
    return kept


def write_index(output: Storage | Path | str, frame: gpd.GeoDataFrame) -> str:
    """Publish ``index.parquet`` whole; return where it is."""
    storage = open_storage(output)
    storage.publish(INDEX_NAME, lambda tmp: frame.to_parquet(tmp, index=False))
    return storage.url(INDEX_NAME)


def finalize(output: Storage | Path | str, records: Sequence[dict[str, Any]] | None = None,
             policy: SplitPolicy = SplitPolicy()) -> dict[str, Any]:
    """Build and write the index and the STAC catalog from ``records`` (or from the sidecars);
    return a summary."""
    storage = open_storage(output)
    records = list(records) if records is not None else of_folder_dataset(storage, records_from_metadata(storage))
    frame, dropped = build_index(records, policy)
    path = write_index(storage, frame)
    from cropchips.dataset.catalog import build_catalog, write_catalog  # pystac: only when a dataset is finalised
    from cropchips.dataset.stats import STATS_NAME, write_stats

    stats = write_stats(storage, frame)
    catalog = write_catalog(storage, build_catalog(records, dict(zip(frame["name"], frame["split"])), stats=stats))
    counts = frame["split"].value_counts().to_dict() if len(frame) else {}
    summary = {"index": str(path), "catalog": str(catalog), "chips": int(len(frame)),
               "splits": {s: int(counts.get(s, 0)) for s in SPLITS},
               "dropped_for_overlap": {s: int(dropped.get(s, 0)) for s in SPLITS},
               "stats": storage.url(STATS_NAME) if stats else None}
    log.info("index %s: %d chips, %s", path, len(frame), summary["splits"])
    return summary
