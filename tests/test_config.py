"""Flags and their environment twins, for the worker's switches and toggles."""

import pytest

import worker
from cropchips.errors import ConfigError


def test_worker_defaults_are_the_seed_values():
    processing, options, args = worker.parse_args(["3"], env={})
    assert str(processing.output_dir) == "/mnt/mimmo" and processing.gpkg == "/mnt/mimmo/es_2023_all.gpkg"
    assert processing.chip_size == 256 and processing.max_chips_per_cell == 5 and processing.composite == "median"
    assert options.group_id == "satellite-workers" and options.tasks_topic == "satellite-tasks"
    assert not options.burst and processing.harmonize and args.number == "3"


def test_switches_and_toggles_read_the_environment():
    env = {"CROPCHIPS_BURST": "yes", "CROPCHIPS_HARMONIZE": "false", "CROPCHIPS_FORCE": "1",
           "CROPCHIPS_COMPOSITE": "least-cloudy"}
    processing, options, _ = worker.parse_args(["1"], env=env)
    assert options.burst and processing.force and not processing.harmonize and processing.composite == "least-cloudy"
    processing, _, _ = worker.parse_args(["1", "--harmonize"], env=env)  # the command line wins
    assert processing.harmonize
    with pytest.raises(ConfigError, match="CROPCHIPS_BURST"):
        worker.parse_args(["1"], env={"CROPCHIPS_BURST": "perhaps"})


def test_out_of_range_values_are_clear_errors():
    with pytest.raises(ConfigError, match="min-clear-fraction"):
        worker.parse_args(["1", "--min-clear-fraction", "1.5"], env={})
    with pytest.raises(SystemExit):
        worker.parse_args(["1", "--chip-size", "0"], env={})
