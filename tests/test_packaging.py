"""The conda environment and pyproject.toml name the same packages; the .cu kernel ships."""
import fnmatch
import subprocess
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_and_pyproject_name_the_same_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in ("notebooks", "test", "oracle"):
        wanted |= {_name(r) for r in extras[extra]}
    listed = set()
    in_pip = False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        stripped = line.split("#")[0].rstrip()
        if stripped.strip() == "- pip:":
            in_pip = True
            continue
        if in_pip and stripped.strip().startswith("- "):
            item = stripped.strip()[2:]
            if not item.startswith("-e"):
                listed.add(_name(item))
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"


def test_gpu_extras_name_cupy():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(_name(r).startswith("cupy-cuda12") for r in extras["gpu-cuda12"])
    assert any(_name(r).startswith("cupy-cuda13") for r in extras["gpu-cuda13"])


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert re.search(r"^make test$", ci, flags=re.M)


def test_every_file_the_package_reads_beside_its_code_is_package_data():
    """roi_align_cupy.py reads ops/roi_align.cu at run time: a wheel without it fails only on a
    GPU, after a non-editable install. Every tracked non-Python file under mrcnn_edu/ must match
    a [tool.setuptools.package-data] glob."""
    if not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to list tracked files")
    try:
        tracked = subprocess.run(["git", "ls-files", "mrcnn_edu"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"git ls-files failed: {error}")
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mrcnn_edu"]
    data = [f[len("mrcnn_edu/"):] for f in tracked if not f.endswith(".py")]
    assert "ops/roi_align.cu" in data
    missing = [f for f in data if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missing, f"not in package-data {globs}: {missing}"


def test_the_license_the_metadata_names_is_there():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"  # an SPDX string: the table form stops building in 2027
    assert all((ROOT / name).is_file() for name in project["license-files"])
    assert "MIT License" in (ROOT / "LICENSE").read_text()
