"""Secrets never reach a log line, at any level: real scripts and real kafka-python clients at
DEBUG against a real broker (Tansu, which refuses the SASL handshake: what matters is what the
clients log on the way), and the redacting filter itself on the forms secrets take in logs."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_script
from cropchips.cli.run import REDACTED, RedactingFilter

SECRET = "Zq9-s3cr3t-Pa55word"
SASL = ["--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "SCRAM-SHA-256", "--sasl-username", "pipeline"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any CROPCHIPS_* setting of the caller, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CROPCHIPS_")}
    env.update(extra)
    return env


def admin_at_debug(broker, *extra: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_script("admin.py", "topics", "list", "--bootstrap-servers", broker.bootstrap_servers, *SASL,
                      "--broker-wait", "2", "--log-level", "DEBUG", *extra, timeout=120, env=env)


def test_admin_at_debug_logs_its_kafka_configuration_without_the_password(broker):
    """kafka-python's admin client logs its whole configuration at DEBUG, password included."""
    done = admin_at_debug(broker, env=clean_env(CROPCHIPS_SASL_PASSWORD=SECRET))
    output = done.stdout + done.stderr
    assert "Starting KafkaAdminClient with configuration" in done.stderr, done.stderr[-3000:]
    assert SECRET not in output
    assert f"'sasl_plain_password': '{REDACTED}'" in done.stderr
    assert done.returncode == 1 and "cannot reach the Kafka broker" in done.stderr, done.stderr[-2000:]


def test_a_password_from_a_file_is_not_logged_either(broker, tmp_path):
    secret_file = tmp_path / "sasl-password"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    done = admin_at_debug(broker, "--sasl-password-file", str(secret_file), env=clean_env())
    assert "Starting KafkaAdminClient with configuration" in done.stderr, done.stderr[-3000:]
    assert SECRET not in done.stdout + done.stderr
    assert REDACTED in done.stderr


CLIENTS = r'''
import logging, sys
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from cropchips.cli.run import setup_logging

setup_logging("DEBUG")
servers, password = sys.argv[1], sys.argv[2]
config = dict(bootstrap_servers=[servers], security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
              sasl_plain_username="pipeline", sasl_plain_password=password, bootstrap_timeout_ms=1500)
for make in (lambda: KafkaProducer(**config), lambda: KafkaConsumer(**config), lambda: KafkaAdminClient(**config)):
    try:
        make().close()
    except Exception:
        # A traceback whose message carries the configuration, as a careless handler would log it.
        logging.getLogger("cropchips.test").exception("client failed with %s", config)
logging.getLogger("kafka.conn").warning("url kafka://pipeline:%s@broker:9092 token=%s", password, password)
'''


def test_kafka_clients_and_tracebacks_at_debug_never_show_the_password(broker):
    done = subprocess.run([sys.executable, "-c", CLIENTS, broker.bootstrap_servers, SECRET], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=clean_env(CROPCHIPS_SASL_PASSWORD=SECRET))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "client failed with" in done.stderr and "Traceback" in done.stderr, done.stderr[-3000:]
    assert "Starting KafkaAdminClient with configuration" in done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert f"kafka://pipeline:{REDACTED}@broker:9092 token={REDACTED}" in done.stderr


@pytest.fixture
def captured():
    """A logger of its own writing through a redacting handler into a buffer (the root is left alone)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    redactor = RedactingFilter(["known-Secret'9"])
    handler.addFilter(redactor)
    logger = logging.getLogger("test_secrets.captured")
    logger.propagate, logger.level = False, logging.DEBUG
    logger.addHandler(handler)
    yield logger, buffer
    logger.removeHandler(handler)


@pytest.mark.parametrize("args, expected", [
    (({"sasl_plain_password": "p1", "ssl_password": None, "client_id": "x"},),
     "{'sasl_plain_password': '[redacted]', 'ssl_password': None, 'client_id': 'x'}"),
    (('{"aws_secret_access_key": "p2", "region": "eu"}',), '{"aws_secret_access_key": "[redacted]", "region": "eu"}'),
    (("sasl_oauth_token=p3, sasl_plain_username=u",), "sasl_oauth_token=[redacted], sasl_plain_username=u"),
    (("ssl_password: p4",), "ssl_password: [redacted]"),
    (("s3://AKIA:p5@host/bucket",), "s3://AKIA:[redacted]@host/bucket"),
    (("a value known from the environment: known-Secret'9 (repr: %r)", "known-Secret'9"),
     "a value known from the environment: [redacted] (repr: \"[redacted]\")"),
    # Prose about passwords is no secret and stays readable.
    (("SASL needs a password: set CROPCHIPS_SASL_PASSWORD or --sasl-password-file",),
     "SASL needs a password: set CROPCHIPS_SASL_PASSWORD or --sasl-password-file"),
])
def test_the_filter_redacts_secret_settings_urls_and_known_values(captured, args, expected):
    logger, buffer = captured
    message, *rest = args
    if isinstance(message, str):
        logger.debug(message, *rest)
    else:
        logger.debug("%s", message)
    assert buffer.getvalue() == expected + "\n"


def test_the_filter_redacts_tracebacks_and_keeps_bad_format_strings_from_raising(captured):
    logger, buffer = captured
    try:
        raise RuntimeError("login failed for sasl_plain_password='p6'")
    except RuntimeError:
        logger.error("broker said no", exc_info=True)
    logger.warning("%s %s", "only one argument")  # a bug in a library's logging call must not raise here
    text = buffer.getvalue()
    assert "p6" not in text and "sasl_plain_password='[redacted]'" in text and "Traceback" in text
    assert "only one argument" in text
