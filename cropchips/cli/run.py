"""Shared plumbing of the command-line scripts: logging set-up, secret redaction and one exit point."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterable

from cropchips.errors import CropChipsError

log = logging.getLogger("cropchips")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: What a secret is replaced with in every log line.
REDACTED = "[redacted]"
#: Environment variables that hold a secret, and those that name a file holding one (first line).
SECRET_ENV = ("CROPCHIPS_SASL_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SECRET_FILE_ENV = ("CROPCHIPS_SASL_PASSWORD_FILE",)

# A setting whose name says it is secret: kafka-python's sasl_plain_password, ssl_password,
# sasl_oauth_token_provider; botocore's aws_secret_access_key, session_token, Credential=...
_KEY = r"[A-Za-z0-9_.-]*(?:password|passwd|secret|token|credential)[A-Za-z0-9_.-]*"
# The value: quoted (with escapes), an object repr <...>, or a bare word; None and '' stay visible.
_VALUE = r"""(?!None\b|''|"")(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|<[^<>]*>|[^\s,;&'"<>(){}\[\]]+)"""
_SECRET_SETTINGS = [
    # 'sasl_plain_password': 'x' (a dict repr, as kafka-python logs its configuration) or JSON.
    re.compile(rf"""(?P<key>(?P<q>['"]){_KEY}(?P=q)\s*[:=]\s*)(?P<value>{_VALUE})""", re.IGNORECASE),
    # sasl_plain_password=x (keyword arguments, query strings).
    re.compile(rf"(?P<key>\b{_KEY}\s*=\s*)(?P<value>{_VALUE})", re.IGNORECASE),
    # sasl_plain_password: x (YAML-like); only names with an underscore, so that prose such as
    # "needs a password: set ..." is left alone.
    re.compile(rf"(?P<key>\b(?=[A-Za-z0-9.-]*_){_KEY}\s*:\s*)(?P<value>{_VALUE})", re.IGNORECASE),
    # scheme://user:password@host
    re.compile(r"(?P<key>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:)(?P<value>[^@\s/]+)(?=@)"),
]


def _redact_value(match: re.Match) -> str:
    value = match.group("value")
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match.group('key')}{quote}{REDACTED}{quote}"


class RedactingFilter(logging.Filter):
    """A handler filter that removes secrets from every record before it is written.

    Installed on handlers (not loggers), it sees the records of every library that propagate
    to them, kafka-python's included, at every level. It replaces the values of settings whose
    names say they are secret (``sasl_plain_password``, ``ssl_password``, ``sasl_oauth_token``,
    ``aws_secret_access_key``...), passwords in URLs, and any occurrence of a known secret value
    (from the environment or ``add_secret``), in the message, its arguments and tracebacks.
    """

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self._secrets: set[str] = set()
        for secret in secrets:
            self.add_secret(secret)

    def add_secret(self, secret: str | None) -> None:
        """Redact this exact value wherever it appears (also as repr() escapes it)."""
        if not secret:
            return
        self._secrets.add(secret)
        self._secrets.add(repr(secret)[1:-1])
        self._secrets.add(repr(secret.encode())[2:-1])

    def redact(self, text: str) -> str:
        # Longest first, so that a secret containing another is removed whole.
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        for pattern in _SECRET_SETTINGS:
            text = pattern.sub(_redact_value, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not break logging here
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


_REDACTOR = RedactingFilter()


def register_secret(secret: str | None) -> None:
    """Never log this value (e.g. a password read from a file named on the command line)."""
    _REDACTOR.add_secret(secret)


def _secrets_from_environment() -> Iterable[str]:
    for name in SECRET_ENV:
        yield os.environ.get(name, "")
    for name in SECRET_FILE_ENV:
        path = os.environ.get(name)
        if path:
            try:
                with open(path) as handle:
                    yield handle.readline().rstrip("\r\n")
            except OSError:
                pass  # config.kafka_settings reports an unreadable file clearly


def setup_logging(level: str = "INFO") -> None:
    """Configure logging for a script (library modules only ever call getLogger), with every
    root handler redacting secrets."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for secret in _secrets_from_environment():
        _REDACTOR.add_secret(secret)
    # On the handlers, not on loggers: a logger's filter does not see its children's records.
    for handler in logging.getLogger().handlers:
        if _REDACTOR not in handler.filters:
            handler.addFilter(_REDACTOR)
    # kafka-python logs every reconnect attempt; our own code logs the waits once, readably.
    logging.getLogger("kafka").setLevel(logging.CRITICAL if level.upper() != "DEBUG" else logging.DEBUG)
    for noisy in ("rasterio", "urllib3", "botocore", "fiona", "pyogrio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(body: Callable[[], int]) -> int:
    """Run a script body; a CropChipsError becomes one clear log line and exit code 1."""
    try:
        return body()
    except CropChipsError as exc:
        setup_logging()  # a no-op if the script configured logging already
        log.error("%s", exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        setup_logging()
        log.warning("interrupted")
        return EXIT_INTERRUPTED
