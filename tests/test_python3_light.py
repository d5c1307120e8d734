"""Both scripts run, not just import, on OpenWrt's python3-light (issue #12, part 1).

Every process here runs under tests/python3_light: no unicodedata (so no idna codec), no
logging, no _ssl, no _hashlib, none of the other split-out packages. The relay is named by
host name where a user would name it, so the lookups go through the code path that crashed.
"""

import hashlib
import json
import os
import subprocess

import pytest

from tests.light import light_env, light_pythons
from tests.nettopo import Topology, have_netns_support
from tests.relaynet import RelayNetwork
from tests.streamnet import StreamNet, free_port
from tests.wire_peer import CLIENT, SERVER

PYTHONS = light_pythons()
SUPPORTED, WHY_NOT = have_netns_support()

PROBE = r"""
import hashlib, socket
try:
    socket.getaddrinfo("127.0.0.1", 1)
    print("getaddrinfo: ok")
except LookupError as error:
    print("getaddrinfo:", error)
for name in ("ssl", "logging", "unicodedata", "email", "urllib", "ctypes"):
    try:
        __import__(name)
        print(name + ": imported")
    except ImportError:
        print(name + ": refused")
print("sha256:", hashlib.sha256(b"mnedc").hexdigest()[:8])
"""


def run(python, *argv, env=None, timeout=30):
    return subprocess.run([python] + list(argv), capture_output=True, text=True, timeout=timeout,
                          env=env or light_env())


def test_the_floor_and_the_newest_python_are_both_tried():
    assert len(PYTHONS) == 2 and "3.7" in PYTHONS, PYTHONS


@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_the_simulation_fails_the_way_a_board_does(version):
    result = run(PYTHONS[version], "-c", PROBE)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "getaddrinfo: unknown encoding: idna" in lines
    for name in ("ssl", "logging", "unicodedata", "email", "urllib", "ctypes"):
        assert name + ": refused" in lines
    assert "sha256: " + hashlib.sha256(b"mnedc").hexdigest()[:8] in lines    # builtin _sha2/_sha256


@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_stream_mode_status_and_services_on_python3_light(version, tmp_path):
    net = StreamNet(tmp_path, python=PYTHONS[version], env=light_env(), relay_host="localhost", tls=False)
    try:
        data = os.urandom(300000)
        net.send_through("dev-b", "dev-a", 7, data)
        net.listen("dev-c", "--forward=%d" % free_port(), "--service=light-svc", "8")
        listing = net.services()
        assert [(s["name"], s["device_id"], s["port"]) for s in listing["services"]] == [("light-svc", "dev-c", 8)]
        status = run(PYTHONS[version], SERVER, "--control", os.path.join(str(tmp_path), "server.sock"),
                     "status", "--json")
        assert status.returncode == 0, status.stderr
        assert "dev-c" in {d["device_id"] for d in json.loads(status.stdout)["devices"]}
        for proc in net.procs:
            assert "Traceback" not in proc.output() and "LookupError" not in proc.output(), proc.output()
    finally:
        net.stop()


@pytest.mark.skipif(not SUPPORTED, reason="needs root, ip netns and /dev/net/tun: %s" % WHY_NOT)
@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_tun_mode_on_python3_light_across_nat(version, tmp_path):
    """The floor without python3-openssl, so with tls = no on both ends; the newest with it, so
    with the default: the relay's own certificate, pinned."""
    with_ssl = version != "3.7"
    with Topology(layout="nested") as topo:     # c sits behind two NATs
        for name in topo.clients:               # the devices name the relay, as users do
            topo.etc_file(name, "hosts", "127.0.0.1 localhost\n%s relay.test\n" % topo.server_ip)
        net = RelayNetwork(topo, tmp_path, python=PYTHONS[version], relay_host="relay.test", tls=with_ssl,
                           env=light_env(packages=["python3-openssl"] if with_ssl else []))
        net.start()
        assert topo.ping("a", net.vip["c"], count=2)
        assert topo.ping("c", net.server_vip, count=2)
        client = net.client_status("a")
        assert client["state"] == "connected" and client["address"].startswith(net.vip["a"] + "/")
        server = run(PYTHONS[version], SERVER, "--control", net.control_socket, "status", "--json")
        assert server.returncode == 0, server.stderr
        devices = json.loads(server.stdout)["devices"]
        assert {d["address"] for d in devices} == set(net.vip.values())
        assert all(bool(d["tls"]) == with_ssl for d in devices), devices


def write(path, text):
    with open(str(path), "w") as sink:
        sink.write(text)
    return str(path)


@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_check_passes_on_python3_light_and_names_what_is_missing(version, tmp_path):
    python = PYTHONS[version]
    settings = "[server]\nlisten = localhost:3334\nsubnet = 198.18.0.0/24\nstate_dir = %s\n" % (tmp_path / "state")
    default = run(python, SERVER, "-c", write(tmp_path / "default.ini", settings), "--check")
    assert default.returncode == 2 and "opkg install python3-openssl" in default.stderr, default.stderr
    assert "or set tls = no on both ends" in default.stderr
    server_ini = write(tmp_path / "server.ini", settings + "tls = no\n")
    client_ini = write(tmp_path / "client.ini", "[client]\nserver = localhost:3334, 127.0.0.1\n"
                       "secret = %s\ndevice_id = light-1\ntls = no\n" % "9f2c4e81b7d03a65c1e8a4d7")
    server = run(python, SERVER, "-c", server_ini, "--check")
    assert server.returncode == 0 and "check passed" in server.stdout, server.stderr
    assert not os.path.exists(str(tmp_path / "state")), "a check must not create state"
    client = run(python, CLIENT, "-c", client_ini, "--check")
    assert client.returncode == 0 and "relay localhost:3334, 127.0.0.1:3334" in client.stdout, client.stderr

    gone = run(python, CLIENT, "-c", client_ini, "--check", env=dict(light_env(), PYTHON3_LIGHT_ALSO_MISSING="json"))
    assert gone.returncode == 1 and "lacks json" in gone.stderr and "opkg install python3-light" in gone.stderr

    ca = write(tmp_path / "ca.pem", "not used: the check stops before\n")
    tls_ini = write(tmp_path / "tls.ini", "[client]\nserver = 127.0.0.1\nsecret = %s\ntls = yes\ntls_ca = %s\n"
                    % ("9f2c4e81b7d03a65c1e8a4d7", ca))
    tls = run(python, CLIENT, "-c", tls_ini, "--check")
    assert tls.returncode == 2 and "opkg install python3-openssl" in tls.stderr, tls.stderr
    pinned = run(python, CLIENT, "-c", write(tmp_path / "pin.ini", "[client]\nserver = 127.0.0.1\nsecret = %s\n"
                                            "server_pin = sha256:%s\n" % ("9f2c4e81b7d03a65c1e8a4d7", "0" * 64)), "--check")
    assert pinned.returncode == 2 and "opkg install python3-openssl" in pinned.stderr, pinned.stderr

    wide = write(tmp_path / "wide.ini", "[client]\nserver = rel\u00e4.example\nsecret = %s\ntls = no\n" % "9f2c4e81b7d03a65c1e8a4d7")
    named = run(python, CLIENT, "-c", wide, "--check")
    assert named.returncode == 2 and "opkg install python3-codecs" in named.stderr, named.stderr
    assert "Traceback" not in named.stderr + tls.stderr + gone.stderr
