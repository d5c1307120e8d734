"""An MNEDC network running in a Topology: the real server and real TUN clients as processes.

Shared by the end-to-end tests and the demo, so the demo shows exactly what the tests prove.
"""

import contextlib
import json
import os
import py_compile
import re
import signal
import subprocess
import sys

from tests.conftest import ROOT

SERVER = os.path.join(ROOT, "mnedc_server.py")
CLIENT = os.path.join(ROOT, "mnedc_client.py")
JOINED = r"connected to relay \S+ as (\d+\.\d+\.\d+\.\d+)/(\d+)"


class RelayNetwork:
    """Starts, restarts and stops MNEDC processes inside topo's namespaces.

    vip[name] is the virtual IP each client reported when it joined.
    """

    def __init__(self, topo, workdir, python=sys.executable, subnet="198.18.0.0/24",
                 keepalive=None, secret=None, as_module=False, env=None, relay_host=None, tls=True):
        """as_module runs the scripts as install.sh's services do: python3 -m, from bytecode.
        env: the processes' environment (tests/light.py's python3-light simulation).
        tls: the default setup (the relay's own certificate, clients pin it); False: tls = no
        on both sides. Options that set TLS keys replace these."""
        self.topo = topo
        self.as_module = as_module
        self.base_env = env
        self.tls = tls
        self.pin = None                 # the relay's certificate pin, from its ready line
        self.relay_host = relay_host or topo.server_ip     # how clients name the relay
        if as_module:
            for script in (SERVER, CLIENT):
                py_compile.compile(script, doraise=True)
        self.workdir = str(workdir)
        self.python = python
        self.subnet = subnet
        self.keepalive = keepalive
        self.server = None
        self.clients = {}
        self.vip = {}
        self.server_vip = re.sub(r"\.0/\d+$", ".1", subnet)
        self.secret_path = os.path.join(self.workdir, "network.secret")
        self.control_socket = os.path.join(self.workdir, "server.sock")
        with open(self.secret_path, "w") as sink:
            sink.write((secret or os.urandom(16).hex()) + "\n")

    def write_config(self, name, section, values):
        path = os.path.join(self.workdir, "%s.ini" % name)
        with open(path, "w") as sink:
            sink.write("[%s]\n" % section)
            for key, value in values.items():
                if value is not None:
                    sink.write("%s = %s\n" % (key, value))
        return path

    def command(self, script):
        if self.as_module:
            return [self.python, "-u", "-m", os.path.basename(script)[:-3]]
        return [self.python, "-u", script]

    def env(self):
        env = self.base_env
        if self.as_module:
            env = dict(env or os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), ROOT]))
        return env

    def start_server(self, extra=(), options=None):
        """The server in srv; options adds or overrides [server] keys."""
        values = {"listen": "0.0.0.0:3334", "subnet": self.subnet, "secret_file": self.secret_path,
                  "state_dir": os.path.join(self.workdir, "server-state"), "keepalive": self.keepalive,
                  "tun": "yes", "control_socket": self.control_socket}
        values.update({"tls": None if self.tls else "no"})
        values.update(options or {})
        config = self.write_config("server", "server", values)
        self.server = self.topo.spawn("srv", self.command(SERVER) + ["-c", config] + list(extra), env=self.env())
        ready = self.server.wait_for(r"MNEDC server ready", timeout=20)
        pin = re.search(r"certificate pin (sha256:[0-9a-f]{64})", ready.string)
        self.pin = pin.group(1) if pin else None
        return self.server

    @contextlib.contextmanager
    def reloaded(self, extra_lines):
        """The relay's configuration with extra_lines added, applied by SIGHUP; put back after."""
        config = os.path.join(self.workdir, "server.ini")
        original = open(config).read()

        def apply(text):
            with open(config, "w") as sink:
                sink.write(text)
            mark = len(self.server.lines())
            self.server.send_signal(signal.SIGHUP)
            self.server.wait_for(r"reloaded the configuration", start=mark)
        apply(original + extra_lines)
        try:
            yield
        finally:
            apply(original)

    def start_client(self, name, device_id=None, secret_path=None, interface=None, wait=True, extra=(),
                     label=None, options=None):
        """A TUN client in namespace name, known as clients[label or name]; options adds or
        overrides [client] keys."""
        label = label or name
        values = {
            "server": self.relay_host, "secret_file": secret_path or self.secret_path,
            "device_id": device_id or "device-" + name, "keepalive": self.keepalive,
            "interface": interface, "control_socket": self.control_path(label)}
        if not set(options or {}) & {"tls", "server_pin", "tls_ca"}:
            assert self.pin or not self.tls, "start the relay first: clients pin its certificate"
            values.update({"server_pin": self.pin} if self.pin else {"tls": "no"})
        values.update(options or {})
        config = self.write_config("client-" + label, "client", values)
        proc = self.topo.spawn(name, self.command(CLIENT) + ["-c", config] + list(extra), env=self.env())
        self.clients[label] = proc
        if wait:
            self.vip[label] = proc.wait_for(JOINED, timeout=30).group(1)
        return proc

    def control_path(self, label):
        return os.path.join(self.workdir, "client-%s.sock" % label)

    def client_status(self, label):
        """The running TUN client's `status --json`, as a dict."""
        result = subprocess.run([self.python, CLIENT, "status", "--json", "--control", self.control_path(label)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=15, check=True,
                                env=self.base_env)
        return json.loads(result.stdout.decode())

    def start(self, names=None):
        self.start_server()
        for name in self.topo.clients if names is None else names:
            self.start_client(name)
        return self
