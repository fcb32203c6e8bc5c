"""``OUTPUT_DIR/dataset.yaml``: the spec of the chips an output folder holds.

The master does not see the workers' mounts, so the first worker to write into a folder
records the run's spec there (created atomically: exactly one writer wins, the others read
it). Every later task checks its own spec against it: the area may grow from run to run
(:data:`~cropchips.spec.AREA_FIELDS` may differ), anything else that shapes a chip may not,
unless the task was published with ``master.py --force``, which replaces the folder's spec.
"""

from __future__ import annotations

import logging

from cropchips.errors import InputDataError
from cropchips.spec import AREA_FIELDS, DatasetSpec
from cropchips.output.storage import Storage

log = logging.getLogger(__name__)

#: Where the spec lives, relative to the output folder.
SPEC_FILE = "dataset.yaml"


def read_folder_spec(storage: Storage) -> DatasetSpec | None:
    """The folder's spec, or None if no worker has written one yet; InputDataError if it is unreadable."""
    try:
        text = storage.read_bytes(SPEC_FILE).decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise InputDataError(f"{storage.url(SPEC_FILE)} is not UTF-8 text; restore it or delete it "
                             "(the next task writes its run's spec there)") from None
    try:
        return DatasetSpec.from_yaml(text)
    except Exception as exc:  # ConfigError, and anything a hand-edited file may cause
        raise InputDataError(f"{storage.url(SPEC_FILE)} is not a valid dataset spec ({exc}); restore it, or "
                             "delete it if the folder's chips were all made with this run's spec") from None


def check_folder_spec(storage: Storage, spec: DatasetSpec, *, force: bool = False) -> None:
    """Make sure the folder's chips are ``spec``'s dataset: write ``dataset.yaml`` if there is none
    (the first writer wins), else compare. A spec that differs in anything but the area raises
    InputDataError naming the keys, unless ``force``, which replaces the file."""
    text = spec.to_yaml().encode("utf-8")
    if storage.create_exclusive(SPEC_FILE, text):
        log.info("wrote the dataset spec %s to %s", spec.dataset_id(), storage.url(SPEC_FILE))
        return
    current = read_folder_spec(storage)
    if current is not None and current.dataset_digest() == spec.dataset_digest():
        return
    if force:
        storage.write_bytes(SPEC_FILE, text)
        log.warning("replaced %s (dataset %s) with this run's spec %s (--force): chips of cells this run does "
                    "not cover still belong to the old one", storage.url(SPEC_FILE),
                    current.dataset_id() if current else "?", spec.dataset_id())
        return
    if current is None:  # deleted between the two calls: try once more
        check_folder_spec(storage, spec, force=force)
        return
    keys = spec.differences(current)
    shown = ", ".join(f"{key} ({_show(getattr(spec, key))} here, {_show(getattr(current, key))} in the folder)"
                      for key in keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    raise InputDataError(
        f"the output folder {storage.location} holds dataset {current.dataset_id()} ({SPEC_FILE}), and this run's "
        f"spec {spec.dataset_id()} differs in {shown}. Only the area ({', '.join(AREA_FIELDS)}) may change from run "
        f"to run of one dataset: write this run to another --output-dir, or re-run the master with the folder's "
        f"spec (master.py --spec {storage.url(SPEC_FILE)}), or start the folder's dataset over with master.py --force")


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > 40:
        return f"{text[:37]}..."
    return text
