"""TLS on the relay connection (tls = yes), with certificates from `install.sh certs`.

Proves on loopback, with the real server and real stream-mode clients: a client verifies the
server against its CA and moves data byte-exact; with client certificates required, a device
joins only with a certificate for its own device_id; a wrong CA, a missing certificate or a
plain client fail with a clear reason; and without the ssl module tls = yes says why.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.streamnet import StreamNet, free_port
from tests.wire_peer import CLIENT

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command (apt-get install openssl)")


def make_certs(directory, *clients):
    subprocess.run([os.path.join(ROOT, "install.sh"), "certs", "--dir", str(directory), "--server-name", "127.0.0.1"]
                   + [arg for client in clients for arg in ("--client", client)],
                   check=True, stdout=subprocess.DEVNULL, timeout=60)
    return str(directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    return {"ours": make_certs(base / "ours", "dev-a", "dev-b"), "theirs": make_certs(base / "theirs", "dev-a")}


def server_lines(certs, mutual=False):
    lines = ["tls = yes", "tls_cert = %s/server.pem" % certs, "tls_key = %s/server.key" % certs]
    return lines + (["tls_client_ca = %s/ca.pem" % certs] if mutual else [])


def client_lines(ca_dir, cert_dir=None, cert_for="%(device_id)s"):
    lines = ["tls = yes", "tls_ca = %s/ca.pem" % ca_dir]
    if cert_dir:
        lines += ["tls_cert = %s/client-%s.pem" % (cert_dir, cert_for), "tls_key = %s/client-%s.key" % (cert_dir, cert_for)]
    return lines


def test_data_crosses_a_tls_relay_byte_exact(tmp_path, pki):
    net = StreamNet(tmp_path, server_lines=server_lines(pki["ours"]), client_lines=client_lines(pki["ours"]))
    try:
        net.server.wait_for(r"MNEDC server ready .*, TLS, certificate pin sha256:[0-9a-f]{64}\)")
        net.send_through("dev-a", "dev-b", 9000, os.urandom(5 * 1000 * 1000))
        assert "Traceback" not in net.server.output()
    finally:
        net.stop()


def test_mutual_tls_admits_a_device_only_with_its_own_certificate(tmp_path, pki):
    net = StreamNet(tmp_path, server_lines=server_lines(pki["ours"], mutual=True),
                    client_lines=client_lines(pki["ours"], pki["ours"]))
    try:
        net.server.wait_for(r"TLS, client certificates required")
        assert net.run("dev-a", "services", timeout=30).returncode == 0
        # dev-a's certificate presented for device dev-b: refused by name
        net.client_lines = client_lines(pki["ours"], pki["ours"], cert_for="dev-a")
        forged = net.run("dev-b", "services", timeout=30)
        assert forged.returncode == 1
        assert "the client certificate is for dev-a, not for device dev-b" in forged.stderr, forged.stderr
        # no client certificate, or one from another CA: the TLS handshake fails
        net.client_lines = client_lines(pki["ours"])
        assert net.run("dev-a", "services", timeout=30).returncode == 1
        net.client_lines = client_lines(pki["ours"], pki["theirs"])
        assert net.run("dev-a", "services", timeout=30).returncode == 1
        net.server.wait_for(r"TLS handshake with 127\.0\.0\.1:\d+ failed")
        assert "Traceback" not in net.server.output()
    finally:
        net.stop()


def test_a_server_from_another_ca_or_a_plain_client_fail_with_a_reason(tmp_path, pki):
    net = StreamNet(tmp_path, server_lines=server_lines(pki["ours"]), client_lines=client_lines(pki["theirs"]))
    try:
        wrong_ca = net.run("dev-a", "services", timeout=30)
        assert wrong_ca.returncode == 1 and "certificate verify failed" in wrong_ca.stderr, wrong_ca.stderr
        net.client_lines = ["tls = no"]
        plain = net.run("dev-a", "services", timeout=30)
        assert plain.returncode == 1 and "Traceback" not in plain.stderr
        assert "Traceback" not in net.server.output()
    finally:
        net.stop()


def test_without_the_ssl_module_tls_yes_says_why(tmp_path, pki):
    config = tmp_path / "client.ini"
    config.write_text("[client]\nserver = 127.0.0.1:%d\nsecret = %s\ndevice_id = dev-a\n%s\n"
                      % (free_port(), "9f2c4e81b7d03a65c1e8", "\n".join(client_lines(pki["ours"]))))
    no_ssl = ("import runpy, sys; sys.modules['ssl'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", no_ssl, CLIENT, "-c", str(config), "services"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "TLS (tls = yes, the default) needs Python's ssl module" in result.stderr
    assert "opkg install python3-openssl" in result.stderr
    assert "Traceback" not in result.stderr


def test_tun_mode_over_mutual_tls_across_nat(tmp_path, pki):
    """As root: two TUN clients behind NAT reach each other over a relay that requires client
    certificates; 5 MB cross byte-exact. The clients name the relay (relay.test) and run on
    python3-light with python3-openssl, where the ssl module's own idna encoding of that name
    would crash; both sides' status show the certificate the other proved."""
    from tests.light import light_env, light_pythons
    from tests.nettopo import Topology, have_netns_support
    from tests.relaynet import RelayNetwork
    supported, why_not = have_netns_support()
    if not supported:
        pytest.skip("needs root, ip netns, iptables and /dev/net/tun: %s" % why_not)
    with Topology(layout="flat", clients=2) as topo:
        certs = str(tmp_path / "pki")
        subprocess.run([os.path.join(ROOT, "install.sh"), "certs", "--dir", certs, "--server-name", "relay.test"]
                       + [arg for name in topo.clients for arg in ("--client", "device-" + name)],
                       check=True, stdout=subprocess.DEVNULL, timeout=60)
        for name in topo.clients:
            topo.etc_file(name, "hosts", "127.0.0.1 localhost\n%s relay.test\n" % topo.server_ip)
        newest = sorted(light_pythons().items(), key=lambda item: int(item[0].split(".")[1]))[-1][1]
        net = RelayNetwork(topo, tmp_path, python=newest, env=light_env(packages=["python3-openssl"]),
                           relay_host="relay.test")
        net.start_server(options={"tls": "yes", "tls_cert": certs + "/server.pem", "tls_key": certs + "/server.key",
                                  "tls_client_ca": certs + "/ca.pem"})
        for name in topo.clients:
            net.start_client(name, options={"tls": "yes", "tls_ca": certs + "/ca.pem",
                                            "tls_cert": "%s/client-device-%s.pem" % (certs, name),
                                            "tls_key": "%s/client-device-%s.key" % (certs, name)})
        first, second = topo.clients
        assert topo.ping(first, net.vip[second], count=2)
        data = os.urandom(5 * 1000 * 1000)
        received = tmp_path / "received"
        sink = topo.spawn(second, ["sh", "-c", "exec nc -l 5401 > %s" % received])
        for _ in range(100):
            if topo.run(second, ["ss", "-Hltn", "sport = :5401"]).stdout.strip():
                break
            time.sleep(0.05)
        (tmp_path / "sent").write_bytes(data)
        topo.run(first, ["sh", "-c", "nc -N %s 5401 < %s" % (net.vip[second], tmp_path / "sent")], timeout=60)
        sink.wait(30)
        assert hashlib.sha256(received.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert "Traceback" not in net.server.output()

        client = net.client_status(first)["tls"]
        assert client["version"] in ("TLSv1.2", "TLSv1.3") and client["peer_certificate"].startswith("relay.test")
        server_pem = open(certs + "/server.pem").read()
        der = subprocess.run(["openssl", "x509", "-outform", "DER"], input=server_pem.encode(),
                             capture_output=True, check=True).stdout
        assert client["peer_sha256"] == hashlib.sha256(der).hexdigest()
        status = server_status(net)
        assert {d["device_id"]: d["tls"]["peer_certificate"] for d in status["devices"]} == {
            "device-" + name: "device-" + name for name in topo.clients}
        net.clients[second].stop()
        offline = []
        for _ in range(100):            # the relay sees the close at once; bounded at 5 s
            offline = server_status(net)["offline"]
            if offline:
                break
            time.sleep(0.05)
        assert [(d["device_id"], d["address"]) for d in offline] == [("device-" + second, net.vip[second])]
        assert time.time() - offline[0]["last_seen"] < 60
        table = subprocess.run([sys.executable, os.path.join(ROOT, "mnedc_server.py"), "--control",
                                net.control_socket, "status"], capture_output=True, text=True, timeout=30).stdout
        assert "known, offline:" in table and "cert device-" + first in table, table


def server_status(net):
    import json
    result = subprocess.run([sys.executable, os.path.join(ROOT, "mnedc_server.py"), "--control",
                             net.control_socket, "status", "--json"], capture_output=True, timeout=30, check=True)
    return json.loads(result.stdout.decode())


def test_the_client_checks_the_name_in_the_relays_certificate(tmp_path):
    """A certificate for relay.test is refused at 127.0.0.1 unless tls_server_name says
    relay.test: the CA alone is not enough."""
    renamed = str(tmp_path / "renamed")
    subprocess.run([os.path.join(ROOT, "install.sh"), "certs", "--dir", renamed, "--server-name", "relay.test"],
                   check=True, stdout=subprocess.DEVNULL, timeout=60)
    net = StreamNet(tmp_path, server_lines=["tls = yes", "tls_cert = %s/server.pem" % renamed,
                                            "tls_key = %s/server.key" % renamed],
                    client_lines=client_lines(renamed))
    try:
        wrong = net.run("dev-a", "services", timeout=30)
        assert wrong.returncode == 1 and "TLS handshake" in wrong.stderr, wrong.stderr
        assert "mismatch" in wrong.stderr or "doesn't match" in wrong.stderr, wrong.stderr   # OpenSSL's words
        net.client_lines = client_lines(renamed) + ["tls_server_name = relay.test"]
        assert net.run("dev-a", "services", timeout=30).returncode == 0
    finally:
        net.stop()


def tls_peer(port, ca):
    """A WirePeer speaking TLS to the relay, trusting ca."""
    import ssl
    from tests.wire_peer import WirePeer
    peer = WirePeer(port)
    context = ssl.create_default_context(cafile=ca)
    peer.sock = context.wrap_socket(peer.sock, server_hostname="127.0.0.1")
    return peer


def test_a_large_frame_over_tls_arrives_without_waiting_for_more(tmp_path, pki):
    """OpenSSL can hold the rest of a record that select() never reports: it must be read."""
    from tests.wire_peer import ipv4_packet
    net = StreamNet(tmp_path, server_lines=server_lines(pki["ours"]))
    try:
        ca = pki["ours"] + "/ca.pem"
        alice, bob = tls_peer(net.port, ca), tls_peer(net.port, ca)
        alice.handshake(net.secret, "alice")
        bob.handshake(net.secret, "bob")
        for size in (12000, 60000):
            packet = ipv4_packet(alice.address, bob.address, os.urandom(size))
            alice.send_packet(packet)
            started = time.monotonic()
            assert bob.recv_packet(timeout=3) == packet       # long before the next PING (10 s)
            assert time.monotonic() - started < 3
    finally:
        net.stop()


def test_a_tls_listener_survives_peers_that_reset_at_once(tmp_path, pki):
    """Python's wrap_socket refuses a socket reset with data unread (CVE-2023-40217 fix): that
    connection is dropped, the listener keeps listening."""
    import socket
    import struct
    net = StreamNet(tmp_path, server_lines=server_lines(pki["ours"]), client_lines=client_lines(pki["ours"]))
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", net.port), timeout=5)
            sock.sendall(b"x")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()                                    # RST
        time.sleep(0.5)
        assert net.run("dev-a", "services", timeout=30).returncode == 0
        assert "stopped listening" not in net.server.output()
    finally:
        net.stop()


def test_a_connection_turned_away_under_tls_costs_no_cpu(tmp_path, pki):
    import socket
    net = StreamNet(tmp_path, server_lines=server_lines(pki["ours"]) + ["max_connections_per_source = 1"])
    held = socket.create_connection(("127.0.0.1", net.port), timeout=5)
    try:
        before = cpu_seconds(net.server.pid)
        extra = socket.create_connection(("127.0.0.1", net.port), timeout=5)
        assert extra.recv(100) == b""                         # closed at once
        extra.close()
        time.sleep(2.5)
        assert cpu_seconds(net.server.pid) - before < 0.5
        net.server.wait_for(r"refused a connection from 127\.0\.0\.1: limit reached")
    finally:
        held.close()
        net.stop()


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def san_only_certificate(certs, directory, name):
    """A client certificate from certs' CA with no commonName, only DNS:name in its SAN."""
    key, request, cert, ext = (os.path.join(str(directory), "%s.%s" % (name, kind)) for kind in ("key", "csr", "pem", "ext"))
    with open(ext, "w") as sink:
        sink.write("subjectAltName = DNS:%s\nextendedKeyUsage = clientAuth\n" % name)
    for argv in (["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key],
                 ["openssl", "req", "-new", "-key", key, "-subj", "/O=MNEDC test", "-out", request],
                 ["openssl", "x509", "-req", "-in", request, "-CA", certs + "/ca.pem", "-CAkey", certs + "/ca.key",
                  "-set_serial", "7", "-days", "2", "-extfile", ext, "-out", cert]):
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
    return cert, key


def test_a_certificate_must_name_the_device_in_cn_or_san(tmp_path, pki):
    cert, key = san_only_certificate(pki["ours"], tmp_path, "dev-a")
    lines = ["tls = yes", "tls_ca = %s/ca.pem" % pki["ours"], "tls_cert = %s" % cert, "tls_key = %s" % key]
    net = StreamNet(tmp_path, server_lines=server_lines(pki["ours"], mutual=True), client_lines=lines)
    try:
        assert net.run("dev-a", "services", timeout=30).returncode == 0       # its SAN names it
        other = net.run("dev-b", "services", timeout=30)
        assert other.returncode == 1 and "certificate is for dev-a, not for device dev-b" in other.stderr, other.stderr
    finally:
        net.stop()


def test_a_stream_client_of_another_user_says_it_cannot_read_a_key(pki):
    """A key in root's 0700 directory, and `services` run as nobody: the one line names the file,
    the permission and the uid, not 'no such file' (issue #12, part 3)."""
    import tempfile
    from tests.test_streams import unprivileged_python
    python = unprivileged_python() if os.geteuid() == 0 and shutil.which("setpriv") else None
    if python is None:
        pytest.skip("needs root, setpriv (util-linux) and a python3 that user nobody can run")
    board = tempfile.mkdtemp(prefix="mnedc-nobody-")
    try:
        os.chmod(board, 0o755)
        client = os.path.join(board, "mnedc_client.py")
        shutil.copy(CLIENT, client)
        private = os.path.join(board, "root-only")
        os.mkdir(private, 0o700)
        shutil.copy(pki["ours"] + "/ca.pem", os.path.join(private, "ca.pem"))
        config = os.path.join(board, "client.ini")
        with open(config, "w") as sink:
            sink.write("[client]\nserver = 127.0.0.1:%d\nsecret = %s\ndevice_id = dev-a\ntls = yes\n"
                       "tls_ca = %s/ca.pem\n" % (free_port(), "9f2c4e81b7d03a65c1e8", private))
        for path in (client, config):
            os.chmod(path, 0o644)
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python,
                                 client, "-c", config, "services"], capture_output=True, text=True,
                                timeout=30, cwd="/")
        assert result.returncode == 2, result.stderr
        assert "tls_ca: %s/ca.pem: permission denied: this process runs as uid 65534" % private in result.stderr
    finally:
        shutil.rmtree(board, ignore_errors=True)
