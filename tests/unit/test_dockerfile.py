"""The Dockerfile installs the project as pyproject.toml pins it."""

import re

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import REPO


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1]) for row in rows]


def test_the_image_installs_the_project_with_pyprojects_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    steps = instructions()
    base = next(arg for op, arg in steps if op == "FROM")
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-\w+", base)
    assert m, f"not a CUDA PyTorch base image: {base}"
    torch_pin = next(Requirement(d.split("#")[0]) for d in project["dependencies"] if d.startswith("torch"))
    assert Version(m.group(1)) in torch_pin.specifier  # the image's torch satisfies pyproject's pin

    copied = " ".join(arg for op, arg in steps if op == "COPY")
    for needed in ("pyproject.toml", "README.md", "dist_clm", "configs", "launchers"):
        assert needed in copied, needed
    installs = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    assert installs == ["python -m pip install --no-cache-dir ."]  # pyproject's list, no second one
    assert any(op == "ENTRYPOINT" and '"dist-clm"' in arg for op, arg in steps)
    assert project["scripts"]["dist-clm"] == "dist_clm.cli:entry"
