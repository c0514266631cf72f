"""The built wheel: every sub-package and every data file the code reads at run time is inside it.

An editable install (what ``scripts/install.sh`` does) reads the checkout, so a package or data file the
build leaves out (a sub-package missing from ``packages``, the demo's weights, the kernels' C source) goes
unnoticed until someone runs ``pip install .`` and gets a demo that trains for minutes or an import error.
The wheel is built from a copy of what git tracks, so the checkout gets no ``build/`` folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def tracked_files() -> list[str]:
    listed = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    return [name for name in listed if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    source = tmp_path_factory.mktemp("source")
    for name in tracked_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            ".",
        ],
        cwd=source,
        check=True,
    )
    (wheel,) = out.glob("peft_gateway-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_carries_every_tracked_file_of_both_packages(wheel_names: set[str]) -> None:
    """Every module of every sub-package and every data file (weights, templates, C source, page)."""
    expected = [name for name in tracked_files() if name.startswith(("engines/", "gateway/"))]
    assert expected, "no tracked package files found"
    missing = sorted(name for name in expected if name not in wheel_names)
    assert not missing, f"the wheel lacks {missing}"


def test_the_wheel_carries_each_wing_and_the_files_read_from_their_paths(wheel_names: set[str]) -> None:
    """The paths the code computes from ``__file__``: the demo's weights and the kernels' source."""
    for package in ("engines/forward", "engines/adapters", "engines/demo", "engines/testing"):
        assert f"{package}/__init__.py" in wheel_names
    for package in ("gateway/responses", "gateway/cluster"):
        assert f"{package}/__init__.py" in wheel_names
    assert "engines/demo/weights/demo.json" in wheel_names
    assert "engines/demo/weights/base/model.safetensors" in wheel_names
    assert "engines/forward/gemm.c" in wheel_names
    assert "engines/demo/__main__.py" in wheel_names
