"""install.sh, end to end: install into a temporary root (--root), then run what it installed.

The LSB init script starts, reports and stops a real server; the cron watchdog, run the way cron
runs it, brings back a killed daemon, replaces a hung (SIGSTOPped) one, distrusts a pidfile whose
pid now belongs to another program, and never runs twice at once. Re-installing changes nothing;
uninstall removes everything but the state. The procd script runs under a stub rc.common, the
systemd unit is read, the refusals are provoked without harming the machine, and shellcheck, dash
and busybox sh check the shell. Every daemon a test starts is killed by pid at teardown, found by
the temporary root in its command line.
"""

import fcntl
import functools
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_SH = os.path.join(PROJECT, "install.sh")
WAIT_S = 15                     # the bound of every wait for a condition
SECRET = "install-test-secret-0123"


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="install.sh installs services and refuses to run without root")


# ---- helpers -------------------------------------------------------------------------------

def wait_for(condition, what, timeout=WAIT_S):
    """Poll condition() until it returns something true; fail naming `what` after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("still waiting after %s s for %s" % (timeout, what))
        time.sleep(0.05)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as source:
            return [part.decode(errors="replace") for part in source.read().split(b"\0") if part]
    except OSError:
        return []


def alive(pid):
    """True while pid is a live process (a zombie counts as gone: nobody may reap it here)."""
    try:
        with open("/proc/%d/stat" % pid) as source:
            return source.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def process_state(pid):
    with open("/proc/%d/stat" % pid) as source:
        return source.read().rsplit(")", 1)[1].split()[0]


def run(argv, env=None, timeout=WAIT_S * 2):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, timeout=timeout)


def tree(root):
    """{relative path: (mode, content)} of every file and directory below root."""
    found = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            content = None
            if stat.S_ISREG(mode):
                with open(path, "rb") as source:
                    content = source.read()
            found[os.path.relpath(path, root)] = (oct(mode), content)
    return found


def job_lines(cron_file):
    with open(cron_file) as source:
        return [line for line in source.read().splitlines()
                if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]


@functools.lru_cache(maxsize=None)
def has_control_socket(name):
    script = os.path.join(PROJECT, "mnedc_%s.py" % name)
    return "--control" in run([sys.executable, script, "--help"]).stdout


def control_args(root, name="server"):
    """The --control flag install.sh adds when the daemon has a control socket (newer ones do)."""
    return ["--control", root + "/var/run/mnedc/%s.sock" % name] if has_control_socket(name) else []


class Box:
    """One test's world: a temporary root to install into, a fake logger, and the daemon."""

    def __init__(self, tmp_path):
        self.tmp = str(tmp_path)
        self.root = os.path.join(self.tmp, "root")
        os.mkdir(self.root)
        self.port = free_port()
        self.bin = os.path.join(self.tmp, "bin")
        os.mkdir(self.bin)
        self.logger_log = os.path.join(self.tmp, "logger.log")
        self.logger_hold = os.path.join(self.tmp, "logger.hold")
        self.write_script("logger", """#!/bin/sh
printf '%%s\\n' "$*" >>'%s'
i=0
while [ -e '%s' ] && [ "$i" -lt 300 ]; do sleep 0.05; i=$((i + 1)); done
""" % (self.logger_log, self.logger_hold))
        self.config = os.path.join(self.tmp, "test-server.ini")
        with open(self.config, "w") as sink:
            sink.write("[server]\nlisten = 127.0.0.1:%d\nsubnet = 198.18.0.0/24\ntun = no\nsecret = %s\nstate_dir = %s\n"
                       % (self.port, SECRET, self.path("/var/lib/mnedc")))
        self.others = []                # processes the test started itself, e.g. sleep

    def path(self, absolute):
        return self.root + absolute

    def write_script(self, name, text):
        path = os.path.join(self.bin, name)
        with open(path, "w") as sink:
            sink.write(text)
        os.chmod(path, 0o755)
        return path

    @property
    def init_script(self):
        return self.path("/etc/init.d/mnedc-server")

    @property
    def pidfile(self):
        return self.path("/var/run/mnedc/mnedc-server.pid")

    @property
    def heartbeat(self):
        return self.path("/var/run/mnedc/mnedc-server.heartbeat")

    @property
    def script(self):
        return self.path("/usr/local/sbin/mnedc_server.py")

    def install(self, *args, shell="/bin/sh", env=None, check=True):
        result = run([shell, INSTALL_SH] + list(args) + ["--root", self.root], env=env)
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def install_server(self, *args, **kwargs):
        return self.install("server", "--init", "sysv", "--config", self.config, *args, **kwargs)

    def init(self, action, env=None):
        return run([self.init_script, action], env=env)

    def daemon_pid(self):
        """The pid in the pidfile if it names a live server, else None."""
        try:
            with open(self.pidfile) as source:
                pid = int(source.read())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) and self.script in cmdline(pid) else None

    def start(self):
        result = self.init("start")
        assert result.returncode == 0, result.stdout + result.stderr
        return wait_for(self.daemon_pid, "the server's pidfile")

    def accepts(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def cron_env(self, **extra):
        """The environment cron gives the job: its PATH line, our fake logger first."""
        path = "/usr/bin:/bin"
        with open(self.path("/etc/cron.d/mnedc")) as source:
            for line in source:
                if line.startswith("PATH="):
                    path = line.strip()[len("PATH="):]
        env = {"PATH": self.bin + ":" + path, "HOME": "/root", "LOGNAME": "root", "SHELL": "/bin/sh"}
        env.update(extra)
        return env

    def watchdog_argv(self):
        """The command of the cron line, as cron runs it (sh -c)."""
        (line,) = job_lines(self.path("/etc/cron.d/mnedc"))
        fields = line.split(None, 6)
        assert fields[:6] == ["*", "*", "*", "*", "*", "root"], line
        return ["/bin/sh", "-c", fields[6]]

    def watchdog(self, **extra):
        return run(self.watchdog_argv(), env=self.cron_env(**extra))

    def logged(self):
        try:
            with open(self.logger_log) as source:
                return source.read()
        except OSError:
            return ""

    def stop_everything(self):
        """SIGKILL, by pid, every process whose command line names our temporary directory."""
        victims = [p.pid for p in self.others]
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != os.getpid():
                if any(self.tmp in part for part in cmdline(int(name))):
                    victims.append(int(name))
        for pid in victims:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, signum)
                except OSError:
                    pass
        for process in self.others:
            process.wait(timeout=WAIT_S)
        wait_for(lambda: not any(alive(pid) for pid in victims), "the test's processes to die")


@pytest.fixture
def box(tmp_path):
    world = Box(tmp_path)
    try:
        yield world
    finally:
        world.stop_everything()


@pytest.fixture
def running(box):
    """An installed server, started through its init script."""
    box.install_server()
    box.start()
    return box


# ---- 1. what install puts where --------------------------------------------------------------

def test_install_server_files(box):
    result = box.install_server()
    assert "neither enabled nor started (--root)" in result.stdout

    assert open(box.script, "rb").read() == open(os.path.join(PROJECT, "mnedc_server.py"), "rb").read()
    assert os.stat(box.script).st_mode & 0o777 == 0o755
    config = box.path("/etc/mnedc/server.ini")
    assert open(config).read() == open(box.config).read()
    assert os.stat(config).st_mode & 0o777 == 0o600

    init = open(box.init_script).read()
    assert os.stat(box.init_script).st_mode & 0o777 == 0o755
    assert init.startswith("#!/bin/sh\n### BEGIN INIT INFO\n# Provides:          mnedc-server\n")
    assert "# Required-Start:    $network $remote_fs $syslog" in init
    assert "-x \"$PYTHON\"" in init and "-m" not in init.split("start-stop-daemon -S")[1].split("\n")[0]

    cron_file = box.path("/etc/cron.d/mnedc")
    info = os.stat(cron_file)
    assert (info.st_mode & 0o777, info.st_uid, info.st_gid) == (0o644, 0, 0)
    cron = open(cron_file).read()
    assert "%" not in cron
    path_line = [line for line in cron.splitlines() if line.startswith("PATH=")]
    assert path_line and "/sbin" in path_line[0].split("=", 1)[1].split(":")
    assert job_lines(cron_file) == [
        "* * * * * root %s mnedc-server" % box.path("/usr/local/sbin/mnedc-watchdog")]

    watchdog = box.path("/usr/local/sbin/mnedc-watchdog")
    assert os.stat(watchdog).st_mode & 0o777 == 0o755
    assert "flock -n" in open(watchdog).read()
    state = box.path("/var/lib/mnedc")
    assert os.path.isdir(state) and os.stat(state).st_mode & 0o777 == 0o700
    assert os.path.isdir(box.path("/var/run/mnedc"))
    assert not os.path.exists(box.pidfile)


# ---- 2. the LSB init script, for real ----------------------------------------------------------

def test_init_script_start_status_stop(running):
    box = running
    pid = box.daemon_pid()
    argv = cmdline(pid)
    assert argv[1:] == ["-u", box.script, "-c", box.path("/etc/mnedc/server.ini"), "--syslog",
                        "--pidfile", box.pidfile, "--heartbeat", box.heartbeat] + control_args(box.root)
    wait_for(box.accepts, "the server to accept TCP on port %d" % box.port)

    again = box.init("start")
    assert again.returncode == 0 and "already running (pid %d)" % pid in again.stdout
    status = box.init("status")
    assert status.returncode == 0 and "running (pid %d)" % pid in status.stdout

    stop = box.init("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not alive(pid)
    assert not os.path.exists(box.pidfile)
    status = box.init("status")
    assert status.returncode == 3 and "not running" in status.stdout
    assert box.init("stop").returncode == 0          # stopping a stopped service is fine (LSB)
    assert box.init("bogus").returncode == 2


def test_init_script_status_dead_with_pidfile(running):
    box = running
    pid = box.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), "the killed server to die")
    status = box.init("status")
    assert status.returncode == 1 and "pidfile" in status.stdout


# ---- 3.-6. the watchdog --------------------------------------------------------------------------

def test_watchdog_leaves_a_healthy_daemon_alone(running):
    box = running
    pid = box.daemon_pid()
    result = box.watchdog()
    assert result.returncode == 0 and result.stderr == ""
    assert box.daemon_pid() == pid and box.logged() == ""


def test_watchdog_restarts_a_killed_daemon(running):
    box = running
    old = box.daemon_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), "the killed server to die")

    result = box.watchdog()
    assert result.returncode == 0, result.stderr
    new = box.daemon_pid()
    assert new and new != old
    wait_for(box.accepts, "the restarted server to accept TCP")
    assert "process %d is gone: restarting it" % old in result.stderr
    assert "restarted (pid %d)" % new in result.stderr
    assert "-t mnedc-watchdog" in box.logged() and "process %d is gone" % old in box.logged()

    # The new daemon must not inherit the watchdog's lock, or no later run could act.
    lock = box.path("/var/run/mnedc/mnedc-server.lock")
    for fd in os.listdir("/proc/%d/fd" % new):
        assert os.readlink("/proc/%d/fd/%s" % (new, fd)) != lock
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_watchdog_kills_and_replaces_a_hung_daemon(running):
    box = running
    old = box.daemon_pid()
    os.kill(old, signal.SIGSTOP)
    wait_for(lambda: process_state(old) == "T", "the server to stop")
    bound_s = 2
    wait_for(lambda: time.time() - os.stat(box.heartbeat).st_mtime > bound_s + 1.5,
             "the stopped server's heartbeat to go stale")
    assert box.watchdog().returncode == 0                   # 60 s by default: not hung yet
    assert box.daemon_pid() == old

    result = box.watchdog(MNEDC_HEARTBEAT_MAX_S=str(bound_s))
    assert result.returncode == 0, result.stderr
    assert not alive(old)
    new = box.daemon_pid()
    assert new and new != old
    assert "hangs: no heartbeat for" in result.stderr and "SIGKILL" in result.stderr
    assert "hangs" in box.logged()
    wait_for(box.accepts, "the replacement server to accept TCP")


def test_watchdog_distrusts_a_pidfile_naming_another_program(running):
    box = running
    old = box.daemon_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), "the killed server to die")
    sleeper = subprocess.Popen(["sleep", "300"])
    box.others.append(sleeper)
    with open(box.pidfile, "w") as sink:
        sink.write("%d\n" % sleeper.pid)
    assert box.init("status").returncode == 1

    result = box.watchdog()
    assert result.returncode == 0, result.stderr
    assert "names pid %d, which is another program (sleep 300)" % sleeper.pid in result.stderr
    new = box.daemon_pid()
    assert new and new not in (old, sleeper.pid)
    assert sleeper.poll() is None, "the watchdog must not touch the unrelated process"


def test_watchdog_runs_never_overlap(running):
    box = running
    old = box.daemon_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), "the killed server to die")
    open(box.logger_hold, "w").close()        # the fake logger now blocks the first run, locked
    first = subprocess.Popen(box.watchdog_argv(), env=box.cron_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True)
    try:
        wait_for(lambda: "is gone" in box.logged(), "the first watchdog run to hold the lock")
        began = time.monotonic()
        second = box.watchdog()
        assert second.returncode == 0 and second.stdout == second.stderr == ""
        assert time.monotonic() - began < 5
        assert box.logged().count("\n") == 1 and box.daemon_pid() is None
    finally:
        os.unlink(box.logger_hold)
        out, err = first.communicate(timeout=WAIT_S * 2)
    assert first.returncode == 0, err
    assert box.daemon_pid() not in (None, old)


def test_watchdog_respects_a_deliberate_stop(running):
    box = running
    assert box.init("stop").returncode == 0
    result = box.watchdog()
    assert result.returncode == 0 and result.stderr == ""
    assert box.daemon_pid() is None


# ---- 7. idempotency and uninstall ----------------------------------------------------------------

def test_reinstall_changes_nothing_and_uninstall_removes_all_but_state(box):
    box.install_server()
    first = tree(box.root)
    box.install_server()
    assert tree(box.root) == first
    assert len(job_lines(box.path("/etc/cron.d/mnedc"))) == 1

    pid = box.start()
    result = box.install("uninstall")
    assert not alive(pid), "uninstall must stop the daemon"
    left = set(tree(box.root)) - {"var", "var/lib"}
    assert all(path.startswith("var/lib/mnedc") for path in left), left
    assert "leases.json" in os.listdir(box.path("/var/lib/mnedc"))
    assert "kept the state" in result.stdout

    box.install("uninstall", "--purge")
    assert os.listdir(box.root) == []


def test_server_and_client_share_the_cron_file(box):
    client_config = os.path.join(box.tmp, "client.ini")
    with open(client_config, "w") as sink:
        sink.write("[client]\nserver = 127.0.0.1:%d\nsecret = %s\n" % (box.port, SECRET))
    box.install_server()
    env = dict(os.environ, MNEDC_TUN_DEV="/dev/null")   # a character device: the check passes
    box.install("client", "--init", "sysv", "--config", client_config, env=env)
    box.install("client", "--init", "sysv", "--config", client_config, env=env)
    watchdog = box.path("/usr/local/sbin/mnedc-watchdog")
    assert job_lines(box.path("/etc/cron.d/mnedc")) == [
        "* * * * * root %s mnedc-server" % watchdog, "* * * * * root %s mnedc-client" % watchdog]
    assert os.path.exists(box.path("/etc/init.d/mnedc-client"))
    box.install("uninstall", "--purge")
    assert os.listdir(box.root) == []


def test_client_with_the_template_is_installed_but_not_enabled(box):
    env = dict(os.environ, MNEDC_TUN_DEV="/dev/null")
    result = box.install("client", "--init", "sysv", env=env)
    config = box.path("/etc/mnedc/client-config.ini")
    assert open(config).read() == open(os.path.join(PROJECT, "client-config.ini")).read()
    assert "set server and secret in %s" % config in result.stdout
    assert not os.path.exists(box.path("/etc/cron.d/mnedc"))
    assert not os.path.exists(box.path("/var/run/mnedc/mnedc-client.pid"))


def test_reinstall_with_another_init_is_refused(box):
    box.install_server()
    result = box.install("server", "--init", "procd", check=False)
    assert result.returncode != 0 and "uninstall first" in result.stderr


# ---- 8.-9. procd and systemd -------------------------------------------------------------------

PROCD_STUB = r"""
record() { for arg in "$@"; do printf '[%s]' "$arg"; done; echo; }
procd_open_instance() { record open_instance "$@"; }
procd_set_param() { record set_param "$@"; }
procd_append_param() { record append_param "$@"; }
procd_close_instance() { record close_instance "$@"; }
. "$1"
start_service
"""


def test_procd_script(box):
    box.install("server", "--init", "procd")
    init = box.path("/etc/init.d/mnedc-server")
    text = open(init).read()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    for line in ("USE_PROCD=1", "START=90", "STOP=10"):
        assert line + "\n" in text
    python = run(["python3", "-c", "import sys; print(sys.executable)"]).stdout.strip()  # as install.sh
    conf = box.path("/etc/mnedc/server.ini")
    pidfile = box.path("/var/run/mnedc/mnedc-server.pid")
    expected = [
        "[open_instance]",
        "[set_param][command][%s][-u][%s][-c][%s][--pidfile][%s][--heartbeat][%s]"
        % (python, box.script, conf, pidfile, box.path("/var/run/mnedc/mnedc-server.heartbeat"))
        + "".join("[%s]" % arg for arg in control_args(box.root)),
        "[set_param][respawn][3600][5][0]",
        "[set_param][stdout][1]",
        "[set_param][stderr][1]",
        "[set_param][pidfile][%s]" % pidfile,
        "[set_param][file][%s]" % conf,
        "[close_instance]",
    ]
    shells = [["/bin/sh"], ["dash"]] + ([["busybox", "sh"]] if shutil.which("busybox") else [])
    for shell in shells:
        assert run(shell + ["-n", init]).returncode == 0
        result = run(shell + ["-c", PROCD_STUB, "stub", init])
        assert result.returncode == 0 and result.stdout.splitlines() == expected, (shell, result)

    assert "state_dir = %s" % box.path("/etc/mnedc/state") in open(conf).read()
    assert os.stat(box.path("/etc/mnedc/state")).st_mode & 0o777 == 0o700
    assert job_lines(box.path("/etc/crontabs/root")) == [
        "* * * * * %s mnedc-server" % box.path("/usr/local/sbin/mnedc-watchdog")]
    kept = open(box.path("/etc/sysupgrade.conf")).read().splitlines()
    for path in ("/etc/mnedc/", "/usr/local/sbin/mnedc_server.py", "/usr/local/sbin/mnedc-watchdog",
                 "/etc/init.d/mnedc-server"):
        assert box.path(path) in kept
    box.install("server", "--init", "procd")
    assert len(open(box.path("/etc/sysupgrade.conf")).read().splitlines()) == len(kept)
    assert len(job_lines(box.path("/etc/crontabs/root"))) == 1
    box.install("uninstall", "--purge")
    assert os.listdir(box.root) == []


def test_procd_crontab_keeps_other_jobs(box):
    os.makedirs(box.path("/etc/crontabs"))
    with open(box.path("/etc/crontabs/root"), "w") as sink:
        sink.write("0 3 * * * /sbin/reboot\n")
    box.install("server", "--init", "procd")
    assert len(job_lines(box.path("/etc/crontabs/root"))) == 2
    box.install("uninstall", "--purge")
    assert open(box.path("/etc/crontabs/root")).read() == "0 3 * * * /sbin/reboot\n"


def test_systemd_unit(box):
    box.install("server", "--init", "systemd", "--prefix", "/opt/mnedc")
    unit = open(box.path("/etc/systemd/system/mnedc-server.service")).read()
    lines = unit.splitlines()
    for line in ("Restart=always", "RestartSec=5", "StartLimitIntervalSec=0",
                 "After=network-online.target", "Wants=network-online.target",
                 "WantedBy=multi-user.target"):
        assert line in lines
    assert lines.index("StartLimitIntervalSec=0") < lines.index("[Service]")   # a [Unit] key
    (exec_start,) = [line for line in lines if line.startswith("ExecStart=")]
    assert exec_start.split()[1:] == [
        "-u", box.path("/opt/mnedc/sbin/mnedc_server.py"), "-c", box.path("/etc/mnedc/server.ini"),
        "--syslog", "--pidfile", box.path("/var/run/mnedc/mnedc-server.pid"),
        "--heartbeat", box.path("/var/run/mnedc/mnedc-server.heartbeat")] + control_args(box.root)
    assert not os.path.exists(box.path("/etc/init.d"))
    assert len(job_lines(box.path("/etc/cron.d/mnedc"))) == 1


# ---- 10. refusals --------------------------------------------------------------------------------

def assert_refused(box, result, *phrases):
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0]
    assert os.listdir(box.root) == [], "a refused install must not write anything"


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux) to drop root")
def test_refuses_without_root(box):
    result = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                  "/bin/sh", INSTALL_SH, "server", "--root", box.root])
    assert_refused(box, result, "must run as root")


def test_refuses_without_python3(box):
    for tool in ("id", "dirname"):
        os.symlink(shutil.which(tool), os.path.join(box.bin, tool))
    result = box.install("server", env={"PATH": box.bin}, check=False)
    assert_refused(box, result, "python3 is missing", "apt-get install python3", "opkg")


def test_refuses_an_old_python3(box):
    box.write_script("python3", "#!/bin/sh\necho 3.6\n")
    env = dict(os.environ, PATH=box.bin + ":" + os.environ["PATH"])
    result = box.install("server", env=env, check=False)
    assert_refused(box, result, "Python 3.6", "3.7 or newer")


def test_client_refuses_without_tun(box):
    env = dict(os.environ, MNEDC_TUN_DEV=os.path.join(box.tmp, "no-tun"))
    result = box.install("client", env=env, check=False)
    assert_refused(box, result, "no-tun is missing", "kmod-tun", "stream mode", "listen", "connect")


def test_refuses_bad_options(box):
    for args in (["server", "--init", "upstart"], ["uninstall", "--prefix", "/opt"],
                 ["server", "--purge"], ["bogus"]):
        result = box.install(*args, check=False)
        assert result.returncode != 0 and result.stderr.startswith("install.sh: "), args
    assert os.listdir(box.root) == []


# ---- 11.-12. shellcheck, dash, busybox -----------------------------------------------------------

@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed (CI installs it)")
def test_shellcheck(box):
    box.install_server()
    procd_root = os.path.join(box.tmp, "procd-root")
    os.mkdir(procd_root)
    run(["/bin/sh", INSTALL_SH, "server", "--init", "procd", "--root", procd_root])
    scripts = [INSTALL_SH, box.init_script, box.path("/usr/local/sbin/mnedc-watchdog"),
               os.path.join(procd_root, "etc/init.d/mnedc-server")]
    result = run(["shellcheck", "--shell=sh"] + scripts)
    assert result.returncode == 0, result.stdout + result.stderr


def normalized(root):
    return {path: (mode, content.replace(root.encode(), b"ROOT") if content else content)
            for path, (mode, content) in tree(root).items()}


@pytest.mark.parametrize("init", ["sysv", "procd"])
def test_install_sh_runs_under_dash_and_busybox(box, init):
    shells = {"dash": ["dash"]}
    if shutil.which("busybox"):
        shells["busybox"] = ["busybox", "sh"]
    trees = {}
    for name, shell in shells.items():
        root = os.path.join(box.tmp, name)
        os.mkdir(root)
        result = run(shell + [INSTALL_SH, "server", "--init", init, "--root", root])
        assert result.returncode == 0, (name, result.stderr)
        trees[name] = normalized(root)
        result = run(shell + [INSTALL_SH, "uninstall", "--purge", "--root", root])
        assert result.returncode == 0 and os.listdir(root) == [], (name, result.stderr)
    assert len(set(map(repr, trees.values()))) == 1, "dash and busybox sh installed different files"
    if "busybox" not in shells:
        pytest.skip("busybox is not installed (CI installs it): checked dash only")


@pytest.mark.skipif(not shutil.which("busybox"), reason="busybox is not installed (CI installs it)")
@pytest.mark.parametrize("start_stop_daemon", [True, False], ids=["busybox-ssd", "no-ssd"])
def test_busybox_only_board(box, start_stop_daemon):
    """Busybox tools alone, as on OpenWrt: its start-stop-daemon, or none (the sh fallback)."""
    busybox = shutil.which("busybox")
    board = os.path.join(box.tmp, "busybox-bin")
    os.mkdir(board)
    applets = run([busybox, "--list"]).stdout.split()
    for applet in applets:
        if applet != "start-stop-daemon" or start_stop_daemon:
            os.symlink(busybox, os.path.join(board, applet))
    if "flock" not in applets:            # Debian's busybox lacks it; OpenWrt's has it
        os.symlink(shutil.which("flock"), os.path.join(board, "flock"))
    os.symlink(sys.executable, os.path.join(box.bin, "python3"))
    env = {"PATH": box.bin + ":" + board}

    result = run([busybox, "sh", INSTALL_SH, "server", "--init", "sysv", "--config", box.config,
                  "--root", box.root], env=env)
    assert result.returncode == 0, result.stderr
    start = run([busybox, "sh", box.init_script, "start"], env=env)
    assert start.returncode == 0, start.stdout + start.stderr
    old = wait_for(box.daemon_pid, "the server started without start-stop-daemon")
    wait_for(box.accepts, "the server to accept TCP")

    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), "the killed server to die")
    watchdog = box.path("/usr/local/sbin/mnedc-watchdog")
    result = run([busybox, "sh", watchdog, "mnedc-server"], env=env)
    assert result.returncode == 0, result.stderr
    new = box.daemon_pid()
    assert new and new != old and "is gone" in box.logged()

    assert run([busybox, "sh", box.init_script, "stop"], env=env).returncode == 0
    assert not alive(new)
    assert run([busybox, "sh", box.init_script, "status"], env=env).returncode == 3
    result = run([busybox, "sh", INSTALL_SH, "uninstall", "--purge", "--root", box.root], env=env)
    assert result.returncode == 0 and os.listdir(box.root) == [], result.stderr
