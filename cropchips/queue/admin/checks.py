"""``doctor``: check the broker, the topics, the output folder and the GeoPackage."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kafka.errors import KafkaError

from cropchips.errors import ConfigError, CropChipsError, InputDataError
from cropchips.queue.kafka import KafkaSettings
from cropchips.output.storage import open_storage
from cropchips.queue.admin._client import _partition_counts, open_admin
from cropchips.queue.admin._format import _plural
from cropchips.queue.admin.topics import TopicSpec

log = logging.getLogger(__name__)

DOCTOR_CHECKS = ("broker", "topics", "output", "gpkg")


@dataclass(frozen=True)
class Check:
    """One line of ``doctor``."""

    name: str
    """What was checked."""
    ok: bool | None
    """True: passed, False: failed, None: skipped."""
    detail: str
    """What was found."""
    fix: str = ""
    """How to fix a failure."""

    @property
    def label(self) -> str:
        return {True: "OK", False: "FAIL", None: "SKIP"}[self.ok]


@dataclass(frozen=True)
class DoctorOptions:
    """What ``doctor`` checks."""

    kafka: KafkaSettings
    """The broker."""
    topics: Sequence[TopicSpec]
    """The pipeline's topics."""
    output_dir: str
    """The workers' output folder."""
    gpkg: str
    """The EuroCrops GeoPackage (path or GDAL URL such as ``zip://...``)."""
    layer: str | None = None
    """Its layer (None: the first with EuroCrops columns)."""
    expect_mount: bool = False
    """The output folder must be a mount point (the NFS share)."""
    skip: frozenset[str] = frozenset()
    """Checks not to run: ``broker`` (implies ``topics``), ``topics``, ``output``, ``gpkg``."""
    broker_wait: float = 60.0
    """Seconds to wait for the broker."""


def parse_skip(text: str | None) -> frozenset[str]:
    """``"gpkg, output"`` -> {"gpkg", "output"}; unknown names are an error."""
    names = frozenset(s.strip().lower() for s in (text or "").split(",") if s.strip())
    unknown = names - set(DOCTOR_CHECKS)
    if unknown:
        raise ConfigError(f"--skip {text!r}: unknown check(s) {sorted(unknown)}; "
                          f"choose from {', '.join(DOCTOR_CHECKS)}")
    return names


def doctor(options: DoctorOptions) -> list[Check]:
    """Run every check not skipped; never raises for a failed check (it becomes a FAIL line)."""
    checks: list[Check] = []
    skip = options.skip
    if "broker" in skip:
        checks.append(Check("broker", None, "skipped (--skip broker)"))
        checks.append(Check("topics", None, "skipped (--skip broker)"))
    else:
        checks += _check_broker_and_topics(options)
    if "output" in skip:
        checks.append(Check("output-dir", None, "skipped (--skip output)"))
    else:
        checks += _check_output(options.output_dir, options.expect_mount)
    if "gpkg" in skip:
        checks.append(Check("gpkg", None, "skipped (--skip gpkg)"))
    else:
        checks.append(_check_gpkg(options.gpkg, options.layer))
    for check in checks:
        log.debug("doctor %s %s: %s", check.label, check.name, check.detail)
    return checks


def _check_broker_and_topics(options: DoctorOptions) -> list[Check]:
    servers = options.kafka.bootstrap_servers
    try:
        admin = open_admin(options.kafka, options.broker_wait)
    except CropChipsError as exc:
        cause = exc.__cause__.__class__.__name__ if exc.__cause__ else exc.__class__.__name__
        return [Check("broker", False, f"not reachable at {servers} within {options.broker_wait:g} s ({cause})",
                      "check --bootstrap-servers / CROPCHIPS_BOOTSTRAP_SERVERS, that the broker runs (`docker compose "
                      "ps` on the master), the firewall (`sudo ufw allow 9092/tcp`) and, for TLS/SASL, the security "
                      "options; raise --broker-wait if it is still starting"),
                Check("topics", None, "skipped (broker not reachable)")]
    try:
        try:
            counts = _partition_counts(admin, None)
        except KafkaError as exc:
            return [Check("broker", False, f"reachable at {servers} but metadata requests fail: {exc}",
                          "check the broker's health and the client's permissions (ACLs)")]
        try:
            nodes = f" ({_plural(len(admin.describe_cluster().get('brokers') or []), 'broker')})"
        except KafkaError:  # DescribeCluster is Kafka 2.8+: the count is a nicety
            nodes = ""
    finally:
        admin.close()
    checks = [Check("broker", True, f"reachable at {servers}{nodes}")]
    if "topics" in options.skip:
        return checks + [Check("topics", None, "skipped (--skip topics)")]
    create = "run `admin.py topics create` (master.py and worker.py also create missing topics)"
    for spec in options.topics:
        name = f"topic {spec.name}"
        have = counts.get(spec.name)
        if have is None:
            checks.append(Check(name, False, "missing", create))
        elif spec.role == "tasks":
            ok = have >= 1
            checks.append(Check(name, ok, f"{_plural(have, 'partition')}: at most {have} workers busy at once",
                                "" if ok else "recreate it: `admin.py topics reset --yes`"))
        elif spec.role == "results" and have != 1:
            checks.append(Check(name, False, f"{have} partitions; it must have 1 (the monitor relies on one order)",
                                f"recreate it with 1 partition (it holds the results: save them first), "
                                f"e.g. `rpk topic delete {spec.name}` then `admin.py topics create`"))
        else:
            checks.append(Check(name, True, _plural(have, "partition")))
    return checks


def _check_output(output_dir: str, expect_mount: bool) -> list[Check]:
    if "://" in output_dir and not output_dir.startswith("file://"):
        return _check_object_store(output_dir)
    path = Path(output_dir)
    mount_fix = "mount the share: `sudo ./mount_worker_nfs.sh --master-ip <master> --persist`, or pass --output-dir"
    if not path.exists():
        return [Check("output-dir", False, f"{path} does not exist",
                      mount_fix if expect_mount else f"create it (`mkdir -p {path}`) or pass --output-dir")]
    if not path.is_dir():
        return [Check("output-dir", False, f"{path} is not a folder", "pass --output-dir with a folder")]
    checks = [Check("output-dir", True, f"{path} exists")]
    if expect_mount:
        mounted = os.path.ismount(path)
        checks.append(Check("output-mount", mounted, f"{path} is {'' if mounted else 'not '}a mount point",
                            "" if mounted else mount_fix + " (check with `mountpoint " + str(path) + "`)"))
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".cropchips-doctor-", delete=True) as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
        checks.append(Check("output-writable", True, f"wrote and deleted a file in {path}"))
    except OSError as exc:
        checks.append(Check("output-writable", False, f"cannot write in {path}: {exc.strerror or exc}",
                            f"give the worker's user write access (`ls -ld {path}`; chown/chmod), and on NFS check the "
                            "export is rw and root_squash/anonuid match (setup_master_nfs.sh)"))
    return checks


def _check_object_store(url: str) -> list[Check]:
    fix = ("check the bucket name, AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, "
           "and AWS_ENDPOINT_URL for an S3-compatible server")
    try:
        storage = open_storage(url)
        storage.prepare()
        probe = f".cropchips-doctor-{os.getpid()}"
        storage.write_bytes(probe, b"ok")
        ok = storage.read_bytes(probe) == b"ok"
        storage.delete(probe)
    except ConfigError as exc:
        return [Check("output-dir", False, str(exc), fix)]
    except Exception as exc:  # noqa: BLE001 - any store error is the answer here
        return [Check("output-dir", False, f"{url}: {type(exc).__name__}: {exc}", fix)]
    return [Check("output-dir", ok, f"wrote, read back and deleted an object in {url}", "" if ok else fix)]


def _check_gpkg(gpkg: str, layer: str | None) -> Check:
    from cropchips.fields.gpkg import open_layer  # imports geopandas: only when this check runs

    try:
        info = open_layer(gpkg, layer)
    except InputDataError as exc:
        return Check("gpkg", False, str(exc),
                     "pass --gpkg (or CROPCHIPS_GPKG) with a readable EuroCrops GeoPackage; on workers it is the "
                     "NFS copy, so check the mount (`mountpoint /mnt/mimmo`) and the file's permissions")
    count = f"{info.feature_count} features" if info.feature_count >= 0 else "features: unknown"
    return Check("gpkg", True,
                 f"{gpkg} layer {info.layer!r}: {', '.join(info.columns)}, {count}, {info.crs.to_string()}")


def format_check(check: Check) -> str:
    line = f"{check.label:4}  {check.name:28}  {check.detail}"
    if check.ok is False and check.fix:
        line += f"\n      fix: {check.fix}"
    return line
