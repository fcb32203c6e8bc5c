"""The package's layout keeps its promises: Kafka only in queue/, the library never runs scripts."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "cropchips"


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_only_the_queue_package_imports_kafka():
    users = {p.relative_to(PACKAGE).as_posix() for p in modules()
             if any(name == "kafka" or name.startswith("kafka.") for name in imports(p))}
    assert users and all(path.startswith("queue/") for path in users), sorted(users)


def test_the_library_does_not_depend_on_the_command_line_layer():
    # cli/ parses flags and calls the library; the library never imports cli/ (the demo and the two small
    # servers' own main functions only use its logging setup and exit codes).
    allowed = {"cli/", "demo/run.py", "dataset/report/cli.py", "testing/cog_server.py", "__main__.py"}
    users = {p.relative_to(PACKAGE).as_posix() for p in modules()
             if any(name == "cropchips.cli" or name.startswith("cropchips.cli.") for name in imports(p))}
    assert {u for u in users if not any(u.startswith(a) for a in allowed)} == set()


def test_nothing_in_the_package_runs_a_script_by_path():
    for path in modules():
        text = path.read_text()
        for script in ("master.py", "worker.py", "monitor.py", "admin.py"):
            assert f'"{script}"' not in text.replace('prog="', "prog=~"), f"{path} names {script}"
