"""The dataset spec on the master's command line: ``--spec FILE``, one flag per spec key, ``--write-spec``.

The flags are made from :class:`~cropchips.spec.DatasetSpec`'s fields (name, type, docstring,
default), so a new key is a new flag without writing it twice. A flag given (or its
``CROPCHIPS_*`` twin set) overrides the spec file; one not given leaves the file's value, or
the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from types import NoneType, UnionType
from typing import Any

from cropchips.raster.composite import methods
from cropchips.cli.options import EnvArgumentParser
from cropchips.spec import CLASS_MAP_FILE_KEY, DatasetSpec, field_docs, field_types
from cropchips.raster.write import COMPRESSIONS, FORMATS

#: Spec fields that are not flags: the version, the class map's content (``--class-map`` names its file)
#: and the fingerprint the master computes.
NOT_FLAGS = ("spec_version", "class_map", "gpkg_fingerprint")

_CHOICES = {"format": FORMATS, "compression": COMPRESSIONS}
_METAVARS = {"bbox": "W,S,E,N", "aoi": "FILE", "bands": "B02,B03,...", "clear_classes": "4,5,6",
             "split_ratios": "TRAIN,VAL,TEST", "datetime": "START/END"}
_GROUPS = (("area", ("start_x", "start_y", "x_cells", "y_cells", "bbox", "aoi", "grid_step", "min_polygons",
                     "layer")),
           ("scenes", ("collection", "datetime", "max_cloud", "max_task_scenes", "max_scenes")))


def flag_name(key: str) -> str:
    """``chip_size`` -> ``--chip-size``."""
    return "--" + key.replace("_", "-")


def spec_keys() -> list[str]:
    """The spec keys that are flags, in field order."""
    return [f.name for f in dataclasses.fields(DatasetSpec) if f.name not in NOT_FLAGS]


def add_spec_options(parser: EnvArgumentParser) -> None:
    """``--spec``, ``--write-spec``, ``--class-map`` and one flag per spec key (all default None: not given)."""
    main = parser.add_argument_group(
        "dataset spec", "everything that shapes the chips; workers build them from the spec the tasks carry. "
        "Keys of the YAML file are these flags' names with underscores (chip_size: 64); a flag overrides the file")
    parser.option("--spec", default=None, group=main, metavar="FILE",
                  help="dataset spec YAML file (master.py --write-spec prints one to start from)")
    parser.add_argument("--write-spec", action="store_true",
                        help="print the effective dataset spec (file + flags + defaults) as YAML and exit")
    parser.option("--class-map", default=None, group=main, metavar="CSV",
                  help="CSV mapping HCAT3 codes to classes; its content goes into the spec "
                       "(default: the packaged hcat_classes.csv)")
    groups = {name: parser.add_argument_group(f"dataset spec: {name}") for name, _ in _GROUPS}
    group_of = {key: groups[name] for name, keys in _GROUPS for key in keys}
    chips = parser.add_argument_group("dataset spec: chips")
    docs, types, defaults = field_docs(), field_types(), DatasetSpec()
    for key in spec_keys():
        kind = _inner(types[key])
        default = getattr(defaults, key)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = docs.get(key, key).replace("%", "%%")  # argparse formats help with %
        if default is not None and not help_text.rstrip(".").endswith(")"):
            help_text = f"{help_text} (default: {shown})"
        group = group_of.get(key, chips)
        if kind is bool:
            parser.toggle(flag_name(key), default=None, group=group, help=help_text)
            continue
        parse = kind if kind in (int, float) else str
        parser.option(flag_name(key), type=parse, default=None, group=group, help=help_text,
                      choices=methods() if key == "composite" else _CHOICES.get(key), metavar=_METAVARS.get(key))


def spec_from_args(args: argparse.Namespace) -> DatasetSpec:
    """The run's spec: the ``--spec`` file (or the defaults), overridden by every spec flag given."""
    base = DatasetSpec.from_yaml(args.spec) if args.spec else DatasetSpec()
    overrides: dict[str, Any] = {key: getattr(args, key) for key in spec_keys()}
    overrides[CLASS_MAP_FILE_KEY] = args.class_map
    return base.with_overrides(overrides)


def _inner(kind: Any) -> Any:
    """``float | None`` -> ``float``; ``tuple[...]`` -> ``tuple``."""
    if isinstance(kind, UnionType) or typing.get_origin(kind) is typing.Union:
        (kind,) = [arg for arg in typing.get_args(kind) if arg is not NoneType]
    return typing.get_origin(kind) or kind
