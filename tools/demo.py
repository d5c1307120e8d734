"""The one-machine MNEDC demo: a multi-level-NAT network in namespaces, the real scripts on it.

Run it through ../demo.sh (as root). It builds the topology, starts the relay and three TUN
clients, shows that the server cannot reach the devices but every device reaches every other
by virtual IP, moves a file from the device behind two NATs, and removes everything again.
"""

import hashlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.nettopo import Topology, have_netns_support  # noqa: E402
from tests.relaynet import RelayNetwork  # noqa: E402

PICTURE = r"""
        main NAT                          lower NATs
   +----------------+
   | srv  relay     |<--- natA (NAT) <--- a   198.51.100.2
   | 192.0.2.100    |
   | virtual .1     |<--- natB (NAT) <--- b   198.51.100.66
   +----------------+          ^
                               +---- natC (NAT) <--- c   203.0.113.2   (behind two NATs)

   Devices can open connections up to srv; srv cannot open any to them.
"""


def say(text=""):
    print(text, flush=True)


def show_unreachable(topo):
    say("The server cannot reach the devices' real addresses (that is the problem):")
    for name in topo.clients:
        ok = topo.ping("srv", topo.addr(name), timeout_s=1)
        say("  srv -> %-3s %-15s %s" % (name, topo.addr(name), "reachable?!" if ok else "unreachable"))
    say()


def show_pings(topo, net):
    addresses = dict(net.vip, srv=net.server_vip)
    say("Every device pings every other by virtual IP, through the relay:")
    failures = 0
    for source in ["srv"] + topo.clients:
        for target in ["srv"] + topo.clients:
            if source == target:
                continue
            result = topo.run(source, ["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2",
                                       addresses[target]], check=False, timeout=15)
            rtt = [l for l in result.stdout.splitlines() if "min/avg/max" in l]
            summary = ("avg %s ms" % rtt[0].split("=")[1].split("/")[1]) if rtt else "FAILED"
            failures += result.returncode != 0
            say("  %-3s -> %-3s %-13s %s" % (source, target, addresses[target], summary))
    say()
    return failures


def show_transfer(topo, net, workdir):
    original = os.path.join(workdir, "file.bin")
    received = os.path.join(workdir, "received.bin")
    with open(original, "wb") as sink:
        sink.write(os.urandom(10 * 1000 * 1000))
    listener = topo.spawn("a", ["sh", "-c", "exec nc -l 5001 > %s" % received])
    deadline = time.monotonic() + 10
    while not topo.run("a", ["ss", "-Hltn", "sport = :5001"]).stdout.strip():
        if time.monotonic() > deadline:
            raise SystemExit("nc did not start listening on a")
        time.sleep(0.05)
    started = time.monotonic()
    topo.run("c", ["sh", "-c", "nc -N %s 5001 < %s" % (net.vip["a"], original)], timeout=60)
    listener.wait(30)
    seconds = time.monotonic() - started
    same = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (original, received)]
    say("10 MB from c (two NATs deep) to a (another NAT) over TCP through the relay:")
    say("  %.2f s, %.0f Mbit/s, sha256 %s" % (seconds, 80 / seconds, "identical" if same[0] == same[1] else "DIFFERENT"))
    say()
    return same[0] == same[1]


def main():
    ok, why = have_netns_support()
    if not ok:
        say("The demo needs root, ip netns, iptables and /dev/net/tun: %s" % why)
        return 2
    say(PICTURE)
    with tempfile.TemporaryDirectory(prefix="mnedc-demo-") as workdir, Topology() as topo:
        say("Built namespaces %s* with real NAT (iptables MASQUERADE)." % topo.prefix)
        show_unreachable(topo)
        net = RelayNetwork(topo, workdir).start()
        say("Started mnedc_server.py in srv and mnedc_client.py in a, b and c:")
        for name in topo.clients:
            say("  %s joined as %s" % (name, net.vip[name]))
        say("  srv itself is %s" % net.server_vip)
        say("  every link is TLS (the default): the relay made its own certificate, and each")
        say("  client accepts only it, by its pin %s" % net.pin)
        say()
        failures = show_pings(topo, net)
        transferred = show_transfer(topo, net, workdir)
        say("Server log:")
        for line in net.server.lines():
            if "joined" in line or "listening" in line:
                say("  " + line)
        say()
    say("Cleaned up: processes stopped, namespaces deleted.")
    if failures or not transferred:
        say("DEMO FAILED: %d ping pairs failed" % failures)
        return 1
    say("Every device reached every other. Demo complete.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
