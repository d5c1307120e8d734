"""Stream mode end to end on loopback: real `listen`/`connect` processes, real TCP ends.

Each test states the semantic of issue #3 it proves.
"""

import hashlib
import os
import re
import shutil
import signal
import tempfile
import socket
import subprocess
import threading
import time

import pytest

import mnedc_client as wire
from tests.nettopo import Proc
from tests.streamnet import StreamNet, TcpServer, echo, free_port, recv_all, sink_digest
from tests.wire_peer import CLIENT, WirePeer


@pytest.fixture
def net(tmp_path):
    network = StreamNet(tmp_path)
    yield network
    network.stop()


@pytest.fixture
def tcp():
    servers = []

    def make(handler):
        servers.append(TcpServer(handler))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


def exchange(port, payload):
    """Send payload on a new connection to 127.0.0.1:port, half-close, return all that comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        received = recv_all(sock)
        sender.join(60)
    return received


def test_many_streams_at_once_each_in_order_and_byte_exact(net, tcp):
    target = tcp(echo)
    net.listen("dev-a", "--forward=%d" % target.port, "7")
    forwarder, local = net.forward("dev-b", "dev-a", 7)
    payloads = [os.urandom(1000000 + n * 7919) for n in range(8)]
    results = [None] * len(payloads)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, exchange(local, payloads[i])))
               for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == payloads
    assert sorted(target.wait_results(8).values()) == sorted(len(p) for p in payloads)
    deadline = time.monotonic() + 10
    while forwarder.output().count("closed gracefully") < 8 and time.monotonic() < deadline:
        time.sleep(0.05)                                          # the log line follows the EOF
    assert forwarder.output().count("closed gracefully") == 8


def test_half_close_a_silent_client_still_gets_a_64_kb_reply(net, tcp):
    reply = os.urandom(65536)

    def talker(sock, index):
        sock.sendall(reply)
        return recv_all(sock)                   # the client sends nothing: EOF at once
    target = tcp(talker)
    listener = net.listen("dev-a", "--forward=%d" % target.port, "80")
    result = net.run("dev-b", "connect", "dev-a", "80", input=b"")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reply
    assert target.wait_results(1)[0] == b""
    assert re.search(r"Connection with dev-a:80 closed gracefully", result.stderr)
    listener.wait_for(r"Connection with dev-b closed gracefully")


def test_half_close_a_silent_server_still_gets_all_the_client_data(net, tcp):
    target = tcp(sink_digest)
    listener = net.listen("dev-a", "--forward=%d" % target.port, "81")
    data = os.urandom(65536 * 3 + 17)
    result = net.run("dev-b", "connect", "dev-a", "81", input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert target.wait_results(1)[0] == (len(data), hashlib.sha256(data).hexdigest())
    assert "closed gracefully" in result.stderr
    listener.wait_for(r"closed gracefully")


def test_stdio_listen_serves_one_stream_and_exits(net):
    listener = net.spawn("dev-a", "listen", "5000", stdin=subprocess.PIPE)
    listener.wait_for(r"listening on virtual port 5000")
    listener.stdin.write(b"from the listener\n")
    listener.stdin.close()
    result = net.run("dev-b", "connect", "dev-a", "5000", input=b"from the connector\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"from the listener\n"
    listener.wait_for(r"from the connector")
    assert listener.wait(10) == 0


def test_nothing_listening_is_refused_promptly_and_exits_non_zero(net):
    net.listen("dev-a", "--forward=%d" % free_port(), "22")       # the device is online
    started = time.monotonic()
    result = net.run("dev-b", "connect", "dev-a", "2222")
    assert result.returncode != 0
    assert time.monotonic() - started < 5
    assert "closed suddenly: connection refused: nothing listens on port 2222 of dev-a" in result.stderr


def test_a_refusing_forward_target_is_reported_as_connection_refused(net):
    closed = free_port()
    listener = net.listen("dev-a", "--forward=%d" % closed, "23")
    result = net.run("dev-b", "connect", "dev-a", "23")
    assert result.returncode != 0
    assert re.search(r"closed suddenly: connection refused: connection refused by 127\.0\.0\.1:%d on dev-a"
                     % closed, result.stderr), result.stderr
    listener.wait_for(r"closed suddenly: connection refused")


@pytest.mark.parametrize("peer, complaint", [
    ("nobody", "unknown peer: no device, address or service is called nobody"),
    ("198.18.0.250", "unknown peer"),
])
def test_an_unknown_peer_fails_fast(net, peer, complaint):
    started = time.monotonic()
    result = net.run("dev-b", "connect", peer, "22")
    assert result.returncode != 0 and complaint in result.stderr
    assert time.monotonic() - started < 20


def test_a_known_but_offline_peer_fails_fast(net):
    member = net.peer()
    member.handshake(net.secret, "dev-gone")                       # a TUN member once: it has a lease
    member.close()
    net.server.wait_for(r"device dev-gone .* left")
    result = net.run("dev-b", "connect", "dev-gone", "22")
    assert result.returncode != 0 and "peer unreachable: dev-gone is not connected" in result.stderr


def test_an_unreachable_relay_fails_within_20_s(net):
    net.server.stop()
    started = time.monotonic()
    result = net.run("dev-b", "connect", "dev-a", "22", timeout=30)
    assert result.returncode != 0
    assert "cannot reach the relay at 127.0.0.1:%d: connection refused" % net.port in result.stderr
    assert time.monotonic() - started < 20


def test_peer_by_virtual_ip_and_by_service_name(net, tcp):
    target = tcp(echo)
    member = net.peer()
    member.handshake(net.secret, "dev-a")                          # dev-a's TUN side: its address
    net.listen("dev-a", "--forward=%d" % target.port, "--service=web", "8080")
    address = [d["address"] for d in net.services()["devices"] if d["device_id"] == "dev-a"][0]
    assert net.run("dev-b", "connect", address, "8080", input=b"by ip").stdout == b"by ip"
    assert net.run("dev-b", "connect", "web", input=b"by name").stdout == b"by name"
    assert net.run("dev-b", "connect", "dev-a", "8080", input=b"by id").stdout == b"by id"
    member.close()


def test_aborting_one_stream_leaves_the_others_running(net, tcp):
    target = tcp(echo)
    listener = net.listen("dev-a", "--forward=%d" % target.port, "7")
    forwarder, local = net.forward("dev-b", "dev-a", 7)
    keeper = socket.create_connection(("127.0.0.1", local), timeout=10)
    victim = socket.create_connection(("127.0.0.1", local), timeout=10)
    for sock in (keeper, victim):
        sock.sendall(b"hello")
        assert sock.recv(5) == b"hello"
    victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    victim.close()                                          # RST: an abort, not a half-close
    listener.wait_for(r"closed suddenly: aborted", timeout=10)
    other = net.spawn("dev-c", "connect", "dev-a", "7", stdin=subprocess.PIPE)
    other.stdin.write(b"third stream\n")
    other.stdin.flush()
    other.wait_for(r"third stream")
    other.send_signal(signal.SIGKILL)                       # a whole connect process dies
    listener.wait_for(r"closed suddenly: relay connection lost", timeout=10)
    keeper.sendall(b"still here")
    assert keeper.recv(10) == b"still here"
    keeper.close()


def test_an_idle_stream_stays_up_for_20_s(tmp_path, tcp):
    net = StreamNet(tmp_path, keepalive=5)
    try:
        target = tcp(echo)
        net.listen("dev-a", "--forward=%d" % target.port, "7")
        forwarder, local = net.forward("dev-b", "dev-a", 7)
        with socket.create_connection(("127.0.0.1", local), timeout=10) as sock:
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
            time.sleep(21)                                   # silence: keepalives must carry us
            sock.sendall(b"pong")
            assert sock.recv(4) == b"pong"
    finally:
        net.stop()


def test_a_stalled_reader_slows_only_its_own_stream_and_the_relay_buffers_little(net, tcp):
    release = threading.Event()

    def reader(sock, index):
        if index == 0:                                      # the stalled one
            release.wait(60)
        return sink_digest(sock, index)
    target = tcp(reader)
    net.listen("dev-a", "--forward=%d" % target.port, "9")
    forwarder, local = net.forward("dev-b", "dev-a", 9)
    stalled_data = os.urandom(20 * 1000 * 1000)
    stalled = socket.create_connection(("127.0.0.1", local), timeout=10)
    stalled.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:                      # push until every buffer is full
        try:
            sent += stalled.send(stalled_data[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.05)
            try:
                sent += stalled.send(stalled_data[sent:sent + 65536])
            except BlockingIOError:
                break
    assert 0 < sent < len(stalled_data), "the stalled stream should have stopped accepting data"
    fast_data = os.urandom(30 * 1000 * 1000)
    started = time.monotonic()
    assert exchange(local, fast_data) == b""                # the sink answers nothing
    seconds = time.monotonic() - started
    relay = net.services()["relay"]
    assert relay["buffered_bytes"] <= relay["max_window_bytes"] * 2, relay
    results = None
    release.set()
    stalled.setblocking(True)
    stalled.sendall(stalled_data[sent:])
    stalled.shutdown(socket.SHUT_WR)
    results = target.wait_results(2)
    assert results[1] == (len(fast_data), hashlib.sha256(fast_data).hexdigest())
    assert results[0] == (len(stalled_data), hashlib.sha256(stalled_data).hexdigest())
    stalled.close()
    print("30 MB beside a stalled stream in %.2f s (%.0f Mbit/s); relay buffered %d bytes"
          % (seconds, 240 / seconds, relay["buffered_bytes"]))
    assert seconds < 20


def test_a_peer_that_ignores_its_window_is_disconnected(net):
    listener = net.peer()
    listener.handshake(net.secret, "honest", wire.HELLO_STREAMS)
    listener.send_frame(wire.FRAME_LISTEN, wire.encode_listen(99))
    assert listener.recv_frame()[0] == wire.FRAME_LISTENING
    greedy = net.peer()
    greedy.handshake(net.secret, "greedy", wire.HELLO_STREAMS)
    greedy.send_frame(wire.FRAME_OPEN, wire.encode_open(1, 99, 65536, "honest"))
    frame_type, payload = listener.recv_frame()
    server_id = wire.decode_open(payload)[0]
    listener.send_frame(wire.FRAME_ACCEPT, wire.encode_accept(server_id, 1000))
    assert greedy.recv_frame()[0] == wire.FRAME_ACCEPT
    greedy.send_frame(wire.FRAME_DATA, wire.encode_data(1, bytes(1000)))     # exactly the window
    assert wire.decode_data(listener.recv_frame()[1]) == (server_id, bytes(1000))
    greedy.send_frame(wire.FRAME_DATA, wire.encode_data(1, b"x"))            # one byte too many
    code, text = greedy.expect_error()
    assert code == wire.ERROR_PROTOCOL and "with only 0 bytes of window" in text
    frame_type, payload = listener.recv_frame()
    assert frame_type == wire.FRAME_RESET and wire.decode_reset(payload)[1] == wire.RESET_RELAY_LOST


def test_a_dropped_relay_ends_every_stream_and_listen_registers_again(net, tcp):
    target = tcp(echo)
    listener = net.listen("dev-a", "--forward=%d" % target.port, "--service=echo", "7")
    talker = net.spawn("dev-b", "connect", "echo", stdin=subprocess.PIPE)
    talker.stdin.write(b"before\n")
    talker.stdin.flush()
    talker.wait_for(r"before")
    mark = len(listener.lines())
    net.server.send_signal(signal.SIGKILL)
    assert talker.wait(10) != 0
    assert re.search(r"closed suddenly: relay connection lost", talker.output())
    listener.wait_for(r"closed suddenly: relay connection lost", start=mark)
    net.start_server()
    listener.wait_for(r"listening on virtual port 7 as service echo", start=mark, timeout=30)
    assert [s["name"] for s in net.services()["services"]] == ["echo"]
    assert net.run("dev-b", "connect", "echo", input=b"after").stdout == b"after"


def test_services_lists_devices_and_names_for_people_and_scripts(net, tcp):
    target = tcp(echo)
    net.listen("dev-a", "--forward=%d" % target.port, "--service=mqtt", "1883")
    listing = net.services()
    assert listing["services"] == [{"name": "mqtt", "device_id": "dev-a",
                                    "address": listing["services"][0]["address"], "port": 1883}]
    devices = {d["device_id"]: d for d in listing["devices"]}
    assert devices["dev-a"]["online"] and devices["dev-a"]["stream_sessions"] == 1
    table = net.run("dev-b", "services").stdout.decode()
    assert re.search(r"mqtt +dev-a +- +1883", table), table        # stream-only: no lease, no address
    assert re.search(r"dev-a +- +online \(1 stream session", table), table


def test_many_processes_of_one_device_and_a_taken_port(net, tcp):
    target = tcp(echo)
    first = net.listen("dev-a", "--forward=%d" % target.port, "7")
    net.listen("dev-a", "--forward=%d" % target.port, "8")
    clash = net.spawn("dev-a", "listen", "--forward=%d" % target.port, "7")
    clash.wait_for(r"port taken: virtual port 7 of dev-a is taken by another listener")
    for port in ("7", "8"):
        assert net.run("dev-b", "connect", "dev-a", port, input=b"port " + port.encode()).stdout == b"port " + port.encode()
    first.stop()
    clash.wait_for(r"listening on virtual port 7", timeout=40)        # it retried and got it


def test_a_50_mb_transfer_through_a_forwarded_port_is_byte_identical(net, tcp):
    target = tcp(sink_digest)
    net.listen("dev-a", "--forward=%d" % target.port, "9")
    forwarder, local = net.forward("dev-b", "dev-a", 9)
    data = os.urandom(50 * 1000 * 1000)
    started = time.monotonic()
    assert exchange(local, data) == b""
    assert target.wait_results(1)[0] == (len(data), hashlib.sha256(data).hexdigest())
    print("50 MB through a forwarded port in %.2f s" % (time.monotonic() - started))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("sshd") or not shutil.which("ssh"),
                    reason="needs root and OpenSSH (sshd, ssh) to run a real sshd")
def test_ssh_through_connect_as_proxycommand(net, tmp_path):
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True, timeout=30)
    (keys / "authorized_keys").write_text((keys / "user.pub").read_text())
    os.chmod(str(keys / "authorized_keys"), 0o600)
    port = free_port()
    (keys / "sshd_config").write_text(
        "Port %d\nListenAddress 127.0.0.1\nHostKey %s\nAuthorizedKeysFile %s\nPidFile none\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\n" % (port, keys / "host", keys / "authorized_keys"))
    os.makedirs("/run/sshd", exist_ok=True)

    sshd = Proc.start([shutil.which("sshd"), "-D", "-e", "-f", str(keys / "sshd_config")])
    try:
        sshd.wait_for(r"Server listening on 127\.0\.0\.1 port %d" % port, timeout=15)
        net.listen("kitchen-pi", "--forward=%d" % port, "22")
        proxy = " ".join(net.argv("laptop", "connect", "%h", "22"))
        result = subprocess.run(
            ["ssh", "-F", "/dev/null", "-i", str(keys / "user"), "-o", "ProxyCommand=" + proxy,
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
             "root@kitchen-pi", "echo", "hello-over-mnedc", "&&", "uname", "-s"],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["hello-over-mnedc", "Linux"]
    finally:
        sshd.stop()


def unprivileged_python():
    """A python3 that user nobody may run (pyenv's lives under /root, which is 0700), or None."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", candidate, "-c", "pass"],
                capture_output=True, timeout=30).returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to drop to user nobody with setpriv")
def test_stream_mode_runs_as_an_unprivileged_user(net, tcp):
    python = unprivileged_python()
    if python is None:
        pytest.skip("no python3 that user nobody can run")
    board = tempfile.mkdtemp(prefix="mnedc-nobody-")
    try:
        os.chmod(board, 0o755)
        client = os.path.join(board, "mnedc_client.py")       # as scp would put it on a board
        shutil.copy(CLIENT, client)
        os.chmod(client, 0o644)

        def as_nobody(device_id, *command):
            config = os.path.join(board, device_id + ".ini")
            shutil.copy(net.config(device_id), config)
            os.chmod(config, 0o644)
            return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-u",
                    client, "-c", config] + list(command)
        target = tcp(echo)
        listener = Proc.start(as_nobody("dev-a", "listen", "--forward=%d" % target.port, "7"))
        net.procs.append(listener)
        listener.wait_for(r"listening on virtual port 7")
        uid = [l.split()[1] for l in open("/proc/%d/status" % listener.pid) if l.startswith("Uid:")][0]
        assert uid == "65534"
        result = subprocess.run(as_nobody("dev-b", "connect", "dev-a", "7"), input=b"no root here",
                                capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"no root here"
    finally:
        shutil.rmtree(board, ignore_errors=True)


def test_once_with_forward_serves_one_stream_then_exits(net, tcp):
    target = tcp(echo)
    listener = net.spawn("dev-a", "listen", "--once", "--forward=%d" % target.port, "7")
    listener.wait_for(r"listening on virtual port 7")
    local = free_port()
    forwarder = net.spawn("dev-b", "connect", "--once", "--forward=%d" % local, "dev-a", "7")
    forwarder.wait_for(r"listening on 127\.0\.0\.1:%d" % local)
    assert exchange(local, b"just once") == b"just once"
    assert forwarder.wait(10) == 0 and listener.wait(10) == 0
    assert "closed gracefully" in forwarder.output() and "closed gracefully" in listener.output()


def test_a_local_reset_ends_only_that_stream_not_the_relay_link(net, tcp):
    def rude(sock, index):
        if index == 0:                      # resets while data keeps arriving for it
            sock.recv(1000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return "reset"
        return echo(sock, index)
    target = tcp(rude)
    listener = net.listen("dev-a", "--forward=%d" % target.port, "7")
    forwarder, local = net.forward("dev-b", "dev-a", 7)
    victim = socket.create_connection(("127.0.0.1", local), timeout=10)
    target.wait_results(0)
    keeper = socket.create_connection(("127.0.0.1", local), timeout=10)
    for _ in range(50):                     # keep data flowing at the stream being reset
        try:
            victim.sendall(os.urandom(20000))
        except OSError:
            break
    keeper.sendall(b"survivor")
    assert keeper.recv(8) == b"survivor"
    listener.wait_for(r"closed suddenly: connection reset by peer")
    assert "relay connection lost" not in listener.output()
    victim.close()
    keeper.close()


def test_one_shot_transfers_never_lose_their_tail(net):
    data = os.urandom(8 * 1000 * 1000)
    for attempt in range(3):
        listener = net.spawn("dev-a", "listen", "%d" % (6000 + attempt), stdin=subprocess.PIPE)
        listener.wait_for(r"listening on virtual port")
        feeder = threading.Thread(target=lambda: (listener.stdin.write(data), listener.stdin.close()))
        feeder.start()
        result = net.run("dev-b", "connect", "dev-a", "%d" % (6000 + attempt))
        feeder.join(30)
        assert result.returncode == 0, result.stderr
        assert len(result.stdout) == len(data) and result.stdout == data, attempt
        assert listener.wait(10) == 0, listener.output()


def test_service_names_per_session_are_capped_and_services_still_answers(net):
    session = net.peer()
    session.handshake(net.secret, "hoarder", wire.HELLO_STREAMS)
    for n in range(16):
        session.send_frame(wire.FRAME_LISTEN, wire.encode_listen(1000 + n, "name-%02d-%s" % (n, "x" * 50)))
        assert session.recv_frame()[0] == wire.FRAME_LISTENING
    session.send_frame(wire.FRAME_LISTEN, wire.encode_listen(2000, "one-too-many"))
    frame_type, payload = session.recv_frame()
    assert frame_type == wire.FRAME_LISTEN_REFUSED
    port, code, text = wire.decode_listen_refused(payload)
    assert (port, code) == (2000, wire.ERROR_LIMIT) and "too many service names" in text
    started = time.monotonic()
    listing = net.services()
    assert time.monotonic() - started < 5 and len(listing["services"]) == 16     # the refused one only
    session.send_frame(wire.FRAME_LISTEN, wire.encode_listen(1000, "renamed"))   # the session goes on
    assert session.recv_frame()[0] == wire.FRAME_LISTENING


def test_relayed_bytes_have_a_global_bound_whoever_stops_reading(net):
    pairs = []
    for n in range(3):                      # each pair parks up to 64 x 512 KiB in the server
        receiver = net.peer(rcvbuf=4096)
        receiver.handshake(net.secret, "sink-%d" % n, wire.HELLO_STREAMS)
        receiver.send_frame(wire.FRAME_LISTEN, wire.encode_listen(9))
        assert receiver.recv_frame()[0] == wire.FRAME_LISTENING
        sender = net.peer()
        sender.handshake(net.secret, "source-%d" % n, wire.HELLO_STREAMS)
        pairs.append((receiver, sender))
    window = 512 * 1024
    for n, (receiver, sender) in enumerate(pairs):
        for stream in range(64):
            sender.send_frame(wire.FRAME_OPEN, wire.encode_open(2 * stream + 1, 9, window, "sink-%d" % n))
            server_id = wire.decode_open(receiver.recv_frame()[1])[0]
            receiver.send_frame(wire.FRAME_ACCEPT, wire.encode_accept(server_id, window))
        chunk = bytes(wire.MAX_DATA_BYTES)
        sender.sock.settimeout(20)
        for stream in range(64):
            for _ in range(window // len(chunk)):
                sender.send_frame(wire.FRAME_DATA, wire.encode_data(2 * stream + 1, chunk))
    net.server.wait_for(r"not reading fast enough", timeout=20)
    rss_kb = int([l for l in open("/proc/%d/status" % net.server.pid) if l.startswith("VmRSS")][0].split()[1])
    relay = net.services()["relay"]
    assert relay["buffered_bytes"] <= relay["max_buffered_bytes"], relay
    assert rss_kb < 200 * 1024, rss_kb


def test_a_burst_of_local_connections_never_closes_the_forwarded_port(net, tcp):
    target = tcp(echo)
    net.listen("dev-a", "--forward=%d" % target.port, "7")
    local = free_port()
    forwarder = Proc.start(["prlimit", "--nofile=24"] + net.argv("dev-b", "connect", "--forward=%d" % local, "dev-a", "7"))
    net.procs.append(forwarder)
    forwarder.wait_for(r"listening on 127\.0\.0\.1:%d" % local)
    burst = [socket.create_connection(("127.0.0.1", local), timeout=10) for _ in range(30)]
    forwarder.wait_for(r"accepting a local connection failed: too many open files", timeout=10)
    for sock in burst:
        sock.close()
    deadline = time.monotonic() + 15
    while True:
        try:
            assert exchange(local, b"after the burst") == b"after the burst"
            break
        except (OSError, AssertionError):
            assert time.monotonic() < deadline, "the forwarded port never recovered"
            time.sleep(0.2)


def test_stdout_shared_with_stdin_as_one_socket_still_sees_eof(net):
    listener = net.spawn("dev-a", "listen", "5100", stdin=subprocess.PIPE)
    listener.wait_for(r"listening on virtual port 5100")
    listener.stdin.write(b"hello over one socket\n")
    listener.stdin.close()
    ours, theirs = socket.socketpair()
    connector = subprocess.Popen(net.argv("dev-b", "connect", "dev-a", "5100"), stdin=theirs, stdout=theirs,
                                 stderr=subprocess.PIPE)
    theirs.close()
    try:
        ours.shutdown(socket.SHUT_WR)
        ours.settimeout(10)
        assert recv_all(ours) == b"hello over one socket\n"        # ends: EOF arrived
        assert connector.wait(10) == 0
    finally:
        if connector.poll() is None:
            connector.kill()
            connector.wait(5)
        connector.stderr.close()
        ours.close()


def test_a_frozen_listener_fails_the_connect_within_20_s(net, tcp):
    target = tcp(echo)
    listener = net.listen("dev-a", "--forward=%d" % target.port, "7")
    listener.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = net.run("dev-b", "connect", "dev-a", "7", timeout=40)
        assert result.returncode != 0 and "the peer did not answer within 15 s" in result.stderr
        assert time.monotonic() - started < 20
    finally:
        listener.send_signal(signal.SIGCONT)


def test_a_peer_name_that_is_no_name_is_refused_by_the_cli(net):
    result = net.run("dev-b", "connect", "\u00e9.b.c.d", "22")
    assert result.returncode == 2 and "may only hold" in result.stderr and "Traceback" not in result.stderr
