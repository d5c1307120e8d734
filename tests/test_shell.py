"""The repository's own shell scripts pass shellcheck (install.sh has its own, in test_install)."""

import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPTS = ("test.sh", "demo.sh", "tools/ensure-deps.sh", ".ci/run")


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed (test.sh installs it)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_passes(script):
    result = subprocess.run(["shellcheck", os.path.join(ROOT, script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
