"""The README's one-command demo runs, shows every device reaching every other, and cleans up."""

import os
import re
import subprocess

import pytest

from tests.conftest import ROOT
from tests.nettopo import have_netns_support, leftover_namespaces

SUPPORTED, WHY_NOT = have_netns_support()


@pytest.mark.skipif(not SUPPORTED, reason="the demo needs root, ip netns and /dev/net/tun: %s" % WHY_NOT)
def test_demo_sh_shows_the_devices_reaching_each_other_and_cleans_up():
    result = subprocess.run([os.path.join(ROOT, "demo.sh")], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("unreachable") == 3
    assert len(re.findall(r"-> \S+ +198\.18\.0\.\d+ +avg [\d.]+ ms", out)) == 12
    assert "sha256 identical" in out and "Demo complete" in out
    assert re.search(r"every link is TLS \(the default\).*\n.*by its pin sha256:[0-9a-f]{64}", out), out
    prefix = re.search(r"Built namespaces (\S+)\*", out).group(1)
    assert leftover_namespaces(prefix) == []
