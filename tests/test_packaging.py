"""The built wheel works on its own: installed into a fresh virtual environment, away from the
repository, `cropchips --help` lists the roles and `cropchips demo` runs the whole pipeline.

The fresh environment reaches the dependencies through a .pth file pointing at the test
environment's site-packages (no download), while cropchips itself comes only from the wheel.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(root / "dist"), "--quiet"], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (root / "dist").glob("cropchips-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("CROPCHIPS_")}
    return {"wheel": wheel, "venv": venv, "python": python, "env": env, "cwd": root}


def run(installed, *args, timeout=120):
    return subprocess.run([str(installed["venv"] / "bin" / "cropchips"), *args], capture_output=True, text=True,
                          timeout=timeout, env=installed["env"], cwd=installed["cwd"])


def test_the_wheel_holds_the_package_and_its_data_and_nothing_else(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "cropchips/fields/data/hcat_classes.csv" in names and "cropchips/cli/main.py" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/")) or n in ("master.py", "worker.py")]
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "cropchips = cropchips.cli.main:main" in zipfile.ZipFile(installed["wheel"]).read(entry[0]).decode()


def test_the_installed_command_lists_the_roles_and_runs_them_from_the_wheel(installed):
    where = subprocess.run([str(installed["python"]), "-c", "import cropchips; print(cropchips.__file__)"],
                           capture_output=True, text=True, env=installed["env"], cwd=installed["cwd"], check=True)
    assert str(installed["venv"]) in where.stdout and str(REPO) not in where.stdout  # the wheel's, not the repo's
    helped = run(installed, "--help")
    assert helped.returncode == 0
    for command in ("master", "worker", "monitor", "admin", "index", "report", "demo"):
        assert f"  {command} " in helped.stdout
    spec = run(installed, "master", "--write-spec", "--chip-size", "48")
    assert spec.returncode == 0 and "chip_size: 48" in spec.stdout
    worker = run(installed, "worker", "--help")
    assert worker.returncode == 0 and "--output-dir" in worker.stdout and "--chip-size" not in worker.stdout
    unknown = run(installed, "mastre")
    assert unknown.returncode == 2 and "unknown command 'mastre'" in unknown.stderr


def test_the_demo_runs_from_the_installed_package_alone(installed, tmp_path):
    done = run(installed, "demo", "--output", str(tmp_path / "demo"), "--chip-size", "64", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    start = done.stdout.rfind("\n{\n") + 1
    summary, _ = json.JSONDecoder().raw_decode(done.stdout[start:])
    assert summary["statuses"]["failed"] == 0 and summary["chips"] > 0
    assert (tmp_path / "demo" / "dataset" / "dataset.yaml").is_file()
    assert (tmp_path / "demo" / "dataset" / "index.parquet").is_file()
