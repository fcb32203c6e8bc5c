"""The dataset spec: defaults equal to the flags', validation, digest, YAML and overrides."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import re

import pytest
import yaml

import master
import monitor
import worker
from cropchips import spec as spec_module
from cropchips.fields.classes import DEFAULT_CLASS_MAP_PATH
from cropchips.errors import ConfigError
from cropchips.spec import SPEC_VERSION, DatasetSpec

PACKAGED_CSV = DEFAULT_CLASS_MAP_PATH.read_text(encoding="utf-8")
SMALL_CSV = "hcat3_code,hcat3_name,class_id\n3303050000,olive_plantations,1\n3301010100,common_soft_wheat,5\n"


# ---------------------------------------------------------------------- defaults


def _defaults(parser) -> dict:
    return {action.dest: action.default for action in parser._actions}


def test_every_spec_key_is_a_master_flag_and_none_is_a_worker_flag():
    master_defaults = _defaults(master.build_parser({}))
    worker_defaults = _defaults(worker.build_parser({}))
    monitor_defaults = _defaults(monitor.build_parser({}))
    keys = {f.name for f in dataclasses.fields(DatasetSpec)} - {"spec_version", "class_map", "gpkg_fingerprint"}
    assert keys <= set(master_defaults)
    # Not given, a flag leaves the spec file's value (or the spec's default): every one defaults to None.
    assert {key: master_defaults[key] for key in keys} == dict.fromkeys(keys)
    assert master_defaults["class_map"] is None and master_defaults["spec"] is None
    assert not (keys | {"class_map"}) & set(worker_defaults)  # the worker builds chips from the task's spec
    assert not keys & set(monitor_defaults)  # the index splits as the run's spec (or dataset.yaml) says
    assert DatasetSpec().spec_version == SPEC_VERSION == 2


def test_spec_defaults_are_the_seed_values():
    spec = DatasetSpec()
    assert (spec.start_x, spec.start_y, spec.grid_step, spec.x_cells, spec.y_cells) == (-5.80, 37.20, 0.05, 10, 10)
    assert (spec.chip_size, spec.max_chips_per_cell, spec.composite) == (256, 5, "median")
    assert (spec.collection, spec.datetime, spec.max_cloud) == ("sentinel-2-l2a", "2023-05-15/2023-06-30", 10.0)
    assert spec.bbox is None and spec.aoi is None and spec.gpkg_fingerprint is None and spec.area_mode == "grid"


def test_the_master_flags_offer_exactly_the_values_the_spec_accepts():
    choices = {action.dest: action.choices for action in master.build_parser({})._actions}
    assert tuple(choices["composite"]) == spec_module.methods() == ("median", "least-cloudy", "stack")
    assert "temporal" not in choices  # the time series is a compositor, not a side flag
    assert tuple(choices["format"]) == spec_module.FORMATS == ("gtiff", "cog")


def test_the_default_class_map_is_the_packaged_one_and_is_parsed():
    classes = DatasetSpec().classes()
    assert classes.class_of_code("3303050000") == 1  # olive_plantations
    assert classes.class_of_code("3301010100") == 5  # common soft wheat, a cereal


def test_every_field_has_a_docstring():
    tree = ast.parse(inspect.getsource(DatasetSpec))
    body = tree.body[0].body
    documented = {stmt.target.id for stmt, nxt in zip(body, body[1:])
                  if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                  and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)}
    assert documented == {f.name for f in dataclasses.fields(DatasetSpec)}


def test_the_spec_is_frozen():
    spec = DatasetSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.chip_size = 64  # type: ignore[misc]


# ---------------------------------------------------------------------- area


def test_a_partial_grid_takes_the_seed_values_for_the_rest():
    grid = DatasetSpec(x_cells=3, start_y=40.0).grid()
    assert (grid.start_x, grid.start_y, grid.step, grid.x_cells, grid.y_cells) == (-5.80, 40.0, 0.05, 3, 10)


def test_a_bbox_is_covered_by_cells_from_its_south_west_corner():
    spec = DatasetSpec(bbox=(-5.8, 37.2, -5.3, 37.7))
    assert spec.area_mode == "bbox" and spec.start_x is None and spec.x_cells is None
    grid = spec.grid()
    assert (grid.start_x, grid.start_y, grid.x_cells, grid.y_cells) == (-5.8, 37.2, 10, 10)
    # (0.4 - 0.1) / 0.1 is 3.0000000000000004 in floats: still 3 cells, not 4.
    grid = DatasetSpec(bbox=(0.1, 0.0, 0.4, 0.3), grid_step=0.1).grid()
    assert (grid.start_x, grid.start_y, grid.x_cells, grid.y_cells) == (0.1, 0.0, 3, 3)
    grid = DatasetSpec(bbox=(0, 0, 0.12, 0.05), grid_step=0.05).grid()
    assert (grid.start_x, grid.start_y, grid.x_cells, grid.y_cells) == (0.0, 0.0, 3, 1)


def test_an_aoi_grid_covers_the_bounds_of_its_polygons_which_the_caller_reads():
    spec = DatasetSpec(aoi="fields/andalusia.gpkg", grid_step=0.1)
    assert spec.aoi == "fields/andalusia.gpkg" and spec.area_mode == "aoi" and spec.start_x is None
    with pytest.raises(ConfigError, match="aoi 'fields/andalusia.gpkg' comes from its polygons: read them first"):
        spec.grid()
    grid = spec.grid((0.1, 0.0, 0.35, 0.1))
    assert (grid.start_x, grid.start_y, grid.x_cells, grid.y_cells) == (0.1, 0.0, 3, 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"bbox": (0, 0, 1, 1), "start_x": 0.0}, r"2 ways \(start_x / bbox\)"),
    ({"aoi": "a.gpkg", "bbox": (0, 0, 1, 1)}, r"2 ways \(bbox / aoi\)"),
    ({"aoi": "a.gpkg", "x_cells": 3, "bbox": (0, 0, 1, 1)}, "3 ways"),
    ({"bbox": (1, 0, 0, 1)}, "west < east"),
    ({"bbox": (0, 0, 1, 91)}, "south < north within -90..90"),
    ({"aoi": "  "}, "aoi is empty"),
    ({"grid_step": 0.0}, r"grid_step \(--grid-step\) must be > 0"),
    ({"bbox": (0, 0, 1, 1), "grid_step": -1.0}, "grid_step"),
    ({"x_cells": 0}, "--x-cells and --y-cells must be >= 1"),
    ({"start_x": 179.9}, "leaves the globe"),
])
def test_the_area_is_given_exactly_one_valid_way(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DatasetSpec(**kwargs)


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize("name, value, match", [
    ("chip_size", 0, r"chip_size \(--chip-size\) must be >= 1, got 0"),
    ("max_chips_per_cell", -1, r"max_chips_per_cell \(--max-chips-per-cell\) must be >= 0"),
    ("composite", "mean", r"composite \(--composite\) must be one of \('median', 'least-cloudy', 'stack'\), "
                          "got 'mean'"),
    ("min_clear_fraction", 1.5, r"min_clear_fraction \(--min-clear-fraction\) must lie between 0 and 1"),
    ("max_nodata_fraction", -0.1, r"--max-nodata-fraction\) must lie between 0 and 1"),
    ("format", "png", r"format \(--format\) must be one of \('gtiff', 'cog'\)"),
    ("max_scenes", -1, r"--max-scenes\) must be >= 0 \(0: all scenes\)"),
    ("resolution", 0.0, r"resolution \(--resolution\) must be > 0 metres"),
    ("min_polygons", -1, r"min_polygons \(--min-polygons\) must be >= 0"),
    ("datetime", "2023-13-01", "--datetime '2023-13-01'.*YYYY-MM-DD"),
    ("datetime", "2023-06-30/2023-05-15", "start is after end"),
    ("max_cloud", 0.0, r"max_cloud \(--max-cloud\) must be > 0 percent"),
    ("split_block_size", 0.0, "split_block_size .*> 0 metres"),
    ("split_ratios", (0.5, 0.5, 0.5), "split_ratios .*adding up to 1.*got 0.5,0.5,0.5"),
    ("split_ratios", (1.2, -0.1, -0.1), "non-negative"),
    ("bands", ("B02", "B99"), "'B99' is not one"),
    ("bands", (), "non-empty list of sentinel-2-l2a's bands B02, B03"),
    ("bands", ("B02", "B03", "B02"), "bands lists B02 more than once"),
    ("clear_classes", (), "non-empty list of SCL classes 0..11"),
    ("clear_classes", (4, 12), r"got \[12\]"),
    ("layer", "", "layer is empty"),
    ("collection", " ", "collection is empty"),
    ("gpkg_fingerprint", "", "gpkg_fingerprint is empty"),
    ("class_map", "", "class_map is empty"),
    ("spec_version", 0, "spec_version must be 1..2"),
    ("spec_version", 3, "newer than this cropchips reads.*upgrade cropchips"),
])
def test_bad_values_are_config_errors_that_say_what_to_change(name, value, match):
    with pytest.raises(ConfigError, match=match) as caught:
        DatasetSpec(**{name: value})
    assert isinstance(caught.value, ValueError)


def test_clear_classes_are_a_set_kept_sorted():
    assert DatasetSpec(clear_classes=(6, 4, 5, 4)).clear_classes == (4, 5, 6)
    assert DatasetSpec(clear_classes=(6, 4, 5)).digest() == DatasetSpec().digest()


def test_a_class_map_that_does_not_parse_names_the_key_and_the_line():
    bad = "hcat3_code,hcat3_name,class_id\n3303050000,olive_plantations,9\n"
    with pytest.raises(ConfigError, match=r"^class_map, line 2: class_id '9' is outside 0..8"):
        DatasetSpec(class_map=bad)
    with pytest.raises(ConfigError, match="^class_map has no header line"):
        DatasetSpec(class_map="# only a comment\n")


# ---------------------------------------------------------------------- types and keys


@pytest.mark.parametrize("values, match", [
    ({"chip_size": "64"}, r"chip_size must be an integer, got '64' \(str\)"),
    ({"chip_size": 64.0}, "chip_size must be an integer, got 64.0"),
    ({"chip_size": None}, "chip_size must be an integer, got None"),
    ({"harmonize": "yes"}, "harmonize must be true or false, got 'yes'"),
    ({"harmonize": 1}, "harmonize must be true or false"),
    ({"resolution": True}, r"resolution must be a number, got True \(bool\)"),
    ({"resolution": float("nan")}, "resolution must be a number, got nan"),
    ({"max_cloud": float("inf")}, "max_cloud must be a number"),
    ({"x_cells": 2.5}, "x_cells must be an integer or null"),
    ({"split_ratios": [0.5, 0.5]}, "split_ratios must be a list of 3 numbers"),
    ({"split_ratios": "0.8,x,0.1"}, "split_ratios must be a list of 3 numbers"),
    ({"bbox": "1,2,3"}, "bbox must be a list of 4 numbers or null"),
    ({"bands": "B02"}, None),  # a one-item comma list is valid
    ({"bands": [2]}, "bands must be a list of strings"),
    ({"clear_classes": [4.5]}, "clear_classes must be a list of integers"),
    ({"class_map": 5}, "class_map must be a string"),
    ({"layer": 3}, "layer must be a string or null"),
    ({"spec_version": "1"}, "spec_version must be an integer"),
])
def test_wrong_types_name_the_key_and_the_expected_type(values, match):
    if match is None:
        assert DatasetSpec.from_mapping(values).bands == ("B02",)
        return
    with pytest.raises(ConfigError, match=match):
        DatasetSpec.from_mapping(values)


def test_numbers_and_comma_lists_are_normalised_so_equal_content_is_equal():
    spec = DatasetSpec.from_mapping({"resolution": 10, "split_ratios": "0.8,0.1,0.1", "bbox": [-6, 37, -5, 38]})
    assert spec.resolution == 10.0 and isinstance(spec.resolution, float)
    assert spec.split_ratios == (0.8, 0.1, 0.1) and spec.bbox == (-6.0, 37.0, -5.0, 38.0)
    assert spec == DatasetSpec(bbox=(-6.0, 37.0, -5.0, 38.0))
    assert spec.digest() == DatasetSpec(bbox=(-6.0, 37.0, -5.0, 38.0)).digest()


@pytest.mark.parametrize("key, match", [
    ("chip_sise", r"unknown spec key 'chip_sise': did you mean 'chip_size'\?"),
    ("max-chips-per-cell", r"unknown spec key 'max-chips-per-cell': did you mean 'max_chips_per_cell'\?"),
    ("class_map_fle", r"did you mean 'class_map_file'\?"),
    ("zzz", r"unknown spec key 'zzz': valid keys: spec_version, start_x, .*, class_map_file"),
])
def test_unknown_keys_are_named_with_the_closest_valid_one(key, match):
    with pytest.raises(ConfigError, match=match):
        DatasetSpec.from_mapping({key: 1})
    with pytest.raises(ConfigError, match=match):
        DatasetSpec().with_overrides({key: 1})


def test_a_newer_spec_version_asks_for_an_upgrade_before_complaining_about_its_keys():
    with pytest.raises(ConfigError, match=r"spec_version 3 is newer than this cropchips reads \(2\).*upgrade"):
        DatasetSpec.from_yaml("spec_version: 3\nsource: landsat-c2-l2\n")


def test_class_map_file_is_read_into_the_content(tmp_path):
    (tmp_path / "classes.csv").write_text(SMALL_CSV, encoding="utf-8")
    spec = DatasetSpec.from_mapping({"class_map_file": str(tmp_path / "classes.csv")})
    assert spec.class_map == SMALL_CSV
    assert spec.classes().class_of_code("3301010100") == 5 and spec.classes().class_of_code("3303060000") == 0
    assert DatasetSpec.from_mapping({"class_map_file": "classes.csv"}, base_dir=tmp_path) == spec
    assert DatasetSpec.from_mapping({"class_map": SMALL_CSV}) == spec


def test_class_map_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"class map {tmp_path / 'missing.csv'} does not exist"):
        DatasetSpec.from_mapping({"class_map_file": str(tmp_path / "missing.csv")})
    (tmp_path / "bad.csv").write_text("code,name\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"class map {tmp_path / 'bad.csv'}, line 1: the header lacks"):
        DatasetSpec.from_mapping({"class_map_file": str(tmp_path / "bad.csv")})
    with pytest.raises(ConfigError, match="class_map .* or class_map_file .*, not both"):
        DatasetSpec.from_mapping({"class_map_file": str(tmp_path / "bad.csv"), "class_map": SMALL_CSV})
    with pytest.raises(ConfigError, match="class_map_file must be the path of a CSV file, got 3"):
        DatasetSpec.from_mapping({"class_map_file": 3})


# ---------------------------------------------------------------------- identity


def _expected_dict(**changes) -> dict:
    """The default spec's dictionary, written out here rather than taken from the code under test."""
    values = {
        "spec_version": 2, "start_x": -5.8, "start_y": 37.2, "x_cells": 10, "y_cells": 10, "bbox": None, "aoi": None,
        "grid_step": 0.05, "min_polygons": 5, "layer": None, "collection": "sentinel-2-l2a",
        "datetime": "2023-05-15/2023-06-30", "max_cloud": 10.0, "max_task_scenes": 0, "max_scenes": 0,
        "bands": ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"],
        "resolution": 10.0, "chip_size": 256, "max_chips_per_cell": 5, "composite": "median",
        "harmonize": True, "clear_classes": [4, 5, 6], "min_clear_fraction": 0.9, "max_nodata_fraction": 0.0,
        "format": "gtiff", "compression": "deflate", "compression_level": 0, "class_map": PACKAGED_CSV, "split_block_size": 10000.0, "split_ratios": [0.8, 0.1, 0.1],
        "gpkg_fingerprint": None, "cloud_buffer_px": 0, "chip_placement": "fields", "max_chip_overlap": 0.25,
        "min_labelled_fraction": 0.0, "temporal_period": None, "min_valid_bins": 1, "unmapped_label": 255,
        "labels": ["classes"],
    }
    values.update(changes)
    return values


def _sha256_of(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def test_to_dict_and_canonical_json_hold_every_field():
    assert DatasetSpec().to_dict() == _expected_dict()
    text = DatasetSpec(chip_size=64).canonical_json()
    assert text == json.dumps(_expected_dict(chip_size=64), sort_keys=True, separators=(",", ":"))
    assert text.startswith('{"aoi":null,"bands":["B02","B03",') 
    assert not re.search(r"[,:] ", text.replace(json.dumps(PACKAGED_CSV), '""'))  # compact


def test_the_digest_is_the_sha256_of_the_canonical_json():
    assert DatasetSpec().digest() == _sha256_of(_expected_dict())
    changed = {"bbox": [-6.0, 37.0, -5.0, 38.0], "start_x": None, "start_y": None, "x_cells": None, "y_cells": None,
               "composite": "least-cloudy", "gpkg_fingerprint": "sha256:abc"}
    spec = DatasetSpec(bbox=(-6, 37, -5, 38), composite="least-cloudy", gpkg_fingerprint="sha256:abc")
    assert spec.digest() == _sha256_of(_expected_dict(**changed))
    assert spec.short_id() == _sha256_of(_expected_dict(**changed))[:12] and len(spec.short_id()) == 12


def test_equal_content_has_one_digest_and_any_change_another():
    assert DatasetSpec(chip_size=64, harmonize=False).digest() == DatasetSpec(harmonize=False, chip_size=64).digest()
    changed = [
        DatasetSpec(),
        DatasetSpec(chip_size=128),
        DatasetSpec(composite="least-cloudy"),
        DatasetSpec(harmonize=False),
        DatasetSpec(composite="stack"),
        DatasetSpec(clear_classes=(4, 5)),
        DatasetSpec(bands=("B04", "B03", "B02")),
        DatasetSpec(bands=("B02", "B03", "B04")),  # band order is part of the output
        DatasetSpec(class_map=PACKAGED_CSV.replace("3303050000,olive_plantations,1", "3303050000,olive_plantations,2")),
        DatasetSpec(gpkg_fingerprint="sha256:abc"),
        DatasetSpec(start_x=-5.75),
        DatasetSpec(bbox=(-5.8, 37.2, -5.3, 37.7)),  # the same cells as the default grid, but given another way
        DatasetSpec(split_ratios=(0.7, 0.2, 0.1)),
    ]
    assert len({spec.digest() for spec in changed}) == len(changed)


def test_the_dictionary_and_its_json_read_back_equal():
    spec = DatasetSpec(bbox=(-6, 37, -5, 38), chip_size=64, class_map=SMALL_CSV, gpkg_fingerprint="f00")
    assert DatasetSpec.from_mapping(spec.to_dict()) == spec
    assert DatasetSpec.from_mapping(json.loads(spec.canonical_json())) == spec


# ---------------------------------------------------------------------- YAML

DEFAULT_YAML_KEYS = [
    "spec_version", "start_x", "start_y", "x_cells", "y_cells", "grid_step", "min_polygons", "layer", "collection",
    "datetime", "max_cloud", "max_task_scenes", "max_scenes", "bands", "resolution", "chip_size", "max_chips_per_cell", "composite",
    "harmonize", "clear_classes", "min_clear_fraction", "max_nodata_fraction", "format", "compression",
    "compression_level", "cloud_buffer_px",
    "chip_placement", "max_chip_overlap", "min_labelled_fraction", "temporal_period", "min_valid_bins",
    "unmapped_label", "labels", "split_block_size", "split_ratios", "gpkg_fingerprint", "class_map",
]


def _top_level_keys(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^([a-z_]+):", text, re.MULTILINE)]


def test_the_default_yaml_has_one_key_per_line_and_the_class_map_as_a_block():
    text = DatasetSpec().to_yaml()
    assert _top_level_keys(text) == DEFAULT_YAML_KEYS
    lines = text.splitlines()
    assert lines[0].startswith("#") and lines[1] == "spec_version: 2"
    assert "chip_size: 256" in lines and "composite: median" in lines and "harmonize: true" in lines
    assert "split_ratios: [0.8, 0.1, 0.1]" in lines and "layer: null" in lines
    assert "bands: [B02, B03, B04, B08, B05, B06, B07, B8A, B11, B12]" in lines
    block = lines.index("class_map: |")
    assert lines[block + 1] == ("  # EuroCrops HCAT3 -> cropchips training classes; "
                                "read by cropchips.classes.load_class_map().")
    assert "  3303050000,olive_plantations,1" in lines[block:]


def test_a_bbox_or_aoi_yaml_lists_only_its_own_area_keys():
    assert _top_level_keys(DatasetSpec(bbox=(0, 0, 1, 1)).to_yaml())[:4] == ["spec_version", "bbox", "grid_step",
                                                                            "min_polygons"]
    assert _top_level_keys(DatasetSpec(aoi="a.gpkg").to_yaml())[:4] == ["spec_version", "aoi", "grid_step",
                                                                       "min_polygons"]


@pytest.mark.parametrize("spec", [
    DatasetSpec(),
    DatasetSpec(bbox=(-5.8, 37.2, -5.3, 37.7), grid_step=0.1, chip_size=64, composite="stack",
                harmonize=False, format="cog", layer="ES_2023", gpkg_fingerprint="sha256:0123",
                datetime="2023-05-15", max_cloud=60.0, bands=("B04", "B03", "B02"), clear_classes=(4,)),
    DatasetSpec(aoi="fields/area of interest.gpkg", split_ratios=(1.0, 0.0, 0.0)),
    DatasetSpec(class_map=SMALL_CSV.rstrip("\n")),  # no final newline
    # A line ending in a blank, blank lines, non-ASCII text, trailing newlines.
    DatasetSpec(class_map="# Kulturen: Weizen, Gerste, Ölbaum \n\n\n" + SMALL_CSV + "\n\n"),
])
def test_yaml_reads_back_equal(spec):
    assert DatasetSpec.from_yaml(spec.to_yaml()) == spec


def test_yaml_keys_are_the_flag_names_with_underscores():
    spec = DatasetSpec.from_yaml("chip_size: 64\ncomposite: least-cloudy\nmax_chips_per_cell: 7\n"
                                 "datetime: 2023-05-15\nharmonize: no\nsplit_ratios: 0.6,0.2,0.2\n")
    assert (spec.chip_size, spec.composite, spec.max_chips_per_cell) == (64, "least-cloudy", 7)
    assert spec.datetime == "2023-05-15" and spec.harmonize is False and spec.split_ratios == (0.6, 0.2, 0.2)
    assert spec == DatasetSpec(chip_size=64, composite="least-cloudy", max_chips_per_cell=7, datetime="2023-05-15",
                               harmonize=False, split_ratios=(0.6, 0.2, 0.2))


def test_an_empty_yaml_is_the_default_spec():
    assert DatasetSpec.from_yaml("") == DatasetSpec()
    assert DatasetSpec.from_yaml("# nothing set\n") == DatasetSpec()


def test_yaml_files_are_read_with_class_map_files_beside_them(tmp_path):
    (tmp_path / "classes.csv").write_text(SMALL_CSV, encoding="utf-8")
    path = tmp_path / "dataset.yaml"
    path.write_text("chip_size: 32\nclass_map_file: classes.csv\n", encoding="utf-8")
    expected = DatasetSpec(chip_size=32, class_map=SMALL_CSV)
    assert DatasetSpec.from_yaml(path) == expected
    assert DatasetSpec.from_yaml(str(path)) == expected


@pytest.mark.parametrize("text, match", [
    ("chip_size: [1, 2", r"^the dataset spec is not valid YAML"),
    ("- chip_size\n- 64\n", "must be a YAML mapping of keys such as 'chip_size: 64', got a list"),
    ("chip_size: 64\nchip_size: 32\n", r"key 'chip_size' appears twice \(line 2\)"),
    ("chip_sise: 64\n", r"^the dataset spec: unknown spec key 'chip_sise': did you mean 'chip_size'\?"),
    ("resolution: ten\n", "resolution must be a number, got 'ten'"),
    ("composite: mean\n", r"composite \(--composite\) must be one of"),
])
def test_bad_yaml_is_a_config_error(text, match):
    with pytest.raises(ConfigError, match=match):
        DatasetSpec.from_yaml(text)


def test_yaml_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"spec file {tmp_path / 'missing.yaml'} does not exist"):
        DatasetSpec.from_yaml(str(tmp_path / "missing.yaml"))
    path = tmp_path / "dataset.yaml"
    path.write_text("chip_size: 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^spec file {path}: chip_size"):
        DatasetSpec.from_yaml(path)


def test_to_yaml_is_safe_yaml():
    data = yaml.safe_load(DatasetSpec(bbox=(0, 0, 1, 1)).to_yaml())
    assert data["bbox"] == [0.0, 0.0, 1.0, 1.0] and data["class_map"] == PACKAGED_CSV and "start_x" not in data


# ---------------------------------------------------------------------- overrides


def test_overrides_replace_the_given_values_only():
    base = DatasetSpec.from_yaml("chip_size: 64\ncomposite: least-cloudy\n")
    spec = base.with_overrides({"chip_size": 32, "composite": None, "format": "cog", "layer": None})
    assert (spec.chip_size, spec.composite, spec.format, spec.layer) == (32, "least-cloudy", "cog", None)
    assert (base.chip_size, base.format) == (64, "gtiff")  # a new spec; the file's is unchanged
    assert base.with_overrides({}) == base and base.with_overrides({"chip_size": None}) == base


def test_overrides_are_validated_like_the_file():
    with pytest.raises(ConfigError, match=r"chip_size \(--chip-size\) must be >= 1"):
        DatasetSpec().with_overrides({"chip_size": 0})
    with pytest.raises(ConfigError, match="harmonize must be true or false"):
        DatasetSpec().with_overrides({"harmonize": "off"})


def test_an_area_in_the_overrides_replaces_the_spec_area():
    grid = DatasetSpec(start_x=1.0, start_y=2.0, x_cells=3, y_cells=4)
    bbox = grid.with_overrides({"bbox": (0, 0, 1, 1)})
    assert bbox.bbox == (0.0, 0.0, 1.0, 1.0) and (bbox.start_x, bbox.x_cells) == (None, None)
    back = bbox.with_overrides({"x_cells": 2})
    assert (back.bbox, back.start_x, back.start_y, back.x_cells, back.y_cells) == (None, -5.8, 37.2, 2, 10)
    assert grid.with_overrides({"x_cells": 5}).grid().start_x == 1.0  # the same way: merged
    aoi = grid.with_overrides({"aoi": "a.gpkg"})
    assert aoi.aoi == "a.gpkg" and aoi.start_x is None and aoi.grid_step == grid.grid_step
    with pytest.raises(ConfigError, match="2 ways"):
        grid.with_overrides({"bbox": (0, 0, 1, 1), "start_x": 0.5})


def test_a_class_map_file_override_replaces_the_content(tmp_path):
    (tmp_path / "classes.csv").write_text(SMALL_CSV, encoding="utf-8")
    spec = DatasetSpec(chip_size=64).with_overrides({"class_map_file": str(tmp_path / "classes.csv")})
    assert spec.class_map == SMALL_CSV and spec.chip_size == 64


def test_a_renamed_key_says_what_replaced_it():
    with pytest.raises(ConfigError, match="spec key 'temporal' is gone: use composite: stack"):
        DatasetSpec.from_mapping({"temporal": "stack"})
