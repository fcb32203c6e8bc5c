"""Flags and their environment twins, for the worker's switches and toggles."""

import pytest

import master
import worker
from cropchips.errors import ConfigError


def test_worker_defaults_are_the_seed_values():
    processing, options, args = worker.parse_args(["3"], env={})
    assert str(processing.output_dir) == "/mnt/mimmo" and processing.gpkg == "/mnt/mimmo/es_2023_all.gpkg"
    assert processing.read_threads == 8 and processing.read_cache_mb == 256
    assert options.group_id == "satellite-workers" and options.tasks_topic == "satellite-tasks"
    assert not options.burst and args.number == "3"


def test_write_threads_come_from_the_flag_or_its_environment_twin_and_must_be_positive():
    assert worker.parse_args(["3"], env={})[0].write_threads == 4
    assert worker.parse_args(["3", "--write-threads", "1"], env={})[0].write_threads == 1
    assert worker.parse_args(["3"], env={"CROPCHIPS_WRITE_THREADS": "2"})[0].write_threads == 2
    with pytest.raises(SystemExit):
        worker.parse_args(["3", "--write-threads", "0"], env={})


def test_switches_and_toggles_read_the_environment():
    env = {"CROPCHIPS_BURST": "yes", "CROPCHIPS_HARMONIZE": "false", "CROPCHIPS_FORCE": "1",
           "CROPCHIPS_COMPOSITE": "least-cloudy"}
    _, options, _ = worker.parse_args(["1"], env=env)
    assert options.burst
    options, _ = master.parse_args([], env=env)
    assert options.force and not options.spec.harmonize and options.spec.composite == "least-cloudy"
    options, _ = master.parse_args(["--harmonize"], env=env)  # the command line wins
    assert options.spec.harmonize
    with pytest.raises(ConfigError, match="CROPCHIPS_BURST"):
        worker.parse_args(["1"], env={"CROPCHIPS_BURST": "perhaps"})


def test_out_of_range_values_are_clear_errors():
    with pytest.raises(ConfigError, match="min-clear-fraction"):
        master.parse_args(["--min-clear-fraction", "1.5"], env={})
    with pytest.raises(ConfigError, match=r"chip_size \(--chip-size\) must be >= 1, got 0"):
        master.parse_args(["--chip-size", "0"], env={})
    with pytest.raises(SystemExit):
        worker.parse_args(["1", "--read-threads", "0"], env={})


@pytest.mark.parametrize("flag", worker.MOVED_TO_MASTER)
def test_a_dataset_flag_on_a_worker_says_where_it_went(flag):
    with pytest.raises(ConfigError, match=f"{flag}: the dataset .* is the run's spec now.*give these to master.py"):
        worker.parse_args(["1", f"{flag}=x" if flag == "--layer" else flag, "x"], env={})


def test_dataset_variables_in_a_workers_environment_are_named_as_ignored():
    env = {"CROPCHIPS_CHIP_SIZE": "64", "CROPCHIPS_COMPOSITE": "least-cloudy", "CROPCHIPS_GROUP_ID": "g"}
    processing, options, _ = worker.parse_args(["1"], env=env)  # starts: the host settings still apply
    assert options.group_id == "g"
    assert worker.ignored_environment(env) == ["CROPCHIPS_CHIP_SIZE", "CROPCHIPS_COMPOSITE"]


# ---------------------------------------------------------------------- --help states each default once

import argparse  # noqa: E402
import re  # noqa: E402

import admin  # noqa: E402
import monitor  # noqa: E402
from cropchips.cli.options import EnvArgumentParser  # noqa: E402


def _parsers(parser):
    """The parser and every subcommand's parser below it (admin.py has two levels)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser] + [p for sub in subs for child in dict.fromkeys(sub.choices.values()) for p in _parsers(child)]


def _rendered_helps():
    """(script, subcommand, flag, help as --help prints it, on one line) for every option of every script."""
    for module in (master, worker, monitor, admin):
        for parser in _parsers(module.build_parser(env={})):
            formatter = parser._get_formatter()
            for action in parser._actions:
                if action.help and action.help is not argparse.SUPPRESS:
                    text = " ".join(formatter._expand_help(action).split())
                    yield module.__name__, parser.prog, "/".join(action.option_strings) or action.dest, text


def test_the_formatter_states_a_default_once_and_only_when_it_says_something():
    p = EnvArgumentParser(prog="x", env={})
    p.option("--size", type=int, default=5, help="chip size")
    p.option("--layer", default=None, help="layer to read")
    p.option("--run-id", default=None, help="run to follow (default: the latest)")
    p.option("--grid", default="a", help="partitioning (default: %(default)s, the only sane one)")
    p.option("--skip", default="", help="checks to skip")
    p.option("--limit", type=int, default=7, help="refuse above this (the brokers' default limit is 1 MiB)")
    p.flag("--force", help="redo everything")
    p.toggle("--harmonize", default=True, help="harmonize the scenes")
    p.add_argument("--hidden", default=3, help=argparse.SUPPRESS)
    text = " ".join(p.format_help().split())
    assert "chip size [env CROPCHIPS_SIZE] (default: 5)" in text
    assert "layer to read [env CROPCHIPS_LAYER] --run-id" in text  # None: nothing appended
    assert "run to follow (default: the latest) [env CROPCHIPS_RUN_ID] --grid" in text
    assert "partitioning (default: a, the only sane one) [env CROPCHIPS_GRID] --skip" in text
    assert "checks to skip [env CROPCHIPS_SKIP] --limit" in text  # empty: nothing appended
    # A passing mention of someone else's default does not state this option's.
    assert "(the brokers' default limit is 1 MiB) [env CROPCHIPS_LIMIT] (default: 7)" in text
    assert "redo everything [env CROPCHIPS_FORCE] --harmonize" in text  # an off switch: nothing appended
    assert "harmonize the scenes [env CROPCHIPS_HARMONIZE] (default: True)" in text
    assert "hidden" not in text and "None" not in text and text.count("(default:") == 5


# Help texts that mention some other default in passing besides stating their own: not wrong, but
# "default" twice reads as a repetition. Owners: reword these (e.g. "the brokers' own limit is
# 1 MiB"), then remove them here; this list may only shrink.
KNOWN_DEFAULT_WORD_TWICE: set[tuple[str, str]] = set()  # none left: every help text says "default" once


def test_no_help_text_states_its_default_twice_or_says_default_none():
    helps = list(_rendered_helps())
    assert len({script for script, *_ in helps}) == 4
    assert [h for h in helps if len(re.findall(r"\bdefault\s*:", h[3], re.I)) > 1] == []
    # Python's None/False, that is ("(default: none)" in worker's --local-scenes-dir is its own words).
    assert [h for h in helps if "(default: None)" in h[3] or "(default: False)" in h[3]] == []
    twice = {(flag, text) for _, _, flag, text in helps if len(re.findall(r"\bdefault\b", text, re.I)) > 1}
    assert {flag for flag, _ in twice} == {flag for flag, _ in KNOWN_DEFAULT_WORD_TWICE}
    for flag, phrase in KNOWN_DEFAULT_WORD_TWICE:
        assert all(phrase in text for f, text in twice if f == flag), flag
    # The same, on --help as printed (wrapped), for every parser.
    for module in (master, worker, monitor, admin):
        for parser in _parsers(module.build_parser(env={})):
            assert "(default: None)" not in " ".join(parser.format_help().split()), parser.prog
