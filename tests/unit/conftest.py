"""The unit tier runs in the test process: a test here that starts a program (subprocess) fails, naming the tier
where it belongs. (Library code may still fork its own workers, as a DataLoader does.)"""

import subprocess

import pytest


@pytest.fixture(autouse=True)
def no_programs(monkeypatch):
    def refused(self, *args, **kwargs):
        raise AssertionError("a unit test starts no program: move this test to tests/integration/")

    monkeypatch.setattr(subprocess.Popen, "__init__", refused)
