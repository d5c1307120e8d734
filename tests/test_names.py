"""Service names belong to their device (issue #14): a member that squats a name, an address or
a device_id attacks a live relay here, with real `listen`/`connect` processes and a member that
speaks the protocol itself, and never gets a caller's bytes."""

import json
import os
import subprocess
import sys
import time

import pytest

import mnedc_client as wire
from tests.streamnet import StreamNet
from tests.test_streams import net, tcp  # noqa: F401 (the fixtures: a loopback relay, TCP ends)
from tests.wire_peer import SERVER, Refused


def banner(text):
    """A TCP service that greets with text, then echoes: which one answered is in the reply."""
    def serve(sock, index):
        sock.sendall(text)
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return received
            received += data
            sock.sendall(data)
    return serve


def listen_frame(session, port, name):
    """What the relay answers one LISTEN with: (frame name, port, code or None, text)."""
    session.send_frame(wire.FRAME_LISTEN, wire.encode_listen(port, name))
    frame_type, payload = session.recv_frame()
    if frame_type == wire.FRAME_LISTEN_REFUSED:
        return ("LISTEN_REFUSED",) + wire.decode_listen_refused(payload)
    assert frame_type == wire.FRAME_LISTENING, wire.FRAME_NAMES.get(frame_type)
    return ("LISTENING", wire.decode_listen(payload)[0], None, "")


def control(net, *command):
    return subprocess.run([sys.executable, SERVER, "--control", os.path.join(net.workdir, "server.sock")]
                          + list(command), capture_output=True, text=True, timeout=30)


def test_a_name_stays_its_owners_while_it_is_away_and_a_squatter_never_gets_a_callers_bytes(net, tcp):
    real, fake = tcp(banner(b"REAL ")), tcp(banner(b"FAKE "))
    owner = net.listen("kitchen-pi", "--forward=%d" % real.port, "--service=pi-ssh", "22")
    owner.stop()                                    # the owner is away: the attack of #14
    squatter = net.spawn("mallory", "listen", "--forward=%d" % fake.port, "--service=pi-ssh", "2222")
    squatter.wait_for(r"the relay refused virtual port 2222 as service pi-ssh: name taken: service name "
                      r"pi-ssh is device kitchen-pi's; the operator frees it with: mnedc_server.py forget-name pi-ssh")
    assert squatter.wait(15) == 1
    member = net.peer()                             # one that speaks the protocol itself
    member.handshake(net.secret, "mallory-2", wire.HELLO_STREAMS)
    assert listen_frame(member, 2222, "pi-ssh")[:3] == ("LISTEN_REFUSED", 2222, wire.ERROR_NAME_TAKEN)
    assert listen_frame(member, 2223, "mallory-web")[0] == "LISTENING"     # refused that LISTEN, not the session
    net.server.wait_for(r"refused device mallory-2 the LISTEN on port 2222 as pi-ssh: service name pi-ssh is "
                        r"device kitchen-pi's")
    member.close()

    net.server.stop()                               # the claim is on disk: a restart keeps it
    net.start_server()
    net.server.wait_for(r"2 service names claimed")
    again = net.run("mallory", "listen", "--service=pi-ssh", "2222", timeout=30)
    assert again.returncode == 1 and "pi-ssh is device kitchen-pi's" in again.stderr, again.stderr
    assert net.run("caller", "connect", "pi-ssh", "22", input=b"x").returncode == 1     # nobody offers it now

    net.listen("kitchen-pi", "--forward=%d" % real.port, "--service=pi-ssh", "22")
    called = net.run("caller", "connect", "pi-ssh", input=b"password")
    assert called.returncode == 0, called.stderr
    assert called.stdout == b"REAL password"
    assert "Connection with pi-ssh:service established, answered by kitchen-pi" in called.stderr
    assert real.wait_results(1)[0] == b"password"
    assert fake.count == 0                          # the squatter's end never saw a connection


def test_names_that_read_as_addresses_or_device_ids_are_refused_and_device_ids_win(net, tcp):
    target = tcp(banner(b"CAM "))
    camera = net.listen("kitchen-pi", "--forward=%d" % target.port, "80")     # a stream-only device
    camera.stop()
    member = net.peer()
    member.handshake(net.secret, "mallory", wire.HELLO_STREAMS)
    for port, name, why in ((1, "kitchen-pi", "service name kitchen-pi is a device_id"),
                            (2, "mallory", "service name mallory is a device_id"),
                            (3, "198.18.0.9", "service name 198.18.0.9 reads as an address"),
                            (4, "0x7f.1", "reads as an address"), (5, "3232235777", "reads as an address")):
        answer = listen_frame(member, port, name)
        assert answer[:3] == ("LISTEN_REFUSED", port, wire.ERROR_NAME_TAKEN) and why in answer[3], answer
    # the offline device stays itself: the caller is told it is away, never sent to a name
    called = net.run("caller", "connect", "kitchen-pi", "80", input=b"x")
    assert called.returncode == 1 and "kitchen-pi is not connected to the relay" in called.stderr, called.stderr
    assert target.count == 0
    # a name taken first, then a device_id that would shadow it: the device is refused
    assert listen_frame(member, 6, "garage-door")[0] == "LISTENING"
    with pytest.raises(Refused) as refused:
        net.peer().handshake(net.secret, "garage-door", wire.HELLO_STREAMS)
    assert refused.value.code == wire.ERROR_NAME_TAKEN
    assert "device_id garage-door is a service name of device mallory" in refused.value.text
    joined = net.run("garage-door", "services")
    assert joined.returncode == 1 and "name taken: device_id garage-door is a service name" in joined.stderr
    member.close()


def test_connect_can_pin_whose_service_it_wants(net, tcp):
    real = tcp(banner(b"REAL "))
    net.listen("kitchen-pi", "--forward=%d" % real.port, "--service=pi-ssh", "22")
    pinned = net.run("caller", "connect", "kitchen-pi/pi-ssh", input=b"hi")
    assert pinned.returncode == 0 and pinned.stdout == b"REAL hi", pinned.stderr
    assert "answered by kitchen-pi" in pinned.stderr
    wrong = net.run("caller", "connect", "mallory/pi-ssh", input=b"hi")
    assert wrong.returncode == 1 and wrong.stdout == b""
    assert "mallory has no service called pi-ssh (that name is kitchen-pi's)" in wrong.stderr, wrong.stderr
    bad = net.run("caller", "connect", "kitchen-pi/no/such", input=b"")
    assert bad.returncode == 2 and "service name" in bad.stderr
    assert real.count == 1


def test_the_policy_says_who_may_offer_which_names_and_the_operator_frees_them(tmp_path, tcp):
    policy = tmp_path / "policy"
    policy.write_text("group trusted = kitchen-pi garage\n"
                      "name pi-ssh,pi-web by kitchen-pi\n"
                      "name * by @trusted\n")
    net = StreamNet(tmp_path, server_lines=["policy_file = %s" % policy])
    try:
        net.server.wait_for(r"WARNING policy_file names garage, kitchen-pi, which only the network secret")
        target = tcp(banner(b"OK "))
        for device_id, name in (("garage", "pi-ssh"), ("mallory", "mallory-web")):
            refused = net.run(device_id, "listen", "--service=%s" % name, "80", timeout=30)
            assert refused.returncode == 1, refused.stderr
            assert "the relay's policy does not let %s offer the service name %s" % (device_id, name) in refused.stderr
        garage = net.listen("garage", "--forward=%d" % target.port, "--service=garage-web", "80")
        busy = control(net, "forget-name", "garage-web")
        assert busy.returncode == 1 and "device garage offers garage-web now" in busy.stderr, busy.stderr
        garage.stop()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:          # until the relay has seen the session go
            status = json.loads(control(net, "status", "--json").stdout)
            if not status["service_names"][0]["offered"]:
                break
            time.sleep(0.1)
        assert status["service_names"] == [{"name": "garage-web", "device_id": "garage", "offered": False}]
        freed = control(net, "forget-name", "garage-web")
        assert freed.returncode == 0 and "freed the service name garage-web (it was garage's)" in freed.stdout
        net.listen("kitchen-pi", "--forward=%d" % target.port, "--service=garage-web", "81").stop()
        net.listen("kitchen-pi", "--forward=%d" % target.port, "--service=pi-web", "82").stop()
        for _ in range(100):                        # until the relay has seen its sessions go
            forgot = control(net, "forget", "kitchen-pi")
            if "is connected" not in forgot.stderr:
                break
            time.sleep(0.1)
        assert forgot.returncode == 0 and "forgot kitchen-pi; garage-web, pi-web are free again" in forgot.stdout, \
            forgot.stdout + forgot.stderr
        assert json.loads(control(net, "status", "--json").stdout)["service_names"] == []
        assert control(net, "forget-name", "pi-web").returncode == 1
    finally:
        net.stop()


def test_minted_device_ids_cannot_fill_the_name_table_from_one_address(tmp_path):
    """Stream sessions take no lease, so minting device_ids is free: new service names (and
    the listener records that keep offline device_ids known) are limited per source address
    and minute like new leases; another address has its own count."""
    net = StreamNet(tmp_path, server_lines=["max_new_leases_per_minute = 5"])
    try:
        answers = []
        for number in range(7):
            member = net.peer()
            member.handshake(net.secret, "minted-%d" % number, wire.HELLO_STREAMS)
            answers.append(listen_frame(member, 80, "grab-%d" % number))
            member.close()
        assert [a[0] for a in answers[:2]] == ["LISTENING"] * 2       # 2 names and 2 listeners: 4 of 5
        refused = [a for a in answers if a[0] == "LISTEN_REFUSED"]
        assert refused and all(a[2] == wire.ERROR_LIMIT and "more new service names from 127.0.0.1" in a[3]
                               for a in refused), answers
        status = json.loads(control(net, "status", "--json").stdout)
        assert len(status["service_names"]) <= 3
        elsewhere = net.peer(source="127.0.0.2")
        elsewhere.handshake(net.secret, "elsewhere", wire.HELLO_STREAMS)
        assert listen_frame(elsewhere, 80, "elsewhere-web")[0] == "LISTENING"
        elsewhere.close()
    finally:
        net.stop()
