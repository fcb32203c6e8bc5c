"""Per-task manifests: written last and atomically, they mark a task's outputs as complete.

A redelivered task whose manifest matches (same task id, same processing settings, every
file, provenance sidecars included, present with its recorded size and sha256) is
re-reported without redoing the work. A task that crashed mid-write has no manifest and is
simply redone: its files are overwritten by atomic renames and chips it no longer produces
are removed. Only the holder of the cell's lease (:mod:`cropchips.output.leases`) writes them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from cropchips.queue.messages import ChipRecord, check_safe_id
from cropchips.output.storage import Storage
from cropchips.raster.write import IMAGES_DIR, LAYER_DIRS, MANIFESTS_DIR, METADATA_DIR

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2


def manifest_path(cell_id: str) -> str:
    """The manifest's path relative to the output location."""
    return f"{MANIFESTS_DIR}/{check_safe_id(cell_id, 'cell id')}.json"


def chip_files(chip: dict[str, Any]) -> tuple[str, ...]:
    """The files of one chip: image, mask, its other label layers (instances, boundaries) if it has
    any, and provenance sidecar."""
    layers = chip.get("layers") or {}
    extra = tuple(rel for _, rel in sorted(layers.items()) if rel not in (chip["image"], chip["mask"]))
    return (chip["image"], chip["mask"], *extra, f"{METADATA_DIR}/{chip['name']}.json")


def write_manifest(storage: Storage, cell_id: str, body: dict[str, Any]) -> None:
    """Write the manifest whole, after the chips, with the size and sha256 of every file it vouches for."""
    files = {}
    for chip in body.get("chips", []):
        for rel in chip_files(chip):
            files[rel] = {"size": storage.size(rel), "sha256": storage.sha256(rel)}
    storage.write_json(manifest_path(cell_id), {"manifest_version": MANIFEST_VERSION, **body, "files": files})


def read_complete_manifest(storage: Storage, cell_id: str, task_id: str, settings: dict[str, Any]) -> dict | None:
    """The manifest if the task's outputs are complete for these settings, else None (and why, logged)."""
    path = manifest_path(cell_id)
    try:
        body = storage.read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("manifest %s unreadable (%s): redoing the task", path, exc)
        return None
    if body.get("manifest_version") != MANIFEST_VERSION or body.get("task_id") != task_id:
        log.info("manifest %s is for another task or version: redoing", path)
        return None
    if body.get("settings") != settings:
        log.info("manifest %s was written with other settings: redoing", path)
        return None
    files = body.get("files")
    chips = body.get("chips")
    if not isinstance(files, dict) or not isinstance(chips, list):
        log.warning("manifest %s is malformed: redoing the task", path)
        return None
    expected = {rel for chip in chips for rel in chip_files(chip)}
    if set(files) != expected:
        log.warning("manifest %s does not list every file of its chips: redoing the task", path)
        return None
    for rel, recorded in files.items():
        try:
            if not isinstance(recorded, dict) or storage.size(rel) != recorded.get("size"):
                log.warning("%s changed size since the manifest: redoing the task", rel)
                return None
            if storage.sha256(rel) != recorded.get("sha256"):
                log.warning("%s changed since the manifest (sha256 differs): redoing the task", rel)
                return None
        except FileNotFoundError:
            log.warning("%s listed in the manifest is missing: redoing the task", rel)
            return None
    return body


def chips_from_manifest(body: dict[str, Any]) -> tuple[ChipRecord, ...]:
    return tuple(ChipRecord(**c) for c in body.get("chips", []))


def chip_name(cell_id: str, k: int) -> str:
    """The name of the cell's chip number ``k`` (its files are ``images/NAME.tif``, ``masks/NAME.tif``, ...)."""
    return f"{cell_id}-chip{k:02d}"


def is_chip_of(name: str, cell_id: str) -> bool:
    """Is ``name`` one that :func:`chip_name` gives a chip of ``cell_id``?"""
    prefix = f"{cell_id}-chip"
    return name.startswith(prefix) and name[len(prefix):].isascii() and name[len(prefix):].isdigit()


#: Most chip names :func:`remove_other_chips` deletes one by one; a cell that may have more is listed instead.
MAX_NAMED_CHIPS = 256


def remove_other_chips(storage: Storage, cell_id: str, keep: set[str], layers: Collection[str] | None = None,
                       names: Collection[str] | None = None) -> int:
    """Delete this cell's chip files that are not in ``keep`` (left by an earlier, different run): images,
    label layers (masks, instances, boundaries) and sidecars.

    ``layers`` names the label layers this run writes (``DatasetSpec.labels``; None: keep every layer of
    a kept chip): a kept chip's file of another layer, left by a run that made that layer, goes too.

    ``names``: every name the cell's chips can have (see :meth:`TaskProcessor._chip_names`). In a folder
    (local or NFS) each of their files is then deleted by name, where it exists, instead of listing the
    folders: they hold every cell's chips (10^4-10^5 files in a national run; 18 ms a folder of 40,000 on
    local ext4, five folders a task, and far more on NFS), so listing them made every task slower the
    further a run got. An object store lists by prefix on its side, so it is always listed."""
    if layers is not None:
        unknown = sorted(set(layers) - set(LAYER_DIRS))
        if unknown:
            raise ValueError(f"unknown label layer(s) {unknown}; the layers are {', '.join(LAYER_DIRS)}")
    by_name = names is not None and storage.is_local and len(names) <= MAX_NAMED_CHIPS
    removed = 0
    folders = [(IMAGES_DIR, True), *((folder, layers is None or layer in layers or layer == "classes")
                                     for layer, folder in LAYER_DIRS.items()), (METADATA_DIR, True)]
    for sub, kept_layer in folders:
        if by_name:
            suffix = ".json" if sub == METADATA_DIR else ".tif"
            rels = [f"{sub}/{name}{suffix}" for name in sorted(names) if not kept_layer or name not in keep]
            removed += sum(bool(storage.delete(rel)) for rel in rels)
            continue
        for rel in storage.list(sub, f"{cell_id}-chip"):
            if not kept_layer or rel.rsplit("/", 1)[-1].rsplit(".", 1)[0] not in keep:
                storage.delete(rel)
                removed += 1
    if removed:
        log.info("removed %d stale chip files of cell %s", removed, cell_id)
    return removed
