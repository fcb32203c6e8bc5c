"""Command-line options with environment-variable twins, read in one place at parse time."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cropchips.errors import ConfigError

if TYPE_CHECKING:
    from cropchips.queue.kafka import KafkaSettings

ENV_PREFIX = "CROPCHIPS_"

# Seed values (../shared/SEED_README.md) are the defaults of every option; each lives with its job.
from cropchips.queue.topics import (DEFAULT_BOOTSTRAP_SERVERS, DEFAULT_DLQ_TOPIC,  # noqa: E402,F401
                                    DEFAULT_GROUP_ID, DEFAULT_RESULTS_TOPIC, DEFAULT_TASKS_PARTITIONS,
                                    DEFAULT_TASKS_TOPIC)
from cropchips.sources.stac import DEFAULT_STAC_API  # noqa: E402,F401

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


#: A help text that already says what its default is: "(default: the latest run)", "%(default)s".
_STATES_DEFAULT = re.compile(r"\bdefault\s*:|%\(default\)", re.IGNORECASE)


class DefaultsOnceHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that states each default once, and only when it says something.

    No "(default: X)" is appended when the help text already states a default in its own words
    ("(default: the first layer)"; a passing mention such as "the brokers' default limit" is not one),
    nor when the default is None, False or empty (an unset option, a switch that is off), nor SUPPRESS.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if (default is None or default is False or (isinstance(default, str) and not default)
                or default is argparse.SUPPRESS or _STATES_DEFAULT.search(help)):
            return help
        return super()._get_help_string(action)


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose options fall back to ``CROPCHIPS_*`` environment variables.

    Precedence: command line > environment > default. The environment is passed in
    (``env=``) so that tests never depend on the real process environment.
    """

    def __init__(self, *args: Any, env: Mapping[str, str] | None = None, **kwargs: Any):
        kwargs.setdefault("formatter_class", DefaultsOnceHelpFormatter)
        # No abbreviations: "--sasl-password X" must not silently mean --sasl-password-file.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._env = os.environ if env is None else env
        self.env_names: dict[str, str] = {}

    def option(self, flag: str, *, type: Callable[[str], Any] = str, default: Any = None, help: str,
               env: str | None = None, group: argparse._ActionsContainer | None = None,
               **kwargs: Any) -> argparse.Action:
        """Add ``flag`` with an environment twin (``env`` or the derived CROPCHIPS_ name)."""
        return self._add(flag, env, type, default, group, help, type=type, **kwargs)

    def flag(self, flag: str, *, help: str, env: str | None = None, default: bool = False,
             group: argparse._ActionsContainer | None = None) -> argparse.Action:
        """A boolean switch; the environment twin takes true/false/1/0."""
        return self._add(flag, env, parse_bool, default, group, help, action="store_true")

    def toggle(self, flag: str, *, help: str, default: bool, env: str | None = None,
               group: argparse._ActionsContainer | None = None) -> argparse.Action:
        """``--x/--no-x``; the environment twin takes true/false/1/0."""
        return self._add(flag, env, parse_bool, default, group, help, action=argparse.BooleanOptionalAction)

    def _add(self, flag: str, env: str | None, parse: Callable[[str], Any], default: Any,
             group: argparse._ActionsContainer | None, help: str, **kwargs: Any) -> argparse.Action:
        """The environment (when set and not empty) replaces the default; the command line wins over both."""
        name = env or env_name(flag)
        raw = self._env.get(name)
        value = default
        if raw is not None and raw != "":
            try:
                value = parse(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"environment variable {name}={raw!r} is invalid for {flag}: {exc}") from exc
        action = (group or self).add_argument(flag, default=value, help=f"{help} [env {name}]", **kwargs)
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
    parser.option("--topic-retention-ms", type=retention_ms, default=-1, group=group,
                  help="retention.ms of the topics when they have to be created: -1 keeps tasks, results and dead "
                       "letters until deleted (a broker's own 7 days would drop tasks still queued after a week)")
    parser.option("--broker-wait", type=non_negative_float, default=60.0, group=group,
                  help="seconds to wait for an unreachable broker before giving up")
    sec = parser.add_argument_group(
        "Kafka security", "the SASL password is never a flag (it would show in ps): set CROPCHIPS_SASL_PASSWORD "
        "or point --sasl-password-file at a file")
    parser.option("--security-protocol", default="PLAINTEXT", group=sec,
                  choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"), help="Kafka security protocol")
    parser.option("--sasl-mechanism", default=None, group=sec, choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
                  help="SASL mechanism (Redpanda uses SCRAM-SHA-256 or -512)")
    parser.option("--sasl-username", default=None, group=sec, help="SASL user name")
    parser.option("--sasl-password-file", default=None, group=sec,
                  help="file holding the SASL password (first line)")
    parser.option("--ssl-cafile", default=None, group=sec, help="CA certificate file to verify the broker")
    parser.option("--ssl-certfile", default=None, group=sec, help="client certificate file (mutual TLS)")
    parser.option("--ssl-keyfile", default=None, group=sec, help="client private key file (mutual TLS)")


SASL_PASSWORD_ENV = ENV_PREFIX + "SASL_PASSWORD"


def kafka_settings(args: argparse.Namespace, client_id: str, env: Mapping[str, str] | None = None) -> "KafkaSettings":
    """Build the broker connection from the Kafka options; the password comes from the
    environment or a file, never from the command line, and is never logged."""
    from cropchips.queue.kafka import KafkaSettings

    env = os.environ if env is None else env
    extra: dict[str, Any] = {"security_protocol": args.security_protocol}
    sasl = args.security_protocol.startswith("SASL_")
    if sasl:
        if not args.sasl_mechanism or not args.sasl_username:
            raise ConfigError(f"--security-protocol {args.security_protocol} needs --sasl-mechanism and "
                              "--sasl-username (or CROPCHIPS_SASL_MECHANISM / CROPCHIPS_SASL_USERNAME)")
        password = env.get(SASL_PASSWORD_ENV)
        if args.sasl_password_file:
            try:
                password = open(args.sasl_password_file).readline().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"cannot read --sasl-password-file {args.sasl_password_file}: {exc.strerror}") from exc
        if not password:
            raise ConfigError(f"SASL needs a password: set {SASL_PASSWORD_ENV} or --sasl-password-file")
        extra.update(sasl_mechanism=args.sasl_mechanism, sasl_plain_username=args.sasl_username,
                     sasl_plain_password=password)
    elif args.sasl_mechanism or args.sasl_username:
        raise ConfigError("--sasl-mechanism/--sasl-username need --security-protocol SASL_PLAINTEXT or SASL_SSL")
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        value = getattr(args, key)
        if value:
            if not args.security_protocol.endswith("SSL"):
                raise ConfigError(f"--{key.replace('_', '-')} needs --security-protocol SSL or SASL_SSL")
            if not os.path.exists(value):
                raise ConfigError(f"--{key.replace('_', '-')} {value}: no such file")
            extra[key] = value
    return KafkaSettings(args.bootstrap_servers, client_id=client_id, extra=extra)


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


def retention_ms(text: str) -> int:
    value = int(text)
    if value < -1 or value == 0:
        raise ValueError(f"must be -1 (keep forever) or a positive number of milliseconds, got {value}")
    return value


# argparse prints the function name in "invalid <name> value" errors: make them readable.
positive_int.__name__ = "positive integer"
non_negative_int.__name__ = "non-negative integer"
positive_float.__name__ = "positive number"
non_negative_float.__name__ = "non-negative number"
retention_ms.__name__ = "retention in ms"


def env_table(parser: EnvArgumentParser) -> list[tuple[str, str]]:
    """(flag, environment variable) pairs, for documentation and tests."""
    rows = []
    for action in parser._actions:
        if action.dest in parser.env_names and action.option_strings:
            rows.append((action.option_strings[0], parser.env_names[action.dest]))
    return rows


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return parser.parse_args(list(argv) if argv is not None else None)
