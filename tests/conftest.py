"""Shared fixtures: the real reference data in ../shared/data, a real Kafka-protocol broker, a sample area."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() == "true"
#: Chips stay inside their cells: the sample's 0.02 degree cells (1.8 x 2.2 km) hold 128 px chips, not 256 px.
SAMPLE_CHIP_SIZE = 128


def shared_data(*parts: str) -> Path:
    """Path into ../shared/data; skip when it is absent (a user's clone), fail in CI where it must exist."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if IN_CI:
            pytest.fail(f"{path} is missing, and CI=true requires the shared reference data")
        pytest.skip(f"{path} not present (the shared reference data sits beside the checkout in CI)")
    return path


@pytest.fixture(scope="session")
def broker():
    """A real Kafka-protocol broker (Tansu) on a free loopback port, for the whole session."""
    from cropchips.demo.broker import EmbeddedBroker

    with EmbeddedBroker() as running:
        yield running


_counter = itertools.count()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto's, in its own process) on a free loopback port.

    Yields the environment a client needs: test credentials, region and AWS_ENDPOINT_URL, with
    the user's own AWS config files out of the way."""
    from cropchips.demo.broker import free_port, wait_for_port

    port = free_port()
    home = tmp_path_factory.mktemp("aws")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
    except Exception:
        server.kill()
        pytest.fail("the moto S3 server did not start")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": str(home / "config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials")}
    try:
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the S3 server, with this process's AWS_* environment pointed at it."""
    import boto3

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    name = f"bucket-{next(_counter)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def topics(broker):
    """Fresh topic names and group id for one test, created with the right partition counts."""
    from cropchips.queue.kafka import KafkaSettings, ensure_topics

    n = next(_counter)
    names = {"tasks": f"tasks-{n}", "results": f"results-{n}", "dlq": f"dlq-{n}", "group": f"workers-{n}"}
    ensure_topics(KafkaSettings(broker.bootstrap_servers),
                  {names["tasks"]: 10, names["results"]: 1, names["dlq"]: 1})
    return names


@pytest.fixture(scope="session")
def sample_area(tmp_path_factory):
    from cropchips.demo.sample import generate_sample

    return generate_sample(tmp_path_factory.mktemp("sample"))


def run_script(name: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the top-level scripts the way a user does."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(REPO / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


@pytest.fixture(scope="session")
def real_scene():
    """The real S2A_29RKH item, its hrefs pointed at the real (downsampled 10x) COGs beside it."""
    import json

    from cropchips.sources.sentinel2 import EARTH_SEARCH_KEYS, scene_from_item

    folder = shared_data("sentinel2", "S2A_29RKH_20200219_0_L2A")
    item = json.loads((folder / "S2A_29RKH_20200219_0_L2A.json").read_text())
    for band, key in EARTH_SEARCH_KEYS.items():
        item["assets"][key]["href"] = str(folder / f"{band}.tif")
    return scene_from_item(item)


@pytest.fixture(scope="session")
def sample_master_options(sample_area):
    """The master's options for the whole sample area, scenes from its local items file."""
    from cropchips.plan.plan import MasterOptions
    from cropchips.spec import DatasetSpec

    spec = DatasetSpec(start_x=sample_area.start_x, start_y=sample_area.start_y, grid_step=sample_area.grid_step,
                       x_cells=sample_area.x_cells, y_cells=sample_area.y_cells, layer=sample_area.layer,
                       datetime=sample_area.datetime, max_cloud=100, chip_size=SAMPLE_CHIP_SIZE)
    return MasterOptions(gpkg=str(sample_area.gpkg), spec=spec, stac_items=str(sample_area.items), run_id="run-sample")


@pytest.fixture(scope="session")
def sample_plan(sample_master_options):
    """The tasks the master plans for the sample area (no Kafka involved)."""
    from cropchips.plan.plan import make_plan

    return make_plan(sample_master_options)


@pytest.fixture(scope="session")
def sample_task(sample_plan):
    """The first task of the sample area."""
    return sample_plan.tasks[0]
