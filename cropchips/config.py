"""Command-line options with environment-variable twins, read in one place at parse time."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "CROPCHIPS_"

# Seed values (../shared/SEED_README.md) are the defaults of every option.
DEFAULT_BOOTSTRAP_SERVERS = "localhost:9092"
DEFAULT_TASKS_TOPIC = "satellite-tasks"
DEFAULT_RESULTS_TOPIC = "satellite-results"
DEFAULT_DLQ_TOPIC = "satellite-tasks-dlq"
DEFAULT_GROUP_ID = "satellite-workers"
DEFAULT_TASKS_PARTITIONS = 10
DEFAULT_STAC_API = "https://earth-search.aws.element84.com/v1"
DEFAULT_COLLECTION = "sentinel-2-l2a"
DEFAULT_DATETIME = "2023-05-15/2023-06-30"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(flag: str) -> str:
    """``--bootstrap-servers`` -> ``CROPCHIPS_BOOTSTRAP_SERVERS``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}, got {text!r}")


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose options fall back to ``CROPCHIPS_*`` environment variables.

    Precedence: command line > environment > default. The environment is passed in
    (``env=``) so that tests never depend on the real process environment.
    """

    def __init__(self, *args: Any, env: Mapping[str, str] | None = None, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self._env = os.environ if env is None else env
        self.env_names: dict[str, str] = {}

    def option(
        self,
        flag: str,
        *,
        type: Callable[[str], Any] = str,
        default: Any = None,
        help: str,
        env: str | None = None,
        group: argparse._ActionsContainer | None = None,
        **kwargs: Any,
    ) -> argparse.Action:
        """Add ``flag`` with an environment twin (``env`` or the derived CROPCHIPS_ name)."""
        name = env or env_name(flag)
        raw = self._env.get(name)
        value = default
        if raw is not None and raw != "":
            try:
                value = type(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"environment variable {name}={raw!r} is invalid for {flag}: {exc}") from exc
        target = group or self
        action = target.add_argument(flag, type=type, default=value, help=f"{help} [env {name}]", **kwargs)
        self.env_names[action.dest] = name
        return action

    def flag(self, flag: str, *, help: str, env: str | None = None, default: bool = False,
             group: argparse._ActionsContainer | None = None) -> argparse.Action:
        """A boolean switch; the environment twin takes true/false/1/0."""
        name = env or env_name(flag)
        raw = self._env.get(name)
        value = default
        if raw is not None:
            try:
                value = parse_bool(raw)
            except ValueError as exc:
                raise ConfigError(f"environment variable {name}={raw!r} is invalid for {flag}: {exc}") from exc
        target = group or self
        action = target.add_argument(flag, action="store_true", default=value, help=f"{help} [env {name}]")
        self.env_names[action.dest] = name
        return action

    def error(self, message: str) -> None:  # pragma: no cover - argparse exits with 2
        self.print_usage()
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_kafka_options(parser: EnvArgumentParser) -> None:
    """Options every command that talks to Kafka shares."""
    group = parser.add_argument_group("Kafka")
    parser.option("--bootstrap-servers", default=DEFAULT_BOOTSTRAP_SERVERS, group=group,
                  help="Kafka/Redpanda bootstrap servers, comma separated host:port")
    parser.option("--tasks-topic", default=DEFAULT_TASKS_TOPIC, group=group, help="topic the master publishes tasks to")
    parser.option("--results-topic", default=DEFAULT_RESULTS_TOPIC, group=group,
                  help="topic workers publish results (and the master its run header) to")
    parser.option("--dlq-topic", default=DEFAULT_DLQ_TOPIC, group=group,
                  help="dead-letter topic for tasks that cannot be processed")
    parser.option("--tasks-partitions", type=positive_int, default=DEFAULT_TASKS_PARTITIONS, group=group,
                  help="partitions of the tasks topic when it has to be created (bounds the useful worker count)")
    parser.option("--broker-wait", type=non_negative_float, default=60.0, group=group,
                  help="seconds to wait for an unreachable broker before giving up")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


# argparse prints the function name in "invalid <name> value" errors: make them readable.
positive_int.__name__ = "positive integer"
non_negative_int.__name__ = "non-negative integer"
positive_float.__name__ = "positive number"
non_negative_float.__name__ = "non-negative number"


def env_table(parser: EnvArgumentParser) -> list[tuple[str, str]]:
    """(flag, environment variable) pairs, for documentation and tests."""
    rows = []
    for action in parser._actions:
        if action.dest in parser.env_names and action.option_strings:
            rows.append((action.option_strings[0], parser.env_names[action.dest]))
    return rows


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return parser.parse_args(list(argv) if argv is not None else None)
