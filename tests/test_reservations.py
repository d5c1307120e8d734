"""Issue #16: `reserve DEVICE_ID = ADDRESS` pins a device's address before it ever joins, against
the real relay on loopback (no root needed), driven by peers that speak the wire protocol."""

import json
import signal
import socket
import subprocess
import sys

from tests.wire_peer import SERVER, WirePeer, start_server

SECRET = "reservations-test-secret-0123456789"


def write_config(path, *lines):
    path.write_text("[server]\nsecret = %s\n%s\n" % (SECRET, "\n".join(lines)))
    return str(path)


def join(port, device_id):
    peer = WirePeer(port)
    peer.handshake(SECRET.encode(), device_id)
    return peer


def address(peer):
    return socket.inet_ntoa(peer.address)


def status(proc_dir):
    result = subprocess.run([sys.executable, SERVER, "--control", str(proc_dir / "server.sock"), "status", "--json"],
                            stdout=subprocess.PIPE, timeout=15, check=True)
    return json.loads(result.stdout)


def test_a_reserved_device_gets_its_address_at_first_join_and_after_restarts(tmp_path):
    config = write_config(tmp_path / "server.ini", "reserve Garage-Cam = 198.18.0.10",
                          "reserve outside-pool = 198.18.0.200")
    state = tmp_path / "state"
    proc, port, _ = start_server(state, "-c", config)
    try:
        others = [join(port, "sensor-%d" % number) for number in range(12)]
        assert "198.18.0.10" not in [address(peer) for peer in others], "nobody else gets a reserved address"
        assert address(join(port, "Garage-Cam")) == "198.18.0.10"      # the case of the device_id holds
        assert address(join(port, "outside-pool")) == "198.18.0.200"
        assert status(tmp_path)["server"]["reservations"] == {"Garage-Cam": "198.18.0.10", "outside-pool": "198.18.0.200"}
        for peer in others:
            peer.close()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.stop()
    proc, port, _ = start_server(state, "-c", config)
    try:
        assert address(join(port, "Garage-Cam")) == "198.18.0.10"
    finally:
        proc.stop()


def test_a_reservation_added_by_sighup_moves_the_device_at_its_next_join_and_waits_for_a_taken_address(tmp_path):
    path = tmp_path / "server.ini"
    config = write_config(path)
    proc, port, _ = start_server(tmp_path / "state", "-c", config)
    try:
        kitchen, hall = join(port, "kitchen-pi"), join(port, "hall-pi")
        assert (address(kitchen), address(hall)) == ("198.18.0.2", "198.18.0.3")
        write_config(path, "reserve kitchen-pi = 198.18.0.50", "reserve garage-cam = 198.18.0.3")
        mark = len(proc.lines())
        proc.send_signal(signal.SIGHUP)
        proc.wait_for(r"reloaded the configuration", start=mark)
        proc.wait_for(r"reservation waits: %s line 4: 198\.18\.0\.3 is leased to hall-pi: garage-cam keeps its own "
                      r"address until that lease is gone \(forget hall-pi\)" % path, start=mark)
        proc.wait_for(r"%s line 3: device kitchen-pi is online as 198\.18\.0\.2: it moves to 198\.18\.0\.50 at its "
                      r"next join" % path, start=mark)
        kitchen.close()
        assert address(join(port, "kitchen-pi")) == "198.18.0.50"
        assert address(join(port, "garage-cam")) not in ("198.18.0.3", "198.18.0.50"), "hall-pi keeps its lease"
        assert address(hall) == "198.18.0.3"
    finally:
        proc.stop()


def check(tmp_path, *lines):
    config = write_config(tmp_path / "server.ini", *lines)
    return subprocess.run([sys.executable, SERVER, "-c", config, "--no-tun", "--no-tls", "--subnet", "198.18.0.0/24",
                           "--state-dir", str(tmp_path / "state"), "--check"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=30)


def test_a_reservation_that_can_never_hold_is_refused_with_its_file_line_and_why(tmp_path):
    path = tmp_path / "server.ini"
    cases = [
        (["reserve cam = 198.19.0.10"], "line 3: reserve cam = 198.19.0.10: outside 198.18.0.0/24"),
        (["reserve cam = 198.18.0.1"], "line 3: reserve cam = 198.18.0.1: the relay's own address"),
        (["reserve cam = 198.18.0.255"], "outside 198.18.0.0/24, or its network or broadcast address"),
        (["reserve cam = kitchen"], "line 3: reserve cam = kitchen: not an IPv4 address"),
        (["reserve cam = 198.18.0.9", "reserve door = 198.18.0.9"],
         "line 4: reserve door = 198.18.0.9: 198.18.0.9 is reserved already for cam (%s line 3)" % path),
        (["reserve cam = 198.18.0.9", "reserve cam2 = 198.18.0.8", "reserve cam = 198.18.0.7"], "not a valid INI file"),
        (["reserve c/a/m = 198.18.0.9"], "line 3: reserve c/a/m: device_id"),
        (["reserve cam"], "not a valid INI file"),         # configparser says so, with [line 3]
        (["reserve cam : 198.18.0.9"], "line 3: want: reserve DEVICE_ID = ADDRESS"),
    ]
    for lines, complaint in cases:
        result = check(tmp_path, *lines)
        assert result.returncode == 2 and complaint in result.stderr, (lines, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert check(tmp_path, "reserve cam = 198.18.0.9", "reserve door = 198.18.0.8").returncode == 0


def test_a_route_that_overlaps_the_network_or_another_is_refused_with_its_file_line_and_why(tmp_path):
    """Issue #16: only the operator grants a network to a gateway, and never one that would
    shadow the virtual network or another grant."""
    path = tmp_path / "server.ini"
    cases = [
        (["route 198.18.0.0/16 = gw"], "line 3: route 198.18.0.0/16 = gw: overlaps the virtual network 198.18.0.0/24"),
        (["route 192.0.2.0/24 = gw", "route 192.0.2.128/25 = other"],
         "line 4: route 192.0.2.128/25 = other: overlaps 192.0.2.0/24, granted to gw (%s line 3)" % path),
        (["route 192.0.2.1/24 = gw"], "line 3: route 192.0.2.1/24: 192.0.2.1/24: host bits are set"),
        (["route 192.0.2.0 = gw"], "needs a prefix length"),
        (["route kitchen = gw"], "is not a network"),
        (["route 192.0.2.0/24 = two words"], "line 3: want: route NETWORK = DEVICE_ID"),
    ]
    for lines, complaint in cases:
        result = check(tmp_path, *lines)
        assert result.returncode == 2 and complaint in result.stderr, (lines, result.stderr)
    assert check(tmp_path, "route 192.0.2.0/24 = gw", "route fd00:1::/64 = Gw-Two").returncode == 0


def test_an_ipv6_route_over_the_networks_own_64_stops_the_start(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "ipv6_prefix").write_text("fd00:5e:2::/64\n")
    config = write_config(tmp_path / "server.ini", "route fd00:5e:2::/64 = gw")
    result = subprocess.run([sys.executable, SERVER, "-c", config, "--no-tun", "--no-tls", "--listen", "127.0.0.1:0",
                             "--subnet", "198.18.0.0/24", "--state-dir", str(state),
                             "--control", str(tmp_path / "server.sock")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "line 3: route fd00:5e:2::/64 = gw: overlaps the network's IPv6 fd00:5e:2::/64" in result.stderr, result.stderr
