"""Kafka security settings: from flags and environment, secrets never on the command line or in logs."""

import subprocess
import sys
import time

import pytest

import master
import monitor
import worker
from conftest import REPO
from cropchips.errors import ConfigError

SECRET = "s3cr3t-Pa55word"
SASL = ["--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-256", "--sasl-username", "pipeline"]


def test_sasl_scram_from_flags_and_environment():
    options, _ = master.parse_args(SASL, env={"CROPCHIPS_SASL_PASSWORD": SECRET})
    config = options.kafka.client_config()
    assert config["security_protocol"] == "SASL_SSL" and config["sasl_mechanism"] == "SCRAM-SHA-256"
    assert config["sasl_plain_username"] == "pipeline" and config["sasl_plain_password"] == SECRET
    assert SECRET not in repr(options) and SECRET not in repr(options.kafka)
    # Same through environment variables only, for the worker and the monitor.
    env = {"CROPCHIPS_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "CROPCHIPS_SASL_MECHANISM": "SCRAM-SHA-512",
           "CROPCHIPS_SASL_USERNAME": "w", "CROPCHIPS_SASL_PASSWORD": SECRET}
    _, wopts, _ = worker.parse_args(["1"], env=env)
    assert wopts.kafka.client_config()["sasl_mechanism"] == "SCRAM-SHA-512"
    kafka, _ = monitor.parse_args([], env=env)
    assert kafka.client_config()["sasl_plain_password"] == SECRET


def test_password_file_and_ca_file(tmp_path):
    secret = tmp_path / "password"
    secret.write_text(SECRET + "\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    options, _ = master.parse_args([*SASL, "--sasl-password-file", str(secret), "--ssl-cafile", str(ca)], env={})
    config = options.kafka.client_config()
    assert config["sasl_plain_password"] == SECRET and config["ssl_cafile"] == str(ca)


@pytest.mark.parametrize("argv, env, needle", [
    (SASL, {}, "needs a password"),
    (["--security-protocol", "SASL_SSL"], {"CROPCHIPS_SASL_PASSWORD": SECRET}, "needs --sasl-mechanism"),
    (["--sasl-username", "x"], {}, "need --security-protocol SASL"),
    (["--ssl-cafile", "/nonexistent.pem"], {}, "needs --security-protocol SSL"),
    (["--security-protocol", "SSL", "--ssl-cafile", "/nonexistent.pem"], {}, "no such file"),
    ([*SASL, "--sasl-password-file", "/nonexistent"], {}, "cannot read --sasl-password-file"),
])
def test_incomplete_security_settings_are_clear_errors(argv, env, needle):
    with pytest.raises(ConfigError, match=needle):
        master.parse_args(argv, env=env)


def test_there_is_no_password_flag():
    with pytest.raises(SystemExit):
        master.parse_args(["--sasl-password", SECRET], env={})


def test_secret_is_not_in_ps_or_logs():
    """A worker configured for SASL, pointed at a closed port: the password is in neither its
    command line (what ps shows) nor anything it prints."""
    env = {"CROPCHIPS_SASL_PASSWORD": SECRET, "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, str(REPO / "worker.py"), "1", *SASL, "--bootstrap-servers", "127.0.0.1:9",
                             "--broker-wait", "2", "--gpkg", "/nonexistent.gpkg", "--log-level", "DEBUG"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    time.sleep(0.5)
    cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().decode(errors="replace")
    out, _ = proc.communicate(timeout=60)
    assert SECRET not in cmdline
    assert proc.returncode == 1 and SECRET not in out
    assert "Traceback" not in out
