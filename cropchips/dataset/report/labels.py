"""The mask labels the report shows: their ids, the words it writes for them and their colours.

A classes mask holds 0 (no field), the classes 1..8 and :data:`~cropchips.fields.classes.IGNORE_LABEL`
(255: a field whose crop is none of the classes or unknown, and pixels without image data). Every
one of them gets a row in the report, counted 0 where an older index has no column for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from cropchips.fields.classes import IGNORE_LABEL, LABEL_NAMES
from cropchips.dataset.report.colours import OTHER_LABEL_COLOUR, PALETTE

#: The words the report writes for the labels that are not crop classes (the classes read as their names).
LABEL_TEXT: dict[int, str] = {0: "no field", IGNORE_LABEL: "ignore: no class / no data"}
_PIXELS_COLUMN = re.compile(r"^class_(\d+)_pixels$")


def pixels_column(label: int) -> str:
    """The index column of a label's pixel count: ``class_255_pixels``."""
    return f"class_{label}_pixels"


def label_ids(columns: Iterable[Any] = ()) -> list[int]:
    """The labels to report, ascending: every label of :data:`~cropchips.fields.classes.LABEL_NAMES`
    and any other a ``class_K_pixels`` column among ``columns`` counts (e.g. a custom unmapped label)."""
    found = {int(m.group(1)) for c in columns if (m := _PIXELS_COLUMN.match(str(c))) and int(m.group(1)) < 256}
    return sorted(set(LABEL_NAMES) | found)


def record_label_ids(records: Iterable[Mapping[str, Any]]) -> list[int]:
    """The labels to report for chip records: those of :func:`label_ids` and any their ``class_pixels`` name."""
    keys = {f"class_{k}_pixels" for r in records for k in (r.get("class_pixels") or {}) if str(k).isdigit()}
    return label_ids(keys)


def label_text(label: int) -> str:
    """How the report names a label: ``no field``, ``cereals``, ``ignore: no class / no data``, ``label 9``."""
    if label in LABEL_TEXT:
        return LABEL_TEXT[label]
    name = LABEL_NAMES.get(label)
    return name.replace("_", " ") if name else f"label {label}"


def label_colour(label: int) -> str:
    """The fixed colour of a label (:data:`~cropchips.dataset.report.colours.PALETTE`), grey-black if it has none."""
    return PALETTE.get(label, OTHER_LABEL_COLOUR)
