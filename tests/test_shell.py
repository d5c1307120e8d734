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


def test_under_ci_a_missing_tool_fails_the_run_by_name(tmp_path):
    """A tool the suite needs that is not on PATH (here: iperf3) ends a CI run at once, naming
    it, instead of quietly skipping the tests that use it; the same run without CI goes on."""
    import sys
    from tests.conftest import required_tools
    from tests.nettopo import have_netns_support
    supported, why_not = have_netns_support()
    if not supported:                   # CI is root: the namespace check would stop it first
        pytest.skip("needs root, ip netns and /dev/net/tun: %s" % why_not)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in set(required_tools() + ["sysctl", "sh", "env", "mktemp", "rm"]) - {"iperf3"}:
        found = shutil.which(tool)
        if found:
            os.symlink(found, str(bin_dir / tool))
    env = dict(os.environ, PATH=str(bin_dir), CI="true")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            os.path.join(ROOT, "tests", "test_shell.py"), "-k", "shellcheck_passes and demo"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "these tools are missing: iperf3" in result.stdout + result.stderr
    env["CI"] = "false"
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
