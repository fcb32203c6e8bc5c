"""Per-task manifests: written last and atomically, they mark a task's outputs as complete.

A redelivered task whose manifest matches (same task id, same processing settings, every
file present with its recorded size) is re-reported without redoing the work. A task that
crashed mid-write has no manifest and is simply redone: its files are overwritten by
atomic renames and chips it no longer produces are removed.
"""

from __future__ import annotations

import logging
from typing import Any

from .messages import ChipRecord, check_safe_id
from .storage import Storage
from .writing import IMAGES_DIR, MANIFESTS_DIR, MASKS_DIR, METADATA_DIR

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def manifest_path(cell_id: str) -> str:
    """The manifest's path relative to the output location."""
    return f"{MANIFESTS_DIR}/{check_safe_id(cell_id, 'cell id')}.json"


def write_manifest(storage: Storage, cell_id: str, body: dict[str, Any]) -> None:
    """Write the manifest whole, after the chips, with the sizes of the files it vouches for."""
    files = {}
    for chip in body.get("chips", []):
        for rel in (chip["image"], chip["mask"]):
            files[rel] = storage.size(rel)
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
    for rel, size in body.get("files", {}).items():
        try:
            if storage.size(rel) != size:
                log.warning("%s changed size since the manifest: redoing the task", rel)
                return None
        except FileNotFoundError:
            log.warning("%s listed in the manifest is missing: redoing the task", rel)
            return None
    return body


def chips_from_manifest(body: dict[str, Any]) -> tuple[ChipRecord, ...]:
    return tuple(ChipRecord(**c) for c in body.get("chips", []))


def remove_other_chips(storage: Storage, cell_id: str, keep: set[str]) -> int:
    """Delete this cell's chip files that are not in ``keep`` (left by an earlier, different run)."""
    removed = 0
    for sub in (IMAGES_DIR, MASKS_DIR, METADATA_DIR):
        for rel in storage.list(sub, f"{cell_id}-chip"):
            if rel.rsplit("/", 1)[-1].rsplit(".", 1)[0] not in keep:
                storage.delete(rel)
                removed += 1
    if removed:
        log.info("removed %d stale chip files of cell %s", removed, cell_id)
    return removed
