"""Zero-config TLS (issue #13, first part): `tls = yes` without certificate files makes the
relay its own Ed25519 key and self-signed certificate in state_dir, in Python; clients trust it by
its pin (`server_pin = sha256:...`), with no CA, no host name and no openssl command.
"""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

import mnedc_server
from tests.light import light_env, light_pythons
from tests.streamnet import StreamNet, TcpServer, free_port, sink_digest
from tests.wire_peer import CLIENT, SERVER

# RFC 8032 7.1: secret key, public key, message, signature
RFC8032_VECTORS = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]


@pytest.mark.parametrize("seed, public, message, signature", RFC8032_VECTORS)
def test_ed25519_matches_rfc_8032(seed, public, message, signature):
    seed = bytes.fromhex(seed)
    assert mnedc_server.ed25519_public_key(seed).hex() == public
    assert mnedc_server.ed25519_sign(seed, bytes.fromhex(message)).hex() == signature


# Under each interpreter: make the identity with the server's own code, then a real TLS
# handshake over a socketpair, both versions; print the version and the peer's certificate pin.
HANDSHAKE = r"""
import socket, ssl, sys, threading
sys.path.insert(0, sys.argv[1])
import mnedc_server as server
cert, key, made = server.ensure_tls_identity(sys.argv[2], "mnedc-relay")
relay = server.tls_context(True, cert, key)
client = server.tls_context(False)
for newest in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
    client.maximum_version = newest
    near, far = socket.socketpair()
    threading.Thread(target=lambda: relay.wrap_socket(near, server_side=True).recv(1)).start()
    link = server.TlsTransport(client, far, b"any")
    link.sock.do_handshake()
    print(link.summary()["version"], "sha256:" + link.summary()["peer_sha256"], server.certificate_pin(cert))
    link.sock.send(b"x")
"""


@pytest.mark.parametrize("version", sorted(light_pythons()))
def test_the_generated_identity_serves_tls_1_2_and_1_3_on_this_python(version, tmp_path):
    python = light_pythons()[version]
    result = subprocess.run([python, "-c", HANDSHAKE, os.path.dirname(SERVER), str(tmp_path)],
                            capture_output=True, text=True, timeout=60,
                            env=light_env(packages=["python3-openssl"]))      # as on a board
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [line[0] for line in lines] == ["TLSv1.2", "TLSv1.3"]
    assert all(line[1] == line[2] for line in lines), lines          # the pin is the one served
    assert oct(os.stat(str(tmp_path / "tls.key")).st_mode & 0o777) == "0o600"
    der = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "tls.pem"), "-outform", "DER"],
                         capture_output=True, check=True).stdout
    assert lines[0][1] == "sha256:" + hashlib.sha256(der).hexdigest()
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "tls.pem"), str(tmp_path / "tls.pem")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr    # its signature is sound


def pinned_net(tmp_path, **kw):
    """A relay with no configuration at all, and the pin its first start prints."""
    net = StreamNet(tmp_path, **kw)
    pin = net.server.wait_for(r"^server_pin = (sha256:[0-9a-f]{64})$").group(1)
    net.client_lines = ["server_pin = %s" % pin]
    return net, pin


def test_a_fresh_relay_with_no_configuration_serves_its_own_pinned_certificate(tmp_path):
    net, pin = pinned_net(tmp_path)
    try:
        assert "-c" not in net.server.argv                          # defaults only
        assert "TLS, certificate pin %s" % pin in net.server.output()
        assert "plaintext" not in net.server.output()
        net.send_through("dev-a", "dev-b", 9000, os.urandom(2 * 1000 * 1000))
        status = subprocess.run([sys.executable, SERVER, "--control", os.path.join(str(tmp_path), "server.sock"),
                                 "status"], capture_output=True, text=True, timeout=30).stdout
        assert "TLS: yes (certificate pin %s)" % pin in status
        # rotation: a list of pins, the relay's among them
        net.client_lines = ["server_pin = sha256:%s, %s" % ("0" * 64, pin)]
        assert net.run("dev-c", "services", timeout=30).returncode == 0
        # a restarted relay keeps its identity, so the pin stays
        net.server.stop()
        net.start_server()
        net.server.wait_for(r"MNEDC server ready .*certificate pin %s" % pin)
        assert "server_pin =" not in net.server.output()            # nothing new to hand out
        assert net.run("dev-c", "services", timeout=30).returncode == 0
        assert "Traceback" not in net.server.output()
    finally:
        net.stop()


def test_a_wrong_pin_is_one_clear_line_and_no_handshake(tmp_path):
    net, pin = pinned_net(tmp_path)
    try:
        wrong = "sha256:" + "ab" * 32
        net.client_lines = ["server_pin = %s" % wrong]
        result = net.run("dev-a", "services", timeout=30)
        assert result.returncode == 1
        assert "the relay's certificate is not the pinned one: got %s, server_pin is %s" % (pin, wrong) in result.stderr
        assert "device dev-a" not in net.server.output()              # it never said HELLO
    finally:
        net.stop()


@pytest.mark.parametrize("line, complaint", [
    ("server_pin = sha256:1234", "is not a pin like sha256:<64 hex digits>"),
    ("server_pin = md5:" + "0" * 64, "is not a pin like sha256"),
    ("tls = no\nserver_pin = sha256:" + "0" * 64, "server_pin set but tls is not yes"),
    ("tls = yes", "tls = yes needs server_pin, the relay's certificate pin"),
    ("", "server_pin: the link to the relay is TLS by default, and nothing says which certificate to trust"),
])
def test_pin_mistakes_are_refused_at_start(tmp_path, line, complaint):
    config = tmp_path / "client.ini"
    config.write_text("[client]\nserver = 127.0.0.1:%d\nsecret = %s\n%s\n" % (free_port(), "9f2c4e81b7d03a65c1e8", line))
    result = subprocess.run([sys.executable, CLIENT, "-c", str(config), "services"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and complaint in result.stderr, result.stderr


def test_a_pinned_stream_client_on_python3_light_with_openssl(tmp_path):
    newest = sorted(light_pythons().items(), key=lambda item: int(item[0].split(".")[1]))[-1][1]
    net, pin = pinned_net(tmp_path, python=newest, env=light_env(packages=["python3-openssl"]),
                          relay_host="localhost")
    try:
        net.send_through("dev-a", "dev-b", 9000, os.urandom(300000))
        for proc in net.procs:
            assert not re.search(r"Traceback|LookupError", proc.output()), proc.output()
    finally:
        net.stop()


def test_a_plaintext_client_at_a_tls_relay_is_told_what_to_set(tmp_path):
    net, pin = pinned_net(tmp_path)
    try:
        net.client_lines = ["tls = no"]
        result = net.run("dev-a", "services", timeout=30)
        assert result.returncode == 1
        assert "the relay requires TLS: set server_pin = %s (or tls_ca) in [client]" % pin in result.stderr, result.stderr
        net.server.wait_for(r"a client without TLS, and this relay requires it")
        net.client_lines = ["server_pin = %s" % pin]               # and the relay is none the worse
        assert net.run("dev-a", "services", timeout=30).returncode == 0
    finally:
        net.stop()


def test_a_tls_client_at_a_plaintext_relay_gets_one_clear_line_on_each_side(tmp_path):
    net = StreamNet(tmp_path, tls=False, client_lines=["server_pin = sha256:" + "0" * 64])
    try:
        result = net.run("dev-a", "services", timeout=30)
        assert result.returncode == 1
        assert "the relay answered without TLS: it has tls = no" in result.stderr, result.stderr
        net.server.wait_for(r"this relay does not speak TLS \(tls = no here\)")
        assert "Traceback" not in net.server.output()
    finally:
        net.stop()


def test_allow_plaintext_takes_both_kinds_of_client_and_says_which_is_which(tmp_path):
    net = StreamNet(tmp_path, server_lines=["allow_plaintext = yes"])
    try:
        net.server.wait_for(r"allow_plaintext = yes: clients without TLS are taken too")
        assert "TLS, certificate pin %s, plaintext clients allowed" % net.pin in net.server.output()
        target, data = TcpServer(sink_digest), os.urandom(200000)
        try:
            net.client_lines = ["tls = no"]
            net.listen("plain-dev", "--forward=%d" % target.port, "7")
            net.client_lines = ["server_pin = %s" % net.pin]
            net.listen("pinned-dev", "--forward=%d" % free_port(), "8")
            sent = net.run("pinned-dev", "connect", "plain-dev", "7", input=data, timeout=30)
            assert sent.returncode == 0, sent.stderr
            assert target.wait_results(1)[0] == (len(data), hashlib.sha256(data).hexdigest())
        finally:
            target.close()
        status = subprocess.run([sys.executable, SERVER, "--control", os.path.join(str(tmp_path), "server.sock"),
                                 "status", "--json"], capture_output=True, text=True, timeout=30)
        links = {d["device_id"]: d["tls"] for d in json.loads(status.stdout)["devices"]}
        assert links["plain-dev"] is None and links["pinned-dev"]["version"].startswith("TLSv1."), links
        assert "Traceback" not in net.server.output()
    finally:
        net.stop()


def test_turning_tls_on_with_sighup_waits_for_a_restart_instead_of_claiming_it(tmp_path):
    """A reload that turns tls on made status say TLS while the relay went on in plaintext,
    with no certificate made. It is now a restart key: said so, and nothing pretends."""
    import signal
    net = StreamNet(tmp_path, server_lines=["tls = no"])
    try:
        config = os.path.join(str(tmp_path), "server.ini")
        text = open(config).read().replace("tls = no", "tls = yes")
        with open(config, "w") as sink:
            sink.write(text)
        net.server.send_signal(signal.SIGHUP)
        net.server.wait_for(r"tls changed: takes effect at the next restart")
        status = subprocess.run([sys.executable, SERVER, "--control", os.path.join(str(tmp_path), "server.sock"),
                                 "status", "--json"], capture_output=True, text=True, timeout=30)
        assert '"tls": "no"' in status.stdout
        assert not os.path.exists(os.path.join(str(tmp_path), "state", "tls.pem"))
        assert net.run("dev-a", "services", timeout=30).returncode == 0      # plaintext, as it says
    finally:
        net.stop()
