"""The platform glue on a real kernel: TUN creation and interface setup by ioctl and by `ip`.

Each case runs inside a fresh namespace (the TUN interface lives as long as its fd, so the
check runs in the same process that opened it).
"""

import json
import shutil
import sys
import textwrap

import pytest

from tests.conftest import ROOT
from tests.nettopo import Topology, have_netns_support

SUPPORTED, WHY_NOT = have_netns_support()
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="needs root, ip netns and /dev/net/tun: %s" % WHY_NOT)

PROBE = textwrap.dedent("""
    import io, json, os, subprocess, sys
    sys.path.insert(0, %(root)r)
    import mnedc_client as m
    mode = sys.argv[1]
    if mode == "swapped-ioctl":       # as if this machine had the other architecture's numbers
        first, second = m.tunsetiff_numbers()
        m.tunsetiff_numbers = lambda: (second, first)
    fd, name, offload = m.open_tun("mnt-probe0", offload=mode != "no-offload")
    if offload:
        m.set_tun_offload(fd, m.TUN_F_CSUM)       # TSO off and on again, in whichever encoding works
        m.set_tun_offload(fd, m.TUN_OFFLOADS)
    if mode == "ip":
        m.configure_with_ip(name, "198.18.7.9", 24, 1400)
        how = "ip"
    else:
        how = m.configure_interface(name, "198.18.7.9", 24, 1400, m.Log("error", io.StringIO()))
    with open("/sys/class/net/%%s/mtu" %% name) as f:
        mtu = int(f.read())
    with open("/sys/class/net/%%s/flags" %% name) as f:
        up = bool(int(f.read(), 16) & 1)
    print(json.dumps({"name": name, "how": how, "mtu": mtu, "up": up, "offload": offload,
                      "addr": subprocess.run([sys.argv[2], "-o", "-4", "addr", "show", "dev", name],
                                             capture_output=True, text=True).stdout}))
""") % {"root": ROOT}


@pytest.fixture(scope="module")
def topo():
    with Topology(layout="flat", clients=1) as topology:
        yield topology


@pytest.mark.parametrize("mode, env, expected_how", [
    ("auto", {"PATH": "/nonexistent"}, "ioctl"),     # no `ip` anywhere on PATH: ioctls alone
    ("ip", None, "ip"),                              # the `ip` path on its own
    ("swapped-ioctl", None, "ioctl"),                # EBADFD from the wrong encoding: retried
    ("no-offload", None, "ioctl"),                   # a plain TUN, as `offload = no` asks
])
def test_tun_interface_gets_address_mtu_and_up(topo, mode, env, expected_how):
    prefix = ["env"] + ["%s=%s" % item for item in env.items()] if env else []
    result = topo.run("c1", prefix + [sys.executable, "-c", PROBE, mode, shutil.which("ip")], timeout=20)
    probe = json.loads(result.stdout)
    assert probe["name"] == "mnt-probe0"
    assert probe["how"] == expected_how
    assert probe["mtu"] == 1400 and probe["up"]
    assert probe["offload"] == (mode != "no-offload")     # TUNSETOFFLOAD in the encoding that worked
    assert "198.18.7.9/24" in probe["addr"]
    assert "mnt-probe0" not in topo.run("c1", ["ip", "-o", "link"]).stdout   # gone with the fd


PROBE6 = textwrap.dedent("""
    import errno, io, json, subprocess, sys
    sys.path.insert(0, %(root)r)
    import mnedc_client as m
    if sys.argv[1] == "ip":             # as in containers that refuse the IPv6 address ioctls
        real_ioctl = m.fcntl.ioctl
        def ioctl(fd, request, arg=0, *rest):
            if isinstance(arg, bytes) and len(arg) == m.IN6_IFREQ.size:
                raise PermissionError(errno.EPERM, "refused")
            return real_ioctl(fd, request, arg, *rest)
        m.fcntl.ioctl = ioctl
    fd, name, offload = m.open_tun("mnt-probe6")
    log = m.Log("error", io.StringIO())
    prefix = bytes.fromhex("fd00000000000077")
    m.configure_interface(name, "198.18.7.9", 24, 1400, log, m.ipv6_addresses(prefix, 9))
    first = subprocess.run([sys.argv[2], "-o", "-6", "addr", "show", "dev", name], capture_output=True, text=True).stdout
    m.configure_interface(name, "198.18.7.10", 24, 1400, log, m.ipv6_addresses(prefix, 10))    # moved: the old ones go
    second = subprocess.run([sys.argv[2], "-o", "-6", "addr", "show", "dev", name], capture_output=True, text=True).stdout
    print(json.dumps({"first": first, "second": second}))
""") % {"root": ROOT}


@pytest.mark.parametrize("mode, env", [("ioctl", {"PATH": "/nonexistent"}), ("ip", None)],
                         ids=["in6_ifreq-ioctls-alone", "ip-where-the-ioctls-are-refused"])
def test_the_tun_gets_exactly_its_two_ipv6_addresses_by_ioctl_or_by_ip(topo, mode, env):
    prefix = ["env"] + ["%s=%s" % item for item in env.items()] if env else []
    result = topo.run("c1", prefix + [sys.executable, "-c", PROBE6, mode, shutil.which("ip")], timeout=20)
    probe = json.loads(result.stdout)
    for key, number in (("first", 9), ("second", 10)):
        found = sorted(word for line in probe[key].splitlines() for word in line.split()[3:4])
        assert found == ["fd00:0:0:77::%x/64" % number, "fe80::%x/64" % number], probe
