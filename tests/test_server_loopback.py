"""The real relay server as a process on loopback, driven by scripted peers (no root needed).

Covers joining, sticky addresses, routing, anti-spoofing, bad input of every kind, the address
pool, takeover, slow clients, keepalive and shutdown.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests.wire_peer import SERVER, Refused, WirePeer, first_start_on_a_terminal, ipv4_packet, start_server
import mnedc_client as wire


@pytest.fixture
def server(tmp_path):
    proc, port, secret = start_server(tmp_path / "state")
    yield proc, port, secret
    proc.stop()


def join(port, secret, device_id, **kw):
    peer = WirePeer(port, **kw)
    peer.handshake(secret, device_id)
    return peer


def address_text(peer):
    return socket.inet_ntoa(peer.address)


def test_devices_get_sticky_addresses_across_reconnects_and_restarts(tmp_path):
    state = tmp_path / "state"
    proc, port, secret = start_server(state)
    try:
        first = join(port, secret, "pi-one")
        second = join(port, secret, "pi-two")
        assert (address_text(first), address_text(second)) == ("198.18.0.2", "198.18.0.3")
        first.close()
        assert address_text(join(port, secret, "pi-one")) == "198.18.0.2"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.stop()
    proc, port, secret = start_server(state)        # after a SIGKILL: leases were on disk
    try:
        assert address_text(join(port, secret, "pi-two")) == "198.18.0.3"
        assert address_text(join(port, secret, "pi-one")) == "198.18.0.2"
        assert address_text(join(port, secret, "pi-three")) == "198.18.0.4"
    finally:
        proc.stop()


def test_first_start_generates_a_secret_and_prints_the_client_lines(server, tmp_path):
    """To a terminal the lines carry the secret; to a log (a pipe here, syslog or a journal on a
    board) they say where it is instead, since logs are kept and read by more people."""
    proc, port, secret = server
    logged = proc.output()
    assert "\n\nserver = 127.0.0.1:%d\n" % port in logged and "[client]\n" not in logged   # pastes under [client]
    assert secret.decode() not in logged
    assert "secret = (the line in %s, readable by root only; it is not logged)" % (tmp_path / "state" / "secret") in logged
    assert len(secret) >= 32
    printed, port, secret = first_start_on_a_terminal(tmp_path / "by-hand")
    assert "\n\nserver = 127.0.0.1:%d\nsecret = %s\n" % (port, secret.decode()) in printed, printed


def test_a_new_lease_is_one_journal_line_before_welcome_and_survives_sigkill(tmp_path):
    """Issue #14: each new lease rewrote the whole lease file (100 ms at 30,000 leases). Now it
    is one line appended to leases.json.journal before WELCOME goes out, so a relay killed
    right after keeps the address; at the next start the journal is folded into leases.json,
    which is replaced atomically (a new inode), and emptied."""
    state = tmp_path / "state"
    proc, port, secret = start_server(state)
    try:
        journal, table = state / "leases.json.journal", state / "leases.json"
        peers = [join(port, secret, "journal-%d" % n) for n in range(3)]
        lines = [json.loads(line) for line in journal.read_text().splitlines()]
        assert [(line["lease"], line["address"]) for line in lines] == \
            [("journal-%d" % n, address_text(peer)) for n, peer in enumerate(peers)]
        assert not table.exists()                   # nothing rewrote the table for them
        proc.send_signal(signal.SIGKILL)            # no shutdown, no save
        proc.wait(5)
    finally:
        proc.stop()
    proc, port, secret = start_server(state)
    try:
        assert json.load(open(str(table)))["leases"]["journal-1"]["address"] == address_text(peers[1])
        assert journal.read_text() == ""
        inode = table.stat().st_ino
        again = join(port, secret, "journal-1")
        assert address_text(again) == address_text(peers[1])
        assert table.stat().st_ino == inode          # a known device: no write at all
        assert sorted(name for name in os.listdir(str(state)) if "leases" in name) == \
            ["leases.json", "leases.json.journal"]
    finally:
        proc.stop()


def test_packets_are_routed_by_destination_address(server):
    proc, port, secret = server
    alice, bob = join(port, secret, "alice"), join(port, secret, "bob")
    to_bob = ipv4_packet(alice.address, bob.address, os.urandom(1000))
    alice.send_packet(to_bob)
    assert bob.recv_packet() == to_bob
    to_alice = ipv4_packet(bob.address, alice.address, b"reply")
    bob.send_packet(to_alice)
    assert alice.recv_packet() == to_alice


def test_spoofed_source_and_unknown_destination_are_dropped_counted_and_logged(server, tmp_path):
    proc, port, secret = server
    alice, bob, mallory = (join(port, secret, name) for name in ("alice", "bob", "mallory"))
    for _ in range(50):
        mallory.send_packet(ipv4_packet(alice.address, bob.address, b"forged"))
    mallory.send_packet(ipv4_packet(mallory.address, "198.18.0.200", b"nobody"))
    proc.wait_for(r"dropped packet from device mallory .*: spoofed source 198\.18\.0\.2 -> 198\.18\.0\.3")
    proc.wait_for(r"dropped packet from device mallory .*: unknown destination .*-> 198\.18\.0\.200")
    honest = ipv4_packet(mallory.address, bob.address, b"honest")
    mallory.send_packet(honest)
    assert bob.recv_packet() == honest                # none of the forged ones arrived before it
    spoof_lines = [line for line in proc.lines() if "spoofed source" in line]
    assert len(spoof_lines) == 1, spoof_lines         # 50 drops, one line: the log is rate-limited
    status = wire.control_request(str(tmp_path / "server.sock"), {"command": "status"})
    assert status["totals"]["drops"] == {"spoofed source": 50, "unknown destination": 1}, status["totals"]
    mallory_row = [device for device in status["devices"] if device["device_id"] == "mallory"][0]
    assert mallory_row["drops"]["spoofed source"] == 50


def test_wrong_secret_is_refused_with_a_clear_reason(server):
    proc, port, secret = server
    with pytest.raises(Refused, match="wrong secret, or this device may not join"):
        WirePeer(port).handshake(b"not-the-network-secret", "intruder")
    peer = WirePeer(port)
    nonce = os.urandom(16)
    peer.send_frame(wire.FRAME_HELLO, wire.encode_hello(nonce, "intruder"))
    server_nonce, salt = wire.decode_challenge(peer.recv_frame()[1])
    peer.send_frame(wire.FRAME_AUTH, wire.client_proof(b"wrong-secret!!", nonce, server_nonce, "intruder"))
    code, text = peer.expect_error()
    assert code == wire.ERROR_AUTH and "wrong secret" in text
    assert peer.closed_within(5)
    proc.wait_for(r"refusing device intruder from 127\.0\.0\.1:\d+: authentication failed: wrong secret")


@pytest.mark.parametrize("garbage, logged", [
    (b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n", r"exceeds the limit"),
    (wire.encode_frame(wire.FRAME_HELLO, b"HELLO, not MNEDC"), r"bad HELLO magic"),
    (wire.encode_frame(wire.FRAME_PACKET, b"\x45" + bytes(19)), r"PACKET before the handshake"),
    (wire.encode_frame(wire.FRAME_AUTH, bytes(32)), r"AUTH before the handshake"),
    (struct.pack("!HBB", 10, wire.FRAME_HELLO, 0x80), r"reserved"),
])
def test_garbage_before_the_handshake_closes_only_that_connection(server, garbage, logged):
    proc, port, secret = server
    bystander = join(port, secret, "bystander")
    start = len(proc.lines())
    peer = WirePeer(port)
    peer.send_raw(garbage)
    code, text = peer.expect_error()
    assert code == wire.ERROR_PROTOCOL
    assert peer.closed_within(5)
    proc.wait_for(r"refusing connection from 127\.0\.0\.1:\d+: protocol error: .*" + logged, start=start)
    assert address_text(join(port, secret, "newcomer")).startswith("198.18.0.")
    bystander.send_packet(ipv4_packet(bystander.address, bystander.address, b"still here"))
    assert bystander.recv_packet().endswith(b"still here")


def test_truncated_frame_then_hangup_is_logged(server):
    proc, port, secret = server
    peer = WirePeer(port)
    peer.send_raw(wire.encode_frame(wire.FRAME_HELLO, wire.encode_hello(bytes(16), "half"))[:9])
    peer.close()
    proc.wait_for(r"connection from 127\.0\.0\.1:\d+ closed: closed by peer")


@pytest.mark.parametrize("frame, logged", [
    (wire.encode_frame(99, b"?"), r"unknown frame type 99"),
    (wire.encode_frame(wire.FRAME_PACKET, b"\x50" + bytes(39)), r"not an IP packet \(version 5\)"),
    (wire.encode_frame(wire.FRAME_PACKET, b"\x60" + bytes(40)), r"IPv6 payload length 0 but 41 bytes arrived"),
    (wire.encode_frame(wire.FRAME_PACKET, b"tiny"), r"too short"),
    (wire.encode_frame(wire.FRAME_PACKET, b"\x45\x00\x00\x64" + bytes(36)), r"total length 100 but 40"),
    (wire.encode_frame(wire.FRAME_HELLO, wire.encode_hello(bytes(16), "again")), r"HELLO is not allowed"),
])
def test_bad_frames_after_the_handshake_close_that_connection(server, frame, logged):
    proc, port, secret = server
    peer = join(port, secret, "sloppy")
    peer.send_raw(frame)
    code, text = peer.expect_error()
    assert code == wire.ERROR_PROTOCOL
    proc.wait_for(r"refusing device sloppy .*: protocol error: .*" + logged)
    assert address_text(join(port, secret, "sloppy")) == address_text(peer)


def test_protocol_version_mismatch_is_named_on_both_sides(server):
    proc, port, secret = server
    peer = WirePeer(port)
    hello = bytearray(wire.encode_hello(bytes(16), "future"))
    hello[5:7] = struct.pack("!H", 7)
    peer.send_frame(wire.FRAME_HELLO, bytes(hello))
    code, text = peer.expect_error()
    assert code == wire.ERROR_VERSION
    assert "peer speaks version 7" in text and "version %d" % wire.PROTOCOL_VERSION in text
    proc.wait_for(r"refusing connection .*: version mismatch: protocol version mismatch")


def test_a_stalled_handshake_is_cut_after_10_seconds(server):
    proc, port, secret = server
    peer = WirePeer(port, timeout=20)
    peer.send_frame(wire.FRAME_HELLO, wire.encode_hello(bytes(16), "staller"))
    assert peer.recv_frame()[0] == wire.FRAME_CHALLENGE
    started = time.monotonic()
    code, text = peer.expect_error(timeout=15)
    waited = time.monotonic() - started
    assert code == wire.ERROR_TIMEOUT and "10 s" in text
    assert 8 <= waited <= 13, waited
    proc.wait_for(r"refusing device staller from .*: timeout: handshake not completed within 10 s")


def test_an_exhausted_pool_refuses_newcomers_and_keeps_serving(tmp_path):
    proc, port, secret = start_server(tmp_path / "state", subnet="198.18.0.0/29")
    try:
        members = [join(port, secret, "d%d" % n) for n in range(5)]
        assert sorted(address_text(m) for m in members) == ["198.18.0.%d" % n for n in range(2, 7)]
        with pytest.raises(Refused) as refused:
            join(port, secret, "one-too-many")
        assert refused.value.code == wire.ERROR_POOL_FULL and "198.18.0.0/29 is full" in refused.value.text
        proc.wait_for(r"refusing device one-too-many .*address pool full")
        packet = ipv4_packet(members[0].address, members[4].address, b"ok")
        members[0].send_packet(packet)
        assert members[4].recv_packet() == packet
    finally:
        proc.stop()


def test_a_second_connection_with_the_same_device_id_takes_over(server):
    proc, port, secret = server
    old = join(port, secret, "twin")
    new = join(port, secret, "twin")
    assert new.address == old.address
    code, text = old.expect_error()
    assert code == wire.ERROR_REPLACED and "replaced by a new connection for twin" in text
    assert old.closed_within(5)
    other = join(port, secret, "other")
    packet = ipv4_packet(other.address, new.address, b"to the new one")
    other.send_packet(packet)
    assert new.recv_packet() == packet


def test_a_client_that_stops_reading_never_stalls_the_others(server):
    proc, port, secret = server
    stalled = join(port, secret, "stalled", rcvbuf=4096)
    sender, echo = join(port, secret, "sender"), join(port, secret, "echo")
    flood = ipv4_packet(sender.address, stalled.address, bytes(60000))
    deadline = time.monotonic() + 20
    for _ in range(200):                             # 12 MB at a reader that reads nothing
        sender.send_packet(flood)
        assert time.monotonic() < deadline
    proc.wait_for(r"dropped packet for device stalled .*: queue full")
    for n in range(20):
        probe = ipv4_packet(sender.address, echo.address, b"probe %d" % n)
        started = time.monotonic()
        sender.send_packet(probe)
        assert echo.recv_packet(timeout=2) == probe
        assert time.monotonic() - started < 1.0
    rss_kb = int([l for l in open("/proc/%d/status" % proc.pid) if l.startswith("VmRSS")][0].split()[1])
    assert rss_kb < 64 * 1024, "server RSS %d kB after the flood" % rss_kb


def test_broadcasts_fill_at_most_a_quarter_of_a_queue_and_unicast_keeps_the_rest(tmp_path):
    """Issue #15: multicast never blocks unicast. Broadcasts at a member that reads nothing stop
    at a quarter of max_queue_bytes (1 MiB); unicast to it is still queued past that."""
    config = tmp_path / "server.ini"
    config.write_text("[server]\nmulticast_packets_per_second = 10000\nmulticast_bytes_per_second = 100000000\n")
    proc, port, secret = start_server(tmp_path / "state", "-c", str(config))
    control = os.path.join(str(tmp_path), "server.sock")

    def stalled_device():
        status = json.loads(subprocess.run([sys.executable, SERVER, "--control", control, "status", "--json"],
                                           capture_output=True, timeout=30, check=True).stdout)
        return status["totals"], [d for d in status["devices"] if d["device_id"] == "stalled"][0]
    try:
        stalled = join(port, secret, "stalled", rcvbuf=4096)
        sender = join(port, secret, "sender")
        broadcast = ipv4_packet(sender.address, "198.18.0.255", bytes(60000))
        for _ in range(200):                        # 12 MB of broadcasts at a reader that reads nothing
            sender.send_packet(broadcast)
        proc.wait_for(r"dropped packet for device stalled .*: queue too full for broadcasts")
        deadline = time.monotonic() + 10
        while stalled_device()[0]["broadcasts"] < 200:
            assert time.monotonic() < deadline, "the relay did not take all 200 broadcasts"
            time.sleep(0.1)
        before = stalled_device()[1]
        for _ in range(10):                         # 600 KB of unicast: more than a quarter
            sender.send_packet(ipv4_packet(sender.address, stalled.address, bytes(60000)))
        deadline = time.monotonic() + 10
        while stalled_device()[1]["packets_out"] < before["packets_out"] + 10:
            assert time.monotonic() < deadline, stalled_device()[1]
            time.sleep(0.1)
        after = stalled_device()[1]
        assert after["drops"]["queue too full for broadcasts"] >= 100 and "queue full" not in after["drops"], after
    finally:
        proc.stop()


def test_a_silent_peer_is_presumed_dead_after_keepalive(tmp_path):
    config = tmp_path / "server.ini"
    config.write_text("[server]\nkeepalive = 3\n")
    proc, port, secret = start_server(tmp_path / "state", "-c", str(config))
    try:
        peer = join(port, secret, "mute")
        frame_type, _ = peer.recv_frame(timeout=3, skip_pings=False)
        assert frame_type == wire.FRAME_PING            # the server probes at keepalive / 3
        started = time.monotonic()
        assert peer.closed_within(8)                     # we never answered
        assert time.monotonic() - started < 6
        proc.wait_for(r"device mute \(198\.18\.0\.2\) from 127\.0\.0\.1:\d+ left: no frame for 3 s: peer presumed dead")
        lively = join(port, secret, "lively")
        time.sleep(0.1)
        for _ in range(6):                               # answering pings keeps it up for 6 s
            frame_type, payload = lively.recv_frame(timeout=3, skip_pings=False)
            if frame_type == wire.FRAME_PING:
                lively.send_frame(wire.FRAME_PONG, payload)
        assert not lively.closed_within(0.5)
    finally:
        proc.stop()


def test_sigterm_tells_clients_and_saves_leases(tmp_path):
    state = tmp_path / "state"
    proc, port, secret = start_server(state)
    try:
        peer = join(port, secret, "watcher")
        proc.send_signal(15)
        frame_type, payload = peer.recv_frame()
        assert frame_type == wire.FRAME_RESTARTING and wire.decode_restarting(payload) == 10
        code, text = peer.expect_error()
        assert code == wire.ERROR_SHUTDOWN
        assert proc.wait(10) == 0
        assert "watcher" in (state / "leases.json").read_text()
    finally:
        proc.stop()


def test_a_burst_of_small_frames_is_delivered_at_once(server):
    proc, port, secret = server
    sender, receiver = join(port, secret, "burst"), join(port, secret, "catcher")
    packets = [ipv4_packet(sender.address, receiver.address, struct.pack("!I", n)) for n in range(5000)]
    sender.send_raw(b"".join(wire.encode_frame(wire.FRAME_PACKET, p) for p in packets))
    got = [receiver.recv_packet(timeout=3) for _ in range(len(packets))]
    assert got == packets                  # all of them, in order, without waiting for more input


def test_a_peer_that_pings_without_reading_cannot_grow_the_server(server):
    proc, port, secret = server
    flooder = join(port, secret, "flooder", rcvbuf=4096)
    ping = wire.encode_frame(wire.FRAME_PING, bytes(wire.MAX_PING_BYTES))
    flooder.sock.settimeout(0.5)
    deadline = time.monotonic() + 15
    sent = 0
    while sent < 40 * 1000 * 1000 and time.monotonic() < deadline:
        try:
            flooder.sock.sendall(ping * 1000)
            sent += len(ping) * 1000
        except (socket.timeout, OSError):
            break
    rss_kb = int([l for l in open("/proc/%d/status" % proc.pid) if l.startswith("VmRSS")][0].split()[1])
    assert rss_kb < 64 * 1024, "server RSS %d kB after %d bytes of PINGs" % (rss_kb, sent)
    assert address_text(join(port, secret, "bystander")).startswith("198.18.0.")


def test_takeover_while_the_old_connection_is_closing_keeps_the_new_one(server):
    proc, port, secret = server
    for attempt in range(20):
        old = join(port, secret, "racer")
        new = WirePeer(port)
        nonce = os.urandom(16)
        new.send_frame(wire.FRAME_HELLO, wire.encode_hello(nonce, "racer"))
        server_nonce, salt = wire.decode_challenge(new.recv_frame()[1])
        old.close()                                           # the old one vanishes just now
        key = wire.network_key(secret, salt)
        new.send_frame(wire.FRAME_AUTH, wire.client_proof(key, nonce, server_nonce, "racer"))
        assert new.recv_frame()[0] == wire.FRAME_WELCOME, attempt
        assert not new.closed_within(0.2), attempt
        new.close()
    assert "transport endpoint" not in proc.output()


def test_out_of_file_descriptors_neither_spins_nor_locks_out_clients(tmp_path):
    proc, port, secret = start_server(tmp_path / "state", prefix=["prlimit", "--nofile=40"])
    squatters = []
    try:
        for _ in range(60):                                     # silent sockets: more than fds
            squatters.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        cpu_before = process_cpu_s(proc.pid)
        started = time.monotonic()
        peer = join(port, secret, "legit")
        assert peer.address
        time.sleep(1)
        spent = process_cpu_s(proc.pid) - cpu_before
        assert time.monotonic() - started < 8
        assert spent < 0.5 * (time.monotonic() - started), "the server spun: %.2f s of CPU" % spent
        proc.wait_for(r"accept failed: too many open files")
    finally:
        for sock in squatters:
            sock.close()
        proc.stop()


def process_cpu_s(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def test_a_lease_file_of_another_subnet_is_set_aside_never_overwritten(tmp_path):
    """A relay reinstalled with a default config (another subnet) must not wipe every device's
    address: the old file is moved aside, said so, and put back it gives the old addresses."""
    state = tmp_path / "state"
    proc, port, secret = start_server(state, subnet="198.18.0.0/24")
    try:
        first = join(port, secret, "sticky").address
    finally:
        proc.stop()
    proc, port, _ = start_server(state, subnet="198.19.0.0/24")
    try:
        line = proc.wait_for(r"lease file \S+ holds the leases of subnet 198\.18\.0\.0/24, not of "
                             r"198\.19\.0\.0/24 .*; moved it to (\S+) and starting empty").group(1)
        assert join(port, secret, "sticky").address != first
    finally:
        proc.stop()
    os.replace(line, str(state / "leases.json"))
    proc, port, _ = start_server(state, subnet="198.18.0.0/24")
    try:
        assert join(port, secret, "sticky").address == first
    finally:
        proc.stop()


def test_a_stranger_gets_no_proof_to_test_guesses_against(server):
    """The server proves itself only to a client that proved first (WELCOME's MAC): a HELLO
    gets a bare nonce, and a wrong AUTH gets the same refusal any other failure gets."""
    proc, port, secret = server
    peer = WirePeer(port)
    nonce = os.urandom(16)
    peer.send_frame(wire.FRAME_HELLO, wire.encode_hello(nonce, "stranger"))
    frame_type, payload = peer.recv_frame()
    assert frame_type == wire.FRAME_CHALLENGE and len(payload) == 2 + wire.NONCE_BYTES + 16   # version, nonce, salt
    with pytest.raises(socket.timeout):
        peer.recv_frame(timeout=0.5)                    # and nothing more until it proves itself
    peer.send_frame(wire.FRAME_AUTH, bytes(32))
    assert peer.expect_error() == (wire.ERROR_AUTH, "wrong secret, or this device may not join this network "
                                                   "(the relay's log says which)")


def test_each_network_draws_its_own_salt_and_keeps_it(tmp_path):
    """The PBKDF2 salt is the network's, drawn at its first start (root only) and kept, so a
    table of guesses made for one MNEDC network is useless for another (issue #13)."""
    salts = []
    for name in ("one", "two", "one"):
        proc, port, secret = start_server(tmp_path / name)
        try:
            peer = WirePeer(port)
            peer.send_frame(wire.FRAME_HELLO, wire.encode_hello(os.urandom(16), "salty"))
            salts.append(wire.decode_challenge(peer.recv_frame()[1])[1])
            join(port, secret, "salty").close()         # and a real client joins under it
        finally:
            proc.stop()
    assert salts[0] == salts[2] != salts[1]
    assert os.stat(str(tmp_path / "one" / "salt")).st_mode & 0o777 == 0o600
    (tmp_path / "one" / "salt").write_text("not hex\n")
    result = subprocess.run([sys.executable, SERVER, "--no-tun", "--listen", "127.0.0.1:0", "--state-dir",
                             str(tmp_path / "one"), "--check"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "salt" in result.stderr, result.stderr


def test_a_reload_keeps_the_salt_and_check_and_status_make_none(tmp_path):
    """A SIGHUP after state_dir was edited (a restart key) keeps the running salt: it neither
    draws a new one per reload nor derives every key again; --check and status write nothing."""
    import signal
    keys = tmp_path / "keys"
    keys.write_text("dev-k %s\n" % ("k3y-of-dev-k-" * 2))
    config = tmp_path / "server.ini"
    config.write_text("[server]\nkeys_file = %s\n" % keys)
    proc, port, _ = start_server(tmp_path / "state", "-c", str(config))
    try:
        salt = (tmp_path / "state" / "salt").read_text()
        config.write_text("[server]\nkeys_file = %s\nstate_dir = %s\n" % (keys, tmp_path / "elsewhere"))
        for _ in range(3):
            mark = len(proc.lines())
            proc.send_signal(signal.SIGHUP)
            proc.wait_for(r"reloaded the configuration", start=mark)
        assert (tmp_path / "state" / "salt").read_text() == salt and not (tmp_path / "elsewhere").exists()
        WirePeer(port).handshake(("k3y-of-dev-k-" * 2).encode(), "dev-k")      # the key still fits
        status = subprocess.run([sys.executable, SERVER, "-c", str(config), "--control",
                                 str(tmp_path / "server.sock"), "status"], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        check = subprocess.run([sys.executable, SERVER, "-c", str(config), "--check"], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        assert not (tmp_path / "elsewhere").exists()
    finally:
        proc.stop()
