"""Throw-away multi-level-NAT network topologies built from Linux network namespaces.

End-to-end tests, the demo script and the benchmark run *real* MNEDC processes
inside these namespaces.  Everything is created under a per-run name prefix
(``mnt<6 hex>-``) so parallel runs never collide and leftovers are easy to spot
(``ip netns list | grep ^mnt``).  Only documentation address space (TEST-NET-1/2/3)
is used and no namespace is connected to the host, so no packet ever leaves.

Layout "nested" (default)::

                         srv   lo: 192.0.2.100/32  (topo.server_ip)
                  dnA 192.0.2.1/30     dnB 192.0.2.5/30      no default route,
                        |                    |               ip_forward=0
                  wan0 192.0.2.2/30    wan0 192.0.2.6/30
                 natA (MASQ wan0)     natB (MASQ wan0)
          lan0 198.51.100.1/26        br0 198.51.100.65/26  (bridge: lan0 + lan1)
                  |                      |             |
         up0 198.51.100.2/26    up0 198.51.100.66/26   wan0 198.51.100.67/26
                  a                      b            natC (MASQ wan0)
                                                  lan0 203.0.113.1/24
                                                       |
                                                  up0 203.0.113.2/24
                                                       c

* ``a`` is behind one NAT (natA), ``b`` behind one NAT (natB), ``c`` behind two
  NATs (natC, then natB).  natB's LAN is a real shared segment (a bridge), so
  ``b`` and natC's WAN side are neighbours, as in a home network with a second
  router plugged into it.
* Routers and clients use a default route towards srv (which also covers
  192.0.2.100).  srv only knows its connected /30s and does not forward, so it
  cannot reach any client address; it sees ``a`` as 192.0.2.2 and both ``b``
  and ``c`` as 192.0.2.6 (``topo.public_addr(name)``).

Layout "flat" (``Topology(layout="flat", clients=N)``)::

        srv  lo: 192.0.2.100/32
        dn1 192.0.2.1/30   dn2 192.0.2.5/30   ...   (one /30 per client)
          |                  |
        up0 192.0.2.2/30   up0 192.0.2.6/30
          c1                 c2             ...

No NAT; each client only has its /30 plus a host route to 192.0.2.100.  The
/30 that would contain 192.0.2.100 is skipped, so up to 62 clients fit.

Processes are started with :meth:`Topology.spawn`; ``ip netns exec`` execs the
program in place, so ``Proc.pid`` is the program's own PID.  Teardown (also run
when ``build()`` fails half-way, or when the ``with`` body raises) stops every
spawned process (SIGTERM, then SIGKILL), kills anything else still living in
our namespaces, deletes the namespaces and verifies nothing with the prefix is
left.  It never raises and may be called repeatedly.

Standard library only; runs on Python 3.7+.
"""

import atexit
import collections
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time

__all__ = [
    "Topology",
    "Proc",
    "CommandError",
    "have_netns_support",
    "leftover_namespaces",
    "SERVER_IP",
]

log = logging.getLogger("mnedc.nettopo")

SERVER_IP = "192.0.2.100"
# The only address space any topology may use (RFC 5737 documentation ranges).
TEST_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)
IFNAMSIZ = 15  # kernel limit for interface names (excluding NUL)
CMD_TIMEOUT = 10  # seconds; bound for every setup/teardown command
# ... but `ip netns add` waits for the kernel's lock on network namespaces, which the background
# teardown of namespaces deleted earlier can hold for seconds on a busy machine (seen: > 10 s)
NETNS_ADD_TIMEOUT = 60
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class CommandError(subprocess.CalledProcessError):
    """A command exited non-zero; unlike CalledProcessError, str() shows its output."""

    def __str__(self):
        return "command %r exited with %s\n--- stdout ---\n%s\n--- stderr ---\n%s" % (
            self.cmd, self.returncode, (self.stdout or "").rstrip(),
            (self.stderr or "").rstrip())


def _run(argv, timeout=CMD_TIMEOUT, check=True, **kw):
    """subprocess.run with captured text output, a timeout, and a useful error."""
    if "input" not in kw:  # run() refuses stdin= together with input=
        kw.setdefault("stdin", subprocess.DEVNULL)
    res = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and res.returncode != 0:
        raise CommandError(res.returncode, argv, res.stdout, res.stderr)
    return res


def _new_prefix():
    return "mnt%s-" % secrets.token_hex(3)


def list_namespaces():
    """Names of all named network namespaces (``ip netns list``)."""
    res = _run(["ip", "netns", "list"])
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def leftover_namespaces(prefix):
    """Named network namespaces whose name starts with ``prefix``."""
    return [n for n in list_namespaces() if n.startswith(prefix)]


def have_netns_support():
    """Return ``(ok, reason)``: can this process build topologies here?"""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "must run as root to create network namespaces"
    for tool in ("ip", "iptables", "ping", "sysctl"):
        if shutil.which(tool) is None:
            return False, "%r not found in PATH" % tool
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun is missing"
    scratch = _new_prefix() + "probe"
    try:
        _run(["ip", "netns", "add", scratch])
    except (OSError, subprocess.SubprocessError) as e:
        return False, "cannot create a network namespace: %s" % e
    try:
        # The nat table must work inside a namespace (nf_tables/legacy modules).
        _run(["ip", "netns", "exec", scratch, "iptables", "-w", "5", "-t", "nat", "-S"])
        _run(["ip", "-n", scratch, "link", "add", "p0", "type", "veth",
              "peer", "name", "p1"])
    except (OSError, subprocess.SubprocessError) as e:
        return False, "namespace probe failed: %s" % e
    finally:
        try:
            _run(["ip", "netns", "del", scratch])
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("could not delete probe namespace %s: %s", scratch, e)
    return True, "ok"


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

class Proc(object):
    """A long-running process whose merged stdout/stderr is collected live.

    A reader thread appends each output line to an in-memory list (and to
    ``log_path`` if given), so tests can wait for log lines with
    :meth:`wait_for` while the process keeps running.

    ``argv`` is the program's argv; ``cmd`` is what was actually executed
    (``ip netns exec NS`` + argv for namespaced processes).
    """

    def __init__(self, popen, argv, cmd, log_path=None, label=None):
        self._popen = popen
        self.pid = popen.pid
        self.argv = list(argv)
        self.cmd = list(cmd)
        self.stdin = popen.stdin
        self.log_path = log_path
        self.label = label or os.path.basename(str(argv[0]))
        self._lines = []
        self._eof = False
        self._cond = threading.Condition()
        self._log = open(log_path, "w", encoding="utf-8") if log_path else None
        self._reader = threading.Thread(
            target=self._read_output, name="proc-%d-reader" % self.pid
        )
        self._reader.daemon = True  # a stuck pipe must never block interpreter exit
        self._reader.start()

    @classmethod
    def start(cls, argv, env=None, cwd=None, stdin=subprocess.DEVNULL,
              log_path=None, label=None, _cmd_prefix=()):
        """Start ``argv`` (no namespace) with output collection.

        ``env`` replaces the environment, as with Popen.  The process gets its
        own session/process group so teardown can also signal its children.
        """
        cmd = list(_cmd_prefix) + list(argv)
        popen = subprocess.Popen(
            cmd,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # Ctrl-C of the test runner goes to us, not it
        )
        return cls(popen, argv, cmd, log_path=log_path, label=label)

    def __repr__(self):
        return "<Proc %s pid=%d rc=%r>" % (self.label, self.pid, self._popen.returncode)

    # -- output --------------------------------------------------------------

    def _read_output(self):
        try:
            for raw in iter(self._popen.stdout.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
                if self._log:
                    self._log.write(line + "\n")
                    self._log.flush()  # so `tail -f` works during a run
        except (OSError, ValueError):
            pass  # pipe closed under us during stop(); nothing left to read
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()
            try:
                self._popen.stdout.close()  # the reader owns the read end
            except OSError:
                pass
            if self._log:
                try:
                    self._log.close()
                except OSError:
                    pass

    def lines(self):
        """A copy of the output lines received so far."""
        with self._cond:
            return list(self._lines)

    def output(self):
        return "\n".join(self.lines())

    def tail(self, n=40):
        return "\n".join(self.lines()[-n:])

    def wait_for(self, regex, timeout=10, start=0):
        """Wait until an output line with index >= ``start`` matches ``regex``.

        Returns the ``re.Match``.  Raises AssertionError (with the last 40
        output lines) if the deadline passes or the process exits first.
        """
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        deadline = time.monotonic() + timeout
        idx = start
        exited = False
        while True:
            with self._cond:
                while idx < len(self._lines):
                    m = pattern.search(self._lines[idx])
                    idx += 1
                    if m:
                        return m
                remaining = deadline - time.monotonic()
                if self._eof or exited or remaining <= 0:
                    break
                # Short slices: a grandchild may keep the pipe open after the
                # process died, so EOF alone cannot tell us it is gone.
                self._cond.wait(min(remaining, 0.2))
            if self._popen.poll() is not None:
                self._reader.join(0.5)  # drain buffered output, scan once more
                exited = True
        if self._eof or exited:
            # The pipe closes a moment before the exit status is reapable.
            try:
                self._popen.wait(1)
            except subprocess.TimeoutExpired:
                pass
            reason = "output ended, exit code %r" % self._popen.poll()
        else:
            reason = "timed out after %gs" % timeout
        raise AssertionError(
            "%s (pid %d): no output line matching %r (%s)\n--- last output ---\n%s"
            % (self.label, self.pid, pattern.pattern, reason, self.tail(40))
        )

    # -- lifecycle -----------------------------------------------------------

    @property
    def returncode(self):
        return self._popen.poll()

    def alive(self):
        return self._popen.poll() is None

    def send_signal(self, sig):
        """Signal the process itself (not its group); no-op once reaped."""
        if self._popen.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def _signal_group(self, sig):
        # Only while unreaped: until we reap it, the PID (and so the process
        # group id we gave it) cannot be reused by an unrelated process.
        if self._popen.returncode is not None:
            return
        for kill in (os.killpg, os.kill):
            try:
                kill(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def terminate(self):
        """Send SIGTERM to the process and its process group, don't wait."""
        self._signal_group(signal.SIGTERM)

    def wait(self, timeout):
        """Wait for exit and return the exit code; raise TimeoutExpired on timeout."""
        try:
            rc = self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise subprocess.TimeoutExpired(self.cmd, timeout, output=self.tail(40))
        self._reader.join(1.0)  # so lines() is complete once wait() returns
        self._close_stdin()
        return rc

    def _close_stdin(self):
        if self._popen.stdin is not None:
            try:
                self._popen.stdin.close()
            except OSError:
                pass  # e.g. BrokenPipe flushing to a dead process

    def stop(self, timeout=3):
        """SIGTERM, wait up to ``timeout``, SIGKILL, reap.  Returns the exit code.

        Safe to call repeatedly; never raises for an already-dead process.
        """
        if self._popen.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._popen.wait(max(0.0, timeout))
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                try:
                    self._popen.wait(5)
                except subprocess.TimeoutExpired:
                    log.error("pid %d survived SIGKILL (uninterruptible?)", self.pid)
        self._reader.join(1.0)
        self._close_stdin()
        return self._popen.returncode


# --------------------------------------------------------------------------
# Topology plans: pure data describing what to build
# --------------------------------------------------------------------------

Veth = collections.namedtuple("Veth", "ns1 if1 ns2 if2")
Addr = collections.namedtuple("Addr", "ns dev cidr")
Route = collections.namedtuple("Route", "ns dest via")
Bridge = collections.namedtuple("Bridge", "ns name ports")


class Plan(object):
    """Everything a layout needs, as data, so it can be checked without root."""

    def __init__(self):
        self.names = []  # logical namespace names, in creation order
        self.clients = []
        self.routers = []  # namespaces with ip_forward=1
        self.veths = []
        self.bridges = []
        self.addrs = []
        self.routes = []
        self.masquerade = []  # (ns, out_dev)
        self.primary = {}  # logical name -> its own primary address
        self.public = {}  # logical name -> source address srv sees from it

    def all_ips(self):
        out = [ipaddress.ip_interface(a.cidr).ip for a in self.addrs]
        out += [ipaddress.ip_address(r.via) for r in self.routes if r.via]
        return out


def _cidr_ip(cidr):
    return str(ipaddress.ip_interface(cidr).ip)


def nested_plan():
    """The default layout: clients behind one and two levels of NAT."""
    p = Plan()
    p.names = ["srv", "natA", "a", "natB", "b", "natC", "c"]
    p.clients = ["a", "b", "c"]
    p.routers = ["natA", "natB", "natC"]
    p.veths = [
        Veth("srv", "dnA", "natA", "wan0"),
        Veth("srv", "dnB", "natB", "wan0"),
        Veth("natA", "lan0", "a", "up0"),
        Veth("natB", "lan0", "b", "up0"),
        Veth("natB", "lan1", "natC", "wan0"),
        Veth("natC", "lan0", "c", "up0"),
    ]
    # natB's LAN has three members (natB, b, natC), so it is a real bridge.
    p.bridges = [Bridge("natB", "br0", ["lan0", "lan1"])]
    p.addrs = [
        Addr("srv", "lo", SERVER_IP + "/32"),
        Addr("srv", "dnA", "192.0.2.1/30"),
        Addr("natA", "wan0", "192.0.2.2/30"),
        Addr("srv", "dnB", "192.0.2.5/30"),
        Addr("natB", "wan0", "192.0.2.6/30"),
        Addr("natA", "lan0", "198.51.100.1/26"),
        Addr("a", "up0", "198.51.100.2/26"),
        Addr("natB", "br0", "198.51.100.65/26"),
        Addr("b", "up0", "198.51.100.66/26"),
        Addr("natC", "wan0", "198.51.100.67/26"),
        Addr("natC", "lan0", "203.0.113.1/24"),
        Addr("c", "up0", "203.0.113.2/24"),
    ]
    # srv gets no routes beyond its connected /30s: it must not reach clients.
    p.routes = [
        Route("natA", "default", "192.0.2.1"),
        Route("natB", "default", "192.0.2.5"),
        Route("natC", "default", "198.51.100.65"),
        Route("a", "default", "198.51.100.1"),
        Route("b", "default", "198.51.100.65"),
        Route("c", "default", "203.0.113.1"),
    ]
    p.masquerade = [("natA", "wan0"), ("natB", "wan0"), ("natC", "wan0")]
    p.primary = {
        "srv": SERVER_IP,
        "natA": "192.0.2.2",
        "natB": "192.0.2.6",
        "natC": "198.51.100.67",
        "a": "198.51.100.2",
        "b": "198.51.100.66",
        "c": "203.0.113.2",
    }
    p.public = {"srv": SERVER_IP, "natA": "192.0.2.2", "natB": "192.0.2.6",
                "natC": "192.0.2.6", "a": "192.0.2.2", "b": "192.0.2.6",
                "c": "192.0.2.6"}
    return p


def flat_plan(clients):
    """srv plus N directly attached clients, one /30 each, no NAT."""
    server = ipaddress.ip_address(SERVER_IP)
    blocks = [b for b in ipaddress.ip_network("192.0.2.0/24").subnets(new_prefix=30)
              if server not in b]
    if not 1 <= clients <= len(blocks):
        raise ValueError("flat layout supports 1..%d clients, not %r"
                         % (len(blocks), clients))
    p = Plan()
    p.names = ["srv"]
    p.addrs = [Addr("srv", "lo", SERVER_IP + "/32")]
    p.primary = {"srv": SERVER_IP}
    p.public = {"srv": SERVER_IP}
    for i in range(1, clients + 1):
        name = "c%d" % i
        hosts = list(blocks[i - 1].hosts())
        srv_ip, cli_ip = str(hosts[0]), str(hosts[1])
        p.names.append(name)
        p.clients.append(name)
        p.veths.append(Veth("srv", "dn%d" % i, name, "up0"))
        p.addrs.append(Addr("srv", "dn%d" % i, srv_ip + "/30"))
        p.addrs.append(Addr(name, "up0", cli_ip + "/30"))
        p.routes.append(Route(name, SERVER_IP + "/32", srv_ip))
        p.primary[name] = cli_ip
        p.public[name] = cli_ip
    return p


def validate_plan(plan):
    """Raise ValueError if a plan breaks the address or naming rules."""
    for ip in plan.all_ips():
        if not any(ip in net for net in TEST_NETS):
            raise ValueError("%s is outside the TEST-NET ranges" % ip)
    for v in plan.veths:
        for ifname in (v.if1, v.if2):
            if len(ifname) > IFNAMSIZ:
                raise ValueError("interface name %r is too long" % ifname)
    for ns in [v.ns1 for v in plan.veths] + [v.ns2 for v in plan.veths]:
        if ns not in plan.names:
            raise ValueError("veth refers to unknown namespace %r" % ns)


# --------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------

_live_topologies = set()  # safety net for atexit; normally emptied by teardown


@atexit.register
def _teardown_live_topologies():
    for topo in list(_live_topologies):
        topo.teardown()


NETNS_ETC = "/etc/netns"     # ip-netns(8): per-namespace files bind-mounted over /etc


class Topology(object):
    """A namespace topology; use as a context manager.

    ``Topology()`` only plans; ``build()`` (or entering ``with``) creates it.
    Process logs live in ``topo.log_dir``; they are deleted at teardown
    unless the ``with`` body raised or ``MNEDC_KEEP_LOGS=1`` is set.
    """

    LAYOUTS = ("nested", "flat")

    def __init__(self, layout="nested", clients=3, prefix=None):
        if layout == "nested":
            if clients not in (None, 3):
                raise ValueError("the nested layout always has 3 clients (a, b, c)")
            plan = nested_plan()
        elif layout == "flat":
            plan = flat_plan(clients)
        else:
            raise ValueError("unknown layout %r (choose from %s)" % (layout, self.LAYOUTS))
        validate_plan(plan)
        prefix = _new_prefix() if prefix is None else prefix
        if not _PREFIX_RE.match(prefix):
            raise ValueError("bad namespace prefix %r" % prefix)
        self.layout = layout
        self.plan = plan
        self.prefix = prefix
        self.names = list(plan.names)
        self.clients = list(plan.clients)
        self.routers = list(plan.routers)
        self.server_ip = SERVER_IP
        self.log_dir = None
        self.teardown_errors = []  # what went wrong during the last teardown
        self._created = []  # full namespace names, in creation order
        self._procs = []
        self._lock = threading.Lock()
        self._built = False

    def __repr__(self):
        return "<Topology %s prefix=%s built=%s>" % (self.layout, self.prefix, self._built)

    # -- context manager -----------------------------------------------------

    def __enter__(self):
        try:
            self.build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc):
        # Keep the process logs when the body failed: they explain the failure.
        self.teardown(keep_logs=exc[0] is not None)
        return False

    # -- naming --------------------------------------------------------------

    def ns(self, name):
        """Full namespace name for a logical name."""
        if name not in self.names:
            raise KeyError("no host %r in this topology (have %s)" % (name, self.names))
        return self.prefix + name

    def addr(self, name):
        """The host's own primary underlay address (srv: the server address)."""
        self.ns(name)
        return self.plan.primary[name]

    def public_addr(self, name):
        """Source address srv sees for traffic from ``name`` (after all NATs)."""
        self.ns(name)
        return self.plan.public[name]

    # -- building ------------------------------------------------------------

    def build(self):
        """Create namespaces, links, addresses, routes and NAT rules."""
        if self._built or self._created:
            raise RuntimeError("topology %s already built" % self.prefix)
        _live_topologies.add(self)
        self.log_dir = tempfile.mkdtemp(prefix="mnedc-%s" % self.prefix)
        self._create_namespaces()
        self._create_links()
        self._assign_addresses()
        self._add_routes()
        self._enable_nat()
        self._wait_links_up()
        self._built = True
        log.info("built %s topology %s", self.layout, self.prefix)

    def _ip(self, name, *args):
        # `ip -n` is cheaper than `ip netns exec` (no mount namespace setup).
        return _run(["ip", "-n", self.ns(name)] + list(args))

    def _create_namespaces(self):
        for name in self.names:
            full = self.ns(name)
            _run(["ip", "netns", "add", full], timeout=NETNS_ADD_TIMEOUT)
            self._created.append(full)  # recorded at once so teardown sees it
            self._ip(name, "link", "set", "lo", "up")
            # Disable IPv6 before any veth exists so the "default" applies to
            # them too; this only keeps logs quiet, so failures are tolerated.
            self.run(name, ["sysctl", "-q", "-w",
                            "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1"], check=False)

    def _create_links(self):
        for v in self.plan.veths:
            # Both ends are created directly inside their namespaces, so the
            # short fixed names never clash with the host or other runs.
            _run(["ip", "link", "add", v.if1, "netns", self.ns(v.ns1), "type", "veth",
                  "peer", "name", v.if2, "netns", self.ns(v.ns2)])
        for b in self.plan.bridges:
            self._ip(b.ns, "link", "add", b.name, "type", "bridge")
            for port in b.ports:
                self._ip(b.ns, "link", "set", port, "master", b.name)
            self._ip(b.ns, "link", "set", b.name, "up")
        for v in self.plan.veths:
            self._ip(v.ns1, "link", "set", v.if1, "up")
            self._ip(v.ns2, "link", "set", v.if2, "up")

    def _assign_addresses(self):
        for a in self.plan.addrs:
            self._ip(a.ns, "addr", "add", a.cidr, "dev", a.dev)

    def _add_routes(self):
        for r in self.plan.routes:
            self._ip(r.ns, "route", "add", r.dest, "via", r.via)

    def _enable_nat(self):
        for name in self.plan.routers:
            self.run(name, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        for name, dev in self.plan.masquerade:
            # -w: the xtables lock is shared with the host and other runs.
            self.run(name, ["iptables", "-w", "5", "-t", "nat", "-A", "POSTROUTING",
                            "-o", dev, "-j", "MASQUERADE"])

    def _wait_links_up(self, timeout=5):
        # The kernel applies carrier changes asynchronously (linkwatch, up to
        # ~1 s later); until then a veth drops packets, so wait for operstate
        # UP instead of letting the first test packets vanish.
        deadline = time.monotonic() + timeout
        pending = list(self.names)
        while True:
            pending = [n for n in pending if self._links_down(n)]
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError("links still down after %gs: %s" % (
                    timeout, {n: self._links_down(n) for n in pending}))
            time.sleep(0.02)  # polling a bounded deadline

    def _links_down(self, name):
        down = []
        for line in self._ip(name, "-o", "link", "show").stdout.splitlines():
            # "2: wan0@if2: <BROADCAST,...,UP,LOWER_UP> mtu 1500 ... state UP ..."
            dev = line.split(":")[1].strip().split("@")[0]
            if dev != "lo" and " state UP " not in line:
                down.append(dev)
        return down

    # -- using ---------------------------------------------------------------

    def _require_built(self):
        if not self._created:
            raise RuntimeError("topology %s is not built" % self.prefix)

    def etc_file(self, name, filename, text):
        """Give namespace ``name`` its own /etc/FILENAME (hosts, resolv.conf): `ip netns exec`
        bind-mounts /etc/netns/NS/FILENAME over it for every process started after this.
        Removed at teardown."""
        self._require_built()
        directory = os.path.join(NETNS_ETC, self.ns(name))
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, filename), "w") as sink:
            sink.write(text)

    def run(self, name, argv, timeout=10, check=True, **kw):
        """Run ``argv`` inside namespace ``name``; returns CompletedProcess (text).

        Raises CommandError (with stdout/stderr) if ``check`` and rc != 0.
        """
        self._require_built()
        return _run(["ip", "netns", "exec", self.ns(name)] + list(argv),
                    timeout=timeout, check=check, **kw)

    def spawn(self, name, argv, env=None, cwd=None, stdin=subprocess.DEVNULL):
        """Start a long-running ``argv`` in namespace ``name``; see Proc."""
        self._require_built()
        with self._lock:
            seq = len(self._procs)
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(str(argv[0])))
        log_path = os.path.join(self.log_dir, "%02d-%s-%s.log" % (seq, name, base))
        proc = Proc.start(argv, env=env, cwd=cwd, stdin=stdin, log_path=log_path,
                          label="%s:%s" % (name, base),
                          _cmd_prefix=["ip", "netns", "exec", self.ns(name)])
        with self._lock:
            self._procs.append(proc)
        return proc

    @property
    def procs(self):
        with self._lock:
            return list(self._procs)

    def ping(self, name, target, count=1, timeout_s=2):
        """True if ``target`` answers ``count`` pings from inside ``name``."""
        res = self.run(name, ["ping", "-n", "-q", "-c", str(count), "-i", "0.2",
                              "-W", str(timeout_s), target],
                       timeout=count * (timeout_s + 1) + 5, check=False)
        return res.returncode == 0

    def dump(self):
        """Addresses, routes and NAT rules of every namespace, for debugging."""
        out = []
        for name in self.names:
            out.append("== %s (%s)" % (name, self.ns(name)))
            for argv in (["ip", "-br", "addr"], ["ip", "route"]):
                try:
                    out.append(self.run(name, argv, check=False).stdout.rstrip())
                except (OSError, subprocess.SubprocessError) as e:
                    out.append("%s: %s" % (argv, e))
        return "\n".join(out)

    # -- teardown ------------------------------------------------------------

    def teardown(self, keep_logs=False):
        """Stop all processes and delete all namespaces.  Never raises.

        Returns (and stores in ``teardown_errors``) a list of problems found;
        an empty list means everything with our prefix is gone.
        """
        errors = []
        with self._lock:
            procs, self._procs = self._procs, []
        self._stop_procs(procs, errors)
        created, self._created = self._created, []
        self._built = False
        # Sweep by prefix too: catches a namespace whose `ip netns add`
        # succeeded but was not recorded (e.g. interrupted mid-call).
        try:
            extra = [n for n in leftover_namespaces(self.prefix) if n not in created]
        except Exception as e:  # noqa: BLE001 - teardown must not raise
            errors.append("ip netns list: %s" % e)
            extra = []
        for full in reversed(created + extra):
            self._kill_ns_pids(full, errors)
        for full in reversed(created + extra):
            self._delete_ns(full, errors)
        self._check_clean(errors)
        for full in created + extra:
            shutil.rmtree(os.path.join(NETNS_ETC, full), ignore_errors=True)
        self._remove_logs(keep_logs)
        _live_topologies.discard(self)
        self.teardown_errors = errors
        for e in errors:
            log.error("teardown %s: %s", self.prefix, e)
        return errors

    @staticmethod
    def _stop_procs(procs, errors):
        # SIGTERM everyone first so they shut down in parallel, then give
        # them one shared ~3 s budget before SIGKILL.
        for p in procs:
            try:
                p.terminate()
            except Exception as e:  # noqa: BLE001
                errors.append("terminate %r: %s" % (p, e))
        deadline = time.monotonic() + 3
        for p in reversed(procs):
            try:
                p.stop(timeout=max(0.0, deadline - time.monotonic()))
                if p.alive():
                    errors.append("%r is still alive" % p)
            except Exception as e:  # noqa: BLE001
                errors.append("stop %r: %s" % (p, e))

    @staticmethod
    def _kill_ns_pids(full, errors):
        # Anything still inside the namespace (children of spawned programs,
        # processes started by other means) would keep the namespace alive
        # after `ip netns del`; they are ours by construction.
        try:
            res = _run(["ip", "netns", "pids", full], check=False)
            pids = [int(p) for p in res.stdout.split() if p.isdigit()]
        except Exception as e:  # noqa: BLE001
            errors.append("ip netns pids %s: %s" % (full, e))
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except Exception as e:  # noqa: BLE001
                errors.append("kill %d in %s: %s" % (pid, full, e))
        deadline = time.monotonic() + 3
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _pid_running(p)]
            if pids:
                time.sleep(0.02)  # polling a bounded deadline, not synchronisation
        if pids:
            errors.append("pids %s in %s survived SIGKILL" % (pids, full))

    @staticmethod
    def _delete_ns(full, errors):
        try:
            res = _run(["ip", "netns", "del", full], check=False)
            if res.returncode != 0 and full in list_namespaces():
                errors.append("ip netns del %s: %s" % (full, res.stderr.strip()))
        except Exception as e:  # noqa: BLE001
            errors.append("ip netns del %s: %s" % (full, e))

    def _check_clean(self, errors):
        try:
            left = leftover_namespaces(self.prefix)
        except Exception as e:  # noqa: BLE001
            errors.append("ip netns list: %s" % e)
            return
        if left:
            errors.append("namespaces left behind: %s" % left)

    def _remove_logs(self, keep_logs):
        if self.log_dir is None or not os.path.isdir(self.log_dir):
            return
        if keep_logs or os.environ.get("MNEDC_KEEP_LOGS"):
            log.warning("topology %s: process logs kept in %s", self.prefix, self.log_dir)
            return
        shutil.rmtree(self.log_dir, ignore_errors=True)


def _pid_running(pid):
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except (OSError, IOError):
        return False
    # State follows the parenthesised comm, which may itself contain spaces.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
