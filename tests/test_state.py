"""Server state: subnets, the persistent lease table, and routing decisions."""

import io
import json
import socket
import struct

import pytest

import mnedc_server as server
from tests.wire_peer import ipv4_packet


def quiet_log():
    return server.Log("error", stream=io.StringIO())


@pytest.mark.parametrize("text, expected", [
    ("198.18.0.0/24", (0xC6120000, 24)), ("198.18.0.0/16", (0xC6120000, 16)),
    (" 198.18.4.8/29 ", (0xC6120408, 29)),
])
def test_parse_subnet_accepts(text, expected):
    assert server.parse_subnet(text) == expected


@pytest.mark.parametrize("text, complaint", [
    ("198.18.0.1/24", "did you mean 198.18.0.0/24"), ("198.18.0.0/30", "/16 to /29"),
    ("198.18.0.0/15", "/16 to /29"), ("198.18.0.0", "not a subnet"), ("banana/24", "not a subnet"),
    ("198.18.0/24", "/16 to /29"),
])
def test_parse_subnet_refuses_with_a_reason(text, complaint):
    with pytest.raises(ValueError, match=complaint):
        server.parse_subnet(text)


def table(tmp_path, subnet="198.18.0.0/24", trial_s=0):
    """A lease table; trial_s=0: leases long-lived at once (tests/test_operations.py tries trials live)."""
    return server.LeaseTable(server.parse_subnet(subnet), str(tmp_path / "leases.json"), quiet_log(), trial_s)


def test_a_full_pool_takes_a_gone_trial_lease_first_and_a_reload_keeps_the_trial(tmp_path):
    leases = table(tmp_path, "198.18.0.0/29", trial_s=300)
    for n in range(5):
        leases.lease_for("d%d" % n, set(), 0.0)
    stayed = type("Member", (), {"connected_since": 0.0})
    assert sorted(leases.expire_trials({"d0": stayed}, 400.0)) == ["d1", "d2", "d3", "d4"]   # d0 stayed: proven
    assert "trial" not in leases.leases["d0"] and leases.on_trial == set()
    for n in range(1, 5):
        leases.lease_for("e%d" % n, set(), 500.0)
    reloaded = table(tmp_path, "198.18.0.0/29", trial_s=300)
    reloaded.load()
    assert reloaded.on_trial == {"e1", "e2", "e3", "e4"}
    taken = reloaded.lease_for("newcomer", {"e1"}, 501.0)          # e1 is online: e2 goes, however fresh
    assert socket.inet_ntoa(taken) == "198.18.0.4" and "e2" not in reloaded.leases and "d0" in reloaded.leases


def test_leases_are_sticky_and_survive_a_reload(tmp_path):
    leases = table(tmp_path)
    first = leases.lease_for("alpha", set(), 1000.0)
    second = leases.lease_for("beta", set(), 1000.0)
    assert (socket.inet_ntoa(first), socket.inet_ntoa(second)) == ("198.18.0.2", "198.18.0.3")
    assert leases.lease_for("alpha", set(), 2000.0) == first
    reloaded = table(tmp_path)
    reloaded.load()                         # no save() call: lease_for saved on allocation
    assert reloaded.lease_for("beta", set(), 3000.0) == second
    assert socket.inet_ntoa(reloaded.lease_for("gamma", set(), 3000.0)) == "198.18.0.4"


def test_the_pool_excludes_server_and_broadcast_and_runs_out(tmp_path):
    leases = table(tmp_path, "198.18.0.0/29")
    got = [socket.inet_ntoa(leases.lease_for("d%d" % n, set(), 0.0)) for n in range(5)]
    assert got == ["198.18.0.%d" % n for n in range(2, 7)]
    assert leases.server_address == socket.inet_aton("198.18.0.1")
    with pytest.raises(server.PoolExhausted, match="all 5 client addresses"):
        leases.lease_for("late", set(), 1.0)


def test_only_long_offline_devices_lose_their_address_to_a_newcomer(tmp_path):
    leases = table(tmp_path, "198.18.0.0/29")
    for n in range(5):
        leases.lease_for("d%d" % n, set(), 0.0)
    month = 30 * 24 * 3600.0
    leases.touch("d0", month - 3600)        # d0 seen an hour ago: kept
    online = {"d1"}                         # d1 connected now: kept whatever its age
    taken = leases.lease_for("newcomer", online, month)
    assert socket.inet_ntoa(taken) == "198.18.0.4"     # d2, the oldest of d2..d4
    assert "d2" not in leases.leases and "d0" in leases.leases


def test_a_corrupt_lease_file_is_kept_aside_not_fatal(tmp_path):
    (tmp_path / "leases.json").write_text("{not json")
    leases = table(tmp_path)
    leases.load()
    assert leases.leases == {}
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]


def test_leases_outside_a_changed_subnet_are_dropped(tmp_path):
    (tmp_path / "leases.json").write_text(json.dumps({"leases": {
        "in": {"address": "198.18.0.9", "last_seen": 1}, "out": {"address": "198.19.0.9", "last_seen": 1},
        "bad id!": {"address": "198.18.0.10"}, "dup": {"address": "198.18.0.9"}}}))
    leases = table(tmp_path)
    leases.load()
    assert sorted(leases.leases) == ["in"]


class Member:
    def __init__(self, address, device_id):
        self.address, self.device_id, self.addresses6 = socket.inet_aton(address), device_id, ()


def test_route_decisions():
    routes = server.RouteTable()
    alice, bob = Member("198.18.0.2", "alice"), Member("198.18.0.3", "bob")
    routes.add(alice)
    routes.add(bob)
    assert routes.decide(ipv4_packet("198.18.0.2", "198.18.0.3"), alice) == (bob, None)
    assert routes.decide(ipv4_packet("198.18.0.3", "198.18.0.3"), alice) == (None, "spoofed source")
    assert routes.decide(ipv4_packet("198.18.0.2", "198.18.0.99"), alice) == (None, "unknown destination")
    assert routes.decide(ipv4_packet("198.18.0.2", "198.18.0.255"), alice) == (None, "unknown destination")


def test_a_stale_member_never_removes_its_successor():
    routes = server.RouteTable()
    old, new = Member("198.18.0.2", "alice"), Member("198.18.0.2", "alice")
    routes.add(old)
    routes.add(new)
    routes.remove(old)
    assert routes.by_address[new.address] is new and routes.by_device["alice"] is new


def test_a_lease_survives_a_failed_save_and_is_saved_later(tmp_path):
    leases = server.LeaseTable(server.parse_subnet("198.18.0.0/24"), str(tmp_path / "missing" / "leases.json"),
                               quiet_log())
    address = leases.lease_for("unlucky", set(), 1.0)          # its directory does not exist yet
    assert socket.inet_ntoa(address) == "198.18.0.2" and leases.save_failed
    (tmp_path / "missing").mkdir()
    leases.save()
    assert not leases.save_failed and "unlucky" in (tmp_path / "missing" / "leases.json").read_text()


def test_the_journal_is_folded_into_the_table_once_long_and_a_repeated_line_changes_nothing(tmp_path):
    churn = table(tmp_path, "198.18.0.0/20", trial_s=1)
    for n in range(300):
        churn.lease_for("minted-%d" % n, set(), 1.0)
    journal = tmp_path / "leases.json.journal"
    churn.sync_journal()                            # 300 lines for 300 leases: O(1) each, no fold yet
    assert len(journal.read_text().splitlines()) == 300 and not (tmp_path / "leases.json").exists()
    assert len(churn.expire_trials({}, 10.0)) == 300
    churn.sync_journal()                            # 600 lines, no lease: folded into the table, emptied
    assert journal.read_text() == "" and json.loads((tmp_path / "leases.json").read_text())["leases"] == {}
    leases = table(tmp_path, "198.18.0.0/20")
    leases.load()
    addresses = {n: leases.lease_for("d%d" % n, set(), 1.0) for n in range(3)}
    lines = journal.read_text()
    journal.write_text(lines + lines)               # a crash between a fold and the emptying, twice over
    reloaded = table(tmp_path, "198.18.0.0/20")
    reloaded.load()
    assert all(reloaded.lease_for("d%d" % n, set(), 3.0) == addresses[n] for n in range(3))
    assert len(reloaded.leases) == 3 and journal.read_text() == ""      # folded at load


def test_the_policy_port_of_an_ipv6_packet_lies_past_its_extension_headers():
    def packet(*headers, port=22):
        """IPv6 + headers [(type, body of 6 bytes)] + TCP header to port."""
        chain = [kind for kind, _ in headers] + [6]
        body = b"".join(bytes([chain[n + 1], 0]) + extra for n, (_, extra) in enumerate(headers))
        tcp = struct.pack("!HH", 40000, port) + bytes(16)
        return bytes([0x60, 0, 0, 0]) + struct.pack("!HBB", len(body) + len(tcp), chain[0], 64) + bytes(32) + body + tcp
    pad = bytes([1, 4, 0, 0, 0, 0])
    assert server.destination_port(packet(), 0) == 22
    assert server.destination_port(packet((0, pad)), 0) == 22                     # hop-by-hop
    assert server.destination_port(packet((60, pad), (43, pad)), 0) == 22          # destination options, routing
    assert server.destination_port(packet((44, bytes(6))), 0) == 22                # the first fragment
    assert server.destination_port(packet((44, b"\x00\x08" + bytes(4))), 0) is None    # a later one: no port
    assert server.destination_port(packet((60, pad))[:-20], 0) is None               # cut short
