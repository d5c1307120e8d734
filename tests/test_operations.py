"""Operating a relay: status, kick, hooks, SIGHUP reload, restart without a storm, syslog, and
rate-limited logs (issue #4), against live processes."""

import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

import pytest

import mnedc_server
from tests.nettopo import Proc, Topology, have_netns_support
from tests.relaynet import RelayNetwork
from tests.streamnet import StreamNet, free_port
from tests.wire_peer import CLIENT, SERVER, Refused, WirePeer, ipv4_packet, start_server

SUPPORTED, WHY_NOT = have_netns_support()
needs_netns = pytest.mark.skipif(not SUPPORTED, reason="needs root, ip netns and /dev/net/tun: %s" % WHY_NOT)


def run(*argv):
    result = subprocess.run([sys.executable] + list(argv), capture_output=True, text=True, timeout=30)
    return result


@needs_netns
def test_status_kick_and_hooks_with_two_live_tun_clients(tmp_path):
    record = tmp_path / "hooks.log"
    hook = tmp_path / "hook.sh"
    hook.write_text('#!/bin/sh\necho "$MNEDC_EVENT $MNEDC_DEVICE_ID $MNEDC_VIRTUAL_IP $MNEDC_REMOTE_ADDRESS" >> %s\n' % record)
    hook.chmod(0o755)
    with Topology(layout="flat", clients=2) as topo:
        net = RelayNetwork(topo, tmp_path)
        net.start_server(options={"on_join": str(hook), "on_leave": str(hook)})
        for name in topo.clients:
            net.start_client(name)
        assert topo.ping("c1", net.vip["c2"], count=3)

        status = json.loads(run(SERVER, "--control", net.control_socket, "status", "--json").stdout)
        devices = {d["device_id"]: d for d in status["devices"]}
        assert set(devices) == {"device-c1", "device-c2"}
        for name in topo.clients:
            device = devices["device-" + name]
            assert device["address"] == net.vip[name] and device["kind"] == "tun"
            assert device["remote"].startswith(topo.addr(name) + ":")
            assert device["packets_in"] >= 3 and device["packets_out"] >= 3 and device["bytes_in"] > 0
        assert status["totals"]["devices"] == 2 and status["server"]["address"] == "198.18.0.1"
        table = run(SERVER, "--control", net.control_socket, "status").stdout
        assert re.search(r"device-c1 +198\.18\.0\.\d+ +192\.0\.2\.\d+:\d+ +tun", table), table

        client_status = json.loads(run(CLIENT, "--control", os.path.join(net.workdir, "client-c1.sock"),
                                       "status", "--json").stdout)
        assert client_status["state"] == "connected" and client_status["address"] == net.vip["c1"] + "/24"
        assert client_status["packets_out"] >= 3 and client_status["server_address"] == "198.18.0.1"

        mark = len(net.clients["c1"].lines())
        kicked = run(SERVER, "--control", net.control_socket, "kick", "device-c1")
        assert kicked.returncode == 0 and "disconnected device-c1" in kicked.stdout
        net.clients["c1"].wait_for(r"the operator disconnected this device", start=mark)
        again = net.clients["c1"].wait_for(r"connected to relay \S+ as (\S+)/", start=mark, timeout=20)
        assert again.group(1) == net.vip["c1"]                  # it may rejoin, and keeps its address
        missing = run(SERVER, "--control", net.control_socket, "kick", "nobody")
        assert missing.returncode == 1 and "nobody is not connected" in missing.stderr

        deadline = time.monotonic() + 10
        while record.read_text().count("\n") < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        events = [line.split() for line in record.read_text().splitlines()]
        kinds = [tuple(e[:3]) for e in events]
        assert kinds.count(("join", "device-c1", net.vip["c1"])) == 2
        assert kinds.count(("leave", "device-c1", net.vip["c1"])) == 1
        assert kinds.count(("join", "device-c2", net.vip["c2"])) == 1 and len(kinds) == 4
        assert all(re.match(r"192\.0\.2\.\d+:\d+$", e[3]) for e in events), events


def test_status_and_kick_say_clearly_when_no_server_runs(tmp_path):
    result = run(SERVER, "--control", str(tmp_path / "none.sock"), "status")
    assert result.returncode == 1 and "no running server answers on" in result.stderr
    result = run(CLIENT, "--control", str(tmp_path / "none.sock"), "status")
    assert result.returncode == 1 and "no running TUN client answers on" in result.stderr


def test_sighup_takes_a_new_secret_and_log_level_without_dropping_anyone(tmp_path):
    config = tmp_path / "server.ini"
    old, new = "old-secret-0123456789", "new-secret-9876543210"
    config.write_text("[server]\nsecret = %s\n" % old)
    proc, port, _ = start_server(tmp_path / "state", "-c", str(config))
    try:
        member = WirePeer(port)
        member.handshake(old.encode(), "steady")
        config.write_text("[server]\nsecret = %s\nlog_level = debug\n" % new)
        proc.send_signal(signal.SIGHUP)
        proc.wait_for(r"reloaded the configuration .*log level debug")
        with pytest.raises(Refused, match="wrong secret, or this device may not join"):
            WirePeer(port).handshake(old.encode(), "late")
        newcomer = WirePeer(port)
        newcomer.handshake(new.encode(), "late")
        packet = ipv4_packet(member.address, newcomer.address, b"still connected")
        member.send_packet(packet)
        assert newcomer.recv_packet() == packet
        config.write_text("[server]\nsubnet = banana\n")
        proc.send_signal(signal.SIGHUP)
        proc.wait_for(r"reload failed, keeping the running configuration: .*subnet")
        assert proc.alive()
        WirePeer(port).handshake(new.encode(), "after-bad-reload")
    finally:
        proc.stop()


def test_a_restart_spreads_50_reconnects_over_the_window(tmp_path):
    net = StreamNet(tmp_path)
    try:
        listeners = [net.spawn("dev-%02d" % n, "listen", "--forward=%d" % free_port(), "7") for n in range(50)]
        for listener in listeners:
            listener.wait_for(r"listening on virtual port 7", timeout=60)
        marks = [len(l.lines()) for l in listeners]
        net.server.send_signal(signal.SIGTERM)
        assert net.server.wait(15) == 0
        net.start_server()
        delays = [float(l.wait_for(r"the relay is restarting: reconnecting in ([\d.]+) s", start=m).group(1))
                  for l, m in zip(listeners, marks)]
        for listener, mark in zip(listeners, marks):
            listener.wait_for(r"listening on virtual port 7", start=mark, timeout=30)
        window = mnedc_server.DEFAULT_RESTART_WINDOW_S
        assert all(1.0 <= d <= window for d in delays), delays
        assert max(delays) - min(delays) > window / 2 and statistics.pstdev(delays) > window / 6, delays
        in_first_second = sum(1 for d in delays if d < 2.0)
        assert in_first_second < 20, "%d of 50 came back at once" % in_first_second
    finally:
        net.stop()


def test_repeated_log_lines_are_summarised_with_a_count(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(mnedc_server.time, "monotonic", lambda: clock[0])
    sink = io.StringIO()
    log = mnedc_server.Log("info", stream=sink)
    for _ in range(533):
        log.limited("flap", "warning", "client flapping")
        clock[0] += 0.1                                     # 53 s of flapping
    clock[0] += 10
    log.flush()
    lines = sink.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("WARNING client flapping")
    assert re.search(r"WARNING client flapping \(532 more in the last 63 s\)$", lines[1]), lines
    clock[0] += 61
    log.flush()
    assert len(sink.getvalue().splitlines()) == 2 and "flap" not in log._windows


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare to give the server a private /dev/log")
def test_syslog_gets_one_line_per_event_and_stderr_stays_quiet(tmp_path):
    collector = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    collector.bind(str(tmp_path / "log"))
    collector.settimeout(10)
    script = ("mount -t tmpfs tmpfs /dev && touch /dev/log && mount --bind %s /dev/log && exec \"$@\""
              % (tmp_path / "log"))
    port = free_port()
    proc = Proc.start(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                       sys.executable, "-u", SERVER, "--no-tun", "--syslog", "--listen", "127.0.0.1:%d" % port,
                       "--subnet", "198.18.0.0/24",
                       "--state-dir", str(tmp_path / "state"), "--control", str(tmp_path / "s.sock")])
    try:
        messages = []
        deadline = time.monotonic() + 15
        while not any("MNEDC server ready" in m for m in messages) and time.monotonic() < deadline:
            messages.append(collector.recv(4096).decode())
        assert any(re.match(r"<30>.*mnedc-server\[%d\]: listening on 127\.0\.0\.1:%d" % (proc.pid, port), m)
                   for m in messages), messages
        secret = (tmp_path / "state" / "secret").read_text().strip().encode()
        pin = re.search(r"certificate pin (sha256:[0-9a-f]{64})", messages[-1]).group(1)   # the default: TLS
        WirePeer(port, pin=pin).handshake(secret, "logged")
        joined = collector.recv(4096).decode()
        assert re.match(r"<30>.*mnedc-server\[%d\]: device logged joined as 198\.18\.0\.2 from 127\.0\.0\.1:\d+$"
                        % proc.pid, joined), joined
        assert proc.output() == ""
    finally:
        proc.stop()
        collector.close()


def test_a_hook_gets_path_and_the_mnedc_variables_only(tmp_path):
    """Nothing else of the daemon's environment (issue #12, part 5): it may hold secrets, or
    settings like LD_PRELOAD or PYTHONPATH meant for the daemon alone."""
    record = tmp_path / "hook.env"
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\nenv > %s.tmp && mv %s.tmp %s\n" % (record, record, record))
    hook.chmod(0o755)
    config = tmp_path / "server.ini"
    config.write_text("[server]\non_join = %s\n" % hook)
    env = dict(os.environ, DAEMON_ONLY="not for hooks", PYTHONDONTWRITEBYTECODE="1")
    proc, port, secret = start_server(tmp_path / "state", "-c", str(config), env=env)
    try:
        peer = WirePeer(port)
        peer.handshake(secret, "hooked")
        for _ in range(200):            # the hook runs without the server waiting; bounded: 10 s
            if record.exists():
                break
            time.sleep(0.05)
        seen = dict(line.split("=", 1) for line in record.read_text().splitlines() if "=" in line)
        assert seen["MNEDC_DEVICE_ID"] == "hooked" and seen["MNEDC_EVENT"] == "join"
        assert seen["PATH"] == mnedc_server.HOOK_PATH
        assert set(seen) - {"PWD", "SHLVL", "_", "OLDPWD"} == {
            "PATH", "MNEDC_EVENT", "MNEDC_DEVICE_ID", "MNEDC_VIRTUAL_IP", "MNEDC_REMOTE_ADDRESS"}, seen
        peer.close()
    finally:
        proc.stop()


def test_pidfile_and_heartbeat_follow_no_planted_symlink(tmp_path):
    """Both files are written as root, often in a directory others share: a symlink planted at
    their names must not make root truncate or touch its target (issue #13), and a directory
    others can write without the sticky bit is refused."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    before = os.stat(str(victim)).st_mtime_ns
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(str(shared), 0o1777)                  # like /tmp
    os.symlink(str(victim), str(shared / "relay.pid.tmp"))
    proc, _, _ = start_server(tmp_path / "state", "--pidfile", str(shared / "relay.pid"))
    try:
        assert open(str(shared / "relay.pid")).read().strip() == str(proc.pid)
        assert not os.path.islink(str(shared / "relay.pid"))
    finally:
        proc.stop()
    os.symlink(str(victim), str(shared / "relay.heartbeat"))
    result = subprocess.run([sys.executable, SERVER, "--no-tun", "--listen", "127.0.0.1:0", "--state-dir",
                             str(tmp_path / "state"), "--control", str(tmp_path / "s2.sock"),
                             "--heartbeat", str(shared / "relay.heartbeat")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "too many levels of symbolic links" in result.stderr, result.stderr
    assert victim.read_text() == "precious\n" and os.stat(str(victim)).st_mtime_ns == before
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(str(open_dir), 0o777)
    result = subprocess.run([sys.executable, SERVER, "--no-tun", "--listen", "127.0.0.1:0", "--state-dir",
                             str(tmp_path / "state"), "--control", str(tmp_path / "s3.sock"),
                             "--pidfile", str(open_dir / "relay.pid")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    assert "refusing to write %s: its directory %s is writable by others (mode 777) without the sticky bit" \
        % (open_dir / "relay.pid", open_dir) in result.stderr
    assert os.listdir(str(open_dir)) == []


F_SETPIPE_SZ = 1031


def test_a_log_reader_that_stalls_never_freezes_the_relay(tmp_path):
    """Issue #14: a daemon whose stderr is a pipe nobody drains blocked in write and froze the
    relay. Here nobody reads the relay's 4 KB pipe while 900 devices join and leave (some
    70 KB of log at -v, join and leave lines being limited): every join stays quick, and once
    the reader comes back it is told how many lines it missed."""
    import fcntl
    from tests.wire_peer import state_key
    reader, writer = os.pipe()
    fcntl.fcntl(writer, F_SETPIPE_SZ, 4096)
    port, state = free_port(), tmp_path / "state"
    config = tmp_path / "server.ini"
    config.write_text("[server]\nmax_new_leases_per_minute = 10000\n")
    proc = subprocess.Popen([sys.executable, "-u", SERVER, "-c", str(config), "--no-tun", "--no-tls", "-v", "--listen",
                             "127.0.0.1:%d" % port, "--subnet", "198.18.0.0/22", "--state-dir", str(state),
                             "--control", str(tmp_path / "s.sock")],
                            stdin=subprocess.DEVNULL, stdout=writer, stderr=writer, start_new_session=True)
    os.close(writer)
    try:
        for _ in range(200):                        # up within 10 s (no ready line to wait for: unread)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        secret = (state / "secret").read_text().strip().encode()
        key = state_key(state, secret)
        slowest, flood_started = 0.0, time.monotonic()
        for number in range(900):
            started = time.monotonic()
            peer = WirePeer(port, timeout=5)
            peer.handshake(secret, "flood-%03d" % number, key=key)
            peer.close()
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 1.0, "a join took %.2f s while the log's reader stalled" % slowest
        print("900 joins in %.1f s, the slowest %.3f s, with nobody reading the log"
              % (time.monotonic() - flood_started, slowest))
        assert proc.poll() is None
        os.set_blocking(reader, False)
        text, deadline = b"", time.monotonic() + 10
        for number in range(500):                    # the reader is back: joins keep the relay logging
            if b"log lines dropped" in text or time.monotonic() > deadline:
                break
            try:
                text += os.read(reader, 65536)
            except BlockingIOError:
                time.sleep(0.02)
            peer = WirePeer(port, timeout=5)
            peer.handshake(secret, "after-%03d" % number, key=key)
            peer.close()
        dropped = re.search(rb"WARNING (\d+) log lines dropped: whatever reads this log did not keep up", text)
        assert dropped and int(dropped.group(1)) > 100, text[-2000:]
        assert b"Traceback" not in text
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:       # a relay stuck in write never sees SIGTERM
            proc.kill()
            proc.wait(5)
        os.close(reader)


def test_forget_frees_an_offline_devices_address_and_refuses_a_connected_one(tmp_path):
    """Issue #14: minted device_ids held the pool for 7 days; the operator can now free them."""
    from tests.wire_peer import state_key
    proc, port, secret = start_server(tmp_path / "state")
    control = str(tmp_path / "server.sock")
    try:
        key = state_key(tmp_path / "state", secret)
        minted = WirePeer(port)
        freed = minted.handshake(secret, "minted-1", key=key)
        minted.close()
        kept = WirePeer(port)
        kept.handshake(secret, "kept", key=key)
        for _ in range(100):                        # minted-1's close reaches the relay (bounded: 5 s)
            devices = json.loads(run(SERVER, "--control", control, "status", "--json").stdout)["devices"]
            if "minted-1" not in {d["device_id"] for d in devices}:       # connected ones only
                break
            time.sleep(0.05)
        online = run(SERVER, "--control", control, "forget", "kept")
        assert online.returncode == 1 and "device kept is connected" in online.stderr, online.stderr
        unknown = run(SERVER, "--control", control, "forget", "nobody")
        assert unknown.returncode == 1 and "device nobody has no lease" in unknown.stderr
        forgotten = run(SERVER, "--control", control, "forget", "minted-1")
        assert forgotten.returncode == 0, forgotten.stderr
        assert "forgot minted-1; %s is free again" % socket.inet_ntoa(freed) in forgotten.stdout
        leases = json.loads((tmp_path / "state" / "leases.json").read_text())
        assert "minted-1" not in json.dumps(leases) and "kept" in json.dumps(leases)
        proc.wait_for(r"forgot the lease of device minted-1 \(%s\) on the operator's request" % socket.inet_ntoa(freed))
        newcomer = WirePeer(port)
        assert newcomer.handshake(secret, "newcomer", key=key) == freed        # the address is free
    finally:
        proc.stop()


HOOK = """#!/bin/sh
# one marker per running hook; the count when it starts is how many run at once
touch "%(dir)s/$$"
ls "%(dir)s" | wc -l >> "%(log)s"
sleep 0.5
rm -f "%(dir)s/$$"
"""


def test_hooks_run_a_few_at_a_time_and_a_join_storm_is_queued_then_dropped_and_counted(tmp_path):
    """Issue #14: 253 joins once left 506 hook processes running at once."""
    from tests.wire_peer import state_key
    import mnedc_server as relay
    markers, counts = tmp_path / "running", tmp_path / "counts"
    markers.mkdir()
    hook = tmp_path / "on_join.sh"
    hook.write_text(HOOK % {"dir": markers, "log": counts})
    hook.chmod(0o755)
    config = tmp_path / "server.ini"
    config.write_text("[server]\non_join = %s\nmax_connections_per_source = 1000\n"
                      "max_new_leases_per_minute = 1000\n" % hook)
    proc, port, secret = start_server(tmp_path / "state", "-c", str(config), subnet="198.18.0.0/23")
    try:
        key = state_key(tmp_path / "state", secret)
        joins = relay.MAX_RUNNING_HOOKS + relay.MAX_QUEUED_HOOKS + 30
        peers = []
        for number in range(joins):             # they stay: no leave cancels a join
            peer = WirePeer(port)
            peer.handshake(secret, "storm-%03d" % number, key=key)
            peers.append(peer)
        proc.wait_for(r"%d hooks running and %d waiting: dropped on_join hook .* \(1 dropped so far\)"
                      % (relay.MAX_RUNNING_HOOKS, relay.MAX_QUEUED_HOOKS))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not counts.exists():
            time.sleep(0.05)
        time.sleep(2)                           # some rounds of the queue
        seen = [int(line) for line in counts.read_text().split()]
        assert len(seen) > relay.MAX_RUNNING_HOOKS, seen          # the queue moves on
        assert max(seen) <= relay.MAX_RUNNING_HOOKS, seen
        for peer in peers:
            peer.close()
    finally:
        proc.stop()


def test_a_device_that_joins_and_leaves_while_its_hook_waits_runs_no_hook(tmp_path):
    from tests.wire_peer import state_key
    import mnedc_server as relay
    events = tmp_path / "events"
    hook = tmp_path / "hook.sh"
    hook.write_text('#!/bin/sh\necho "$MNEDC_EVENT $MNEDC_DEVICE_ID" >> "%s"\nsleep 0.5\n' % events)
    hook.chmod(0o755)
    config = tmp_path / "server.ini"
    config.write_text("[server]\non_join = %s\non_leave = %s\n" % (hook, hook))
    proc, port, secret = start_server(tmp_path / "state", "-c", str(config))
    try:
        key = state_key(tmp_path / "state", secret)
        busy = []
        for number in range(relay.MAX_RUNNING_HOOKS):      # every hook slot taken for 0.5 s
            peer = WirePeer(port)
            peer.handshake(secret, "busy-%d" % number, key=key)
            busy.append(peer)
        flapper = WirePeer(port)
        flapper.handshake(secret, "flapper", key=key)       # its join waits in the queue ...
        flapper.close()                                     # ... and its leave cancels it
        proc.wait_for(r"device flapper \(\S+\) from \S+ left")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(events.read_text().split("\n")) <= relay.MAX_RUNNING_HOOKS:
            time.sleep(0.1)
        late = WirePeer(port)
        late.handshake(secret, "late", key=key)             # the queue still works after it
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "join late" not in events.read_text():
            time.sleep(0.1)
        lines = events.read_text().splitlines()
        assert "join late" in lines and not [line for line in lines if "flapper" in line], lines
        for peer in busy + [late]:
            peer.close()
    finally:
        proc.stop()


def test_new_leases_are_on_trial_so_a_minting_spree_frees_the_pool_within_minutes(tmp_path):
    """Issue #14: 253 minted device_ids held a /24 for 7 days. A new lease now lasts only once
    its device stayed lease_trial seconds; one that left sooner is freed lease_trial after it
    left, and a full pool takes such leases first, so a real device still joins at once."""
    from tests.wire_peer import state_key
    config = tmp_path / "server.ini"
    config.write_text("[server]\nlease_trial = 2\nmax_new_leases_per_minute = 100\n")
    proc, port, secret = start_server(tmp_path / "state", "-c", str(config), subnet="198.18.0.0/28")
    control = str(tmp_path / "server.sock")
    try:
        key = state_key(tmp_path / "state", secret)
        stayer = WirePeer(port)
        stayer_address = stayer.handshake(secret, "stayer", key=key)
        minted = set()
        for number in range(12):                    # with the stayer, all 13 addresses of the /28
            peer = WirePeer(port)
            minted.add(peer.handshake(secret, "minted-%02d" % number, key=key))
            peer.close()
        assert len(minted) == 12 and stayer_address not in minted
        real = WirePeer(port)                       # the pool is full of gone trial leases: one goes
        assert real.handshake(secret, "real-device", key=key) in minted
        proc.wait_for(r"reclaimed 198\.18\.0\.\d+ from minted-00, whose lease was on trial")
        time.sleep(3.5)                             # the stayer and the real device pass their trial (ticks: 1 s)
        stayer.close()
        proc.wait_for(r"freed the addresses of 11 device\(s\) that left within 2 s of their first join", timeout=10)
        time.sleep(2.5)                             # the stayer gone as long as a trial: its lease stays
        leases = json.loads((tmp_path / "state" / "leases.json").read_text())["leases"]
        assert sorted(leases) == ["real-device", "stayer"], proc.output()[-3000:]
        assert not any("trial" in lease for lease in leases.values())
        status = json.loads(run(SERVER, "--control", control, "status", "--json").stdout)
        assert status["totals"]["leases"] == 2 and status["server"]["limits"]["lease_trial"] == 2
        again = WirePeer(port)
        assert again.handshake(secret, "stayer", key=key) == stayer_address   # sticky, as before
    finally:
        proc.stop()


def test_a_flapping_device_gets_a_few_join_and_leave_lines_a_minute(tmp_path):
    """Issue #14: 253 joins wrote 514 lines. A device that joins and leaves 10 times gets
    MEMBER_LINES_PER_DEVICE lines; the rest is counted when its minute is over."""
    from tests.wire_peer import state_key
    proc, port, secret = start_server(tmp_path / "state")
    try:
        key = state_key(tmp_path / "state", secret)
        for _ in range(10):
            peer = WirePeer(port)
            peer.handshake(secret, "flapper", key=key)
            peer.close()
        steady = WirePeer(port)
        steady.handshake(secret, "steady", key=key)
        proc.wait_for(r"device steady joined as")
        lines = [line for line in proc.lines() if "device flapper" in line and ("joined" in line or "left" in line)]
        assert len(lines) == mnedc_server.MEMBER_LINES_PER_DEVICE, lines
    finally:
        proc.stop()


def test_join_and_leave_lines_of_many_devices_are_summarised_with_a_count(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(mnedc_server.time, "monotonic", lambda: clock[0])
    sink = io.StringIO()
    log = mnedc_server.Log("info", stream=sink)
    for number in range(300):
        message = "device d%03d joined" % number
        if log.limited(("member", number), "info", message, burst=6, write=False):
            log.limited(("members",), "info", message, burst=120, summary="joins and leaves")
        clock[0] += 0.1
    clock[0] += 31
    log.flush()
    lines = sink.getvalue().splitlines()
    assert len(lines) == 121 and lines[119].endswith("INFO device d119 joined")
    assert re.search(r"INFO 180 more joins and leaves in the last 61 s, not logged one by one$", lines[120]), lines[120]


def test_sessions_that_once_sent_a_large_frame_give_their_buffers_back_when_quiet(tmp_path):
    """Issue #14: each connection that once started a large frame kept ~320 KiB of receive
    buffer for life (200 sessions: 64 MB). 150 members each send one 60 KB frame, then only
    answer pings: the relay's buffers go back to 4 KiB each, and its memory with them (a large
    buffer is a mapping of its own, resident only where a frame touched it)."""
    from tests.test_access import rss_kb
    from tests.wire_peer import state_key
    proc, port, secret = start_server(tmp_path / "state")
    control = str(tmp_path / "server.sock")
    members = []
    try:
        key = state_key(tmp_path / "state", secret)
        before = rss_kb(proc.pid)
        for number in range(150):
            member = WirePeer(port)
            member.handshake(secret, "big-%03d" % number, mnedc_server.HELLO_STREAMS, key=key)
            member.send_frame(mnedc_server.FRAME_DATA, mnedc_server.encode_data(1, bytes(60000)))   # no such stream
            members.append(member)
        status = json.loads(run(SERVER, "--control", control, "status", "--json").stdout)
        grown = [d["receive_buffer_bytes"] for d in status["devices"]]
        assert len(grown) == 150 and min(grown) > 300000, grown[:5]
        peak = rss_kb(proc.pid)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:          # quiet for IDLE_SHRINK_S: the next tick shrinks
            status = json.loads(run(SERVER, "--control", control, "status", "--json").stdout)
            if all(d["receive_buffer_bytes"] == mnedc_server.FrameReader.SMALL_BYTES for d in status["devices"]):
                break
            time.sleep(0.5)
        sizes = sorted(set(d["receive_buffer_bytes"] for d in status["devices"]))
        assert sizes == [mnedc_server.FrameReader.SMALL_BYTES] and len(status["devices"]) == 150, sizes
        after = rss_kb(proc.pid)
        print("relay RSS %d kB, %d kB with 150 large buffers, %d kB once they shrank" % (before, peak, after))
        assert peak - before > 150 * 55 and after - before < (peak - before) / 3, (before, peak, after)
    finally:
        for member in members:
            member.close()
        proc.stop()
