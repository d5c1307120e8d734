#!/bin/sh
# install.sh: install the MNEDC relay server or a TUN client as a service, with a cron watchdog.
#
#   ./install.sh server|client [--config FILE] [--prefix DIR] [--root DIR]
#                              [--init procd|sysv|systemd] [--no-start]
#   ./install.sh uninstall [--root DIR] [--purge]
#
# What it installs (paths for --prefix /usr/local, the default):
#   /usr/local/sbin/mnedc_server.py or mnedc_client.py   the script, copied from beside install.sh
#   /etc/mnedc/server.ini or client-config.ini           --config FILE; else kept if present; else
#                                                        a minimal server.ini / the client template
#   /var/lib/mnedc (0700)                                state: leases, generated secret
#                                                        (OpenWrt: /etc/mnedc/state; /var is RAM)
#   /var/run/mnedc/NAME.pid, NAME.heartbeat              written by the daemon itself, like its
#                                                        control socket (server.sock, client.sock)
#   the service NAME (mnedc-server, mnedc-client)        procd or LSB script in /etc/init.d, or a
#                                                        systemd unit in /etc/systemd/system
#   /usr/local/sbin/mnedc-watchdog, run every minute     Debian: /etc/cron.d/mnedc;
#                                                        OpenWrt: /etc/crontabs/root
#   /etc/mnedc/install.manifest                          what to remove again (uninstall)
#
# --root DIR installs into DIR as if it were /: every path written into the generated files points
# inside DIR, nothing outside DIR is touched, and nothing is enabled or started (implies
# --no-start); the installed tree runs for real (tests use it). MNEDC_TUN_DEV overrides the TUN
# device checked for a client (default /dev/net/tun). Re-running is safe; uninstall keeps the
# state directory unless --purge.
set -u
umask 022

SRC_DIR=$(cd "$(dirname "$0")" && pwd) || exit 1
PYTHON_MIN_MAJOR=3
PYTHON_MIN_MINOR=7
TUN_DEV=${MNEDC_TUN_DEV:-/dev/net/tun}
USAGE="usage: install.sh server|client [--config FILE] [--prefix DIR] [--root DIR] [--init procd|sysv|systemd] [--no-start]
       install.sh uninstall [--root DIR] [--purge]"

ROOT=''             # '' is the real /
PREFIX=/usr/local
INIT=''
CONFIG_SRC=''
START=yes
PURGE=no
CHANGED=no          # did this run change an installed file? then a running service restarts
NEW_MANIFEST=''     # manifest lines this run adds, one per line
TEMP_FILES=''

die() {
	echo "install.sh: $*" >&2
	exit 1
}

note() {
	echo "install.sh: $*"
}

cleanup() {
	for temp in $TEMP_FILES; do
		rm -f "$temp"
	done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Shell-quote one value for the generated scripts: it is pasted between single quotes.
shquote() {
	printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

# ---- checks: refuse early, in one line that says what to do -------------------------------

check_root() {
	[ "$(id -u)" = 0 ] || die "must run as root (uid 0): run it with sudo, or as root on the router"
}

# Sets PYTHON to the absolute interpreter path the service will run (boot has no user PATH).
check_python() {
	found=$(command -v python3) ||
		die "python3 is missing: install it (Debian: apt-get install python3; OpenWrt: opkg update && opkg install python3-light)"
	version=$("$found" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
	major=${version%%.*}
	minor=${version#*.}
	case $major.$minor in
	[0-9]*.[0-9]*) ;;
	*) die "$found does not run (it printed '$version' for its version): install python3 3.7 or newer" ;;
	esac
	if [ "$major" -lt "$PYTHON_MIN_MAJOR" ] ||
		{ [ "$major" -eq "$PYTHON_MIN_MAJOR" ] && [ "$minor" -lt "$PYTHON_MIN_MINOR" ]; }; then
		die "$found is Python $version; MNEDC needs 3.7 or newer: upgrade python3 or put a newer one first on PATH"
	fi
	PYTHON=$("$found" -c 'import sys; print(sys.executable)' 2>/dev/null)
	[ -n "$PYTHON" ] || PYTHON=$found
}

# Import the script (importing has no side effects) to catch a python3 without the modules it
# needs, e.g. Debian's python3-minimal has no hmac.
check_modules() {
	output=$("$PYTHON" -B -c 'import sys; sys.path.insert(0, sys.argv[1]); __import__(sys.argv[2])' \
		"$SRC_DIR" "${SCRIPT%.py}" 2>&1) ||
		die "$PYTHON cannot load $SCRIPT ($(printf '%s\n' "$output" | tail -n 1)): install the full python3 (Debian: apt-get install python3; OpenWrt: opkg install python3-light)"
}

check_tun() {
	[ -c "$TUN_DEV" ] ||
		die "$TUN_DEV is missing, and the client needs TUN: load it (modprobe tun; OpenWrt: opkg install kmod-tun), or use stream mode, which needs no TUN: python3 mnedc_client.py -c CONF listen|connect (README)"
}

# ---- paths -----------------------------------------------------------------------------------

detect_init() {
	if [ -f "$ROOT/etc/openwrt_release" ] && [ -f "$ROOT/etc/rc.common" ]; then
		echo procd
	elif [ -d "$ROOT/run/systemd/system" ]; then
		echo systemd
	else
		echo sysv
	fi
}

set_paths() {
	SBIN_DIR=$ROOT$PREFIX/sbin
	ETC_DIR=$ROOT/etc/mnedc
	INIT_DIR=$ROOT/etc/init.d
	UNIT_DIR=$ROOT/etc/systemd/system
	RUN_DIR=$ROOT/var/run/mnedc
	MANIFEST=$ETC_DIR/install.manifest
	WATCHDOG=$SBIN_DIR/mnedc-watchdog
	SYSUPGRADE=$ROOT/etc/sysupgrade.conf
	if [ "$INIT" = procd ]; then
		STATE_DIR=$ETC_DIR/state                # OpenWrt's /var is in RAM: keep state on flash
		CRON_FILE=$ROOT/etc/crontabs/root
	else
		STATE_DIR=$ROOT/var/lib/mnedc
		CRON_FILE=$ROOT/etc/cron.d/mnedc
	fi
	if [ -n "${NAME:-}" ]; then
		CONFIG=$ETC_DIR/$CONFIG_NAME
		PIDFILE=$RUN_DIR/$NAME.pid
		HEARTBEAT=$RUN_DIR/$NAME.heartbeat
	fi
}

set_service() {
	case $1 in
	server)
		NAME=mnedc-server SCRIPT=mnedc_server.py CONFIG_NAME=server.ini
		TITLE="MNEDC relay server"
		;;
	client)
		NAME=mnedc-client SCRIPT=mnedc_client.py CONFIG_NAME=client-config.ini
		TITLE="MNEDC client (TUN)"
		;;
	esac
}

# ---- the manifest: what install added, so that uninstall removes exactly that ----------------
# Lines: "service NAME INIT PREFIX", "file PATH", "dir PATH" (created by install, removed when
# empty), "state PATH", "cron PATH", "sysupgrade PATH". PATH is relative to --root.

remember() {
	NEW_MANIFEST="$NEW_MANIFEST$1
"
}

rel() {
	printf '%s' "${1#"$ROOT"}"
}

write_manifest() {
	new_temp "$MANIFEST"
	{
		[ -f "$MANIFEST" ] && grep -v "^service $NAME " "$MANIFEST"
		printf '%s' "$NEW_MANIFEST"
	} | awk 'NF && !seen[$0]++' >"$TEMP"
	{ chmod 644 "$TEMP" && mv -f "$TEMP" "$MANIFEST"; } || die "cannot write $MANIFEST"
}

# TEMP: a new temporary file beside TARGET, removed on exit unless it was moved into place.
new_temp() {
	TEMP=$(mktemp "$(dirname "$1")/.mnedc.XXXXXX") || die "cannot write in $(dirname "$1")"
	TEMP_FILES="$TEMP_FILES $TEMP"
}

# mkdir -p that remembers each directory it created.
make_dir() {
	[ -d "$1" ] && return 0
	make_dir "$(dirname "$1")"
	mkdir "$1" || die "cannot create $1"
	remember "dir $(rel "$1")"
}

# Put SOURCE at TARGET with MODE, atomically; CHANGED=yes if the content differs.
place_file() {
	make_dir "$(dirname "$2")"
	if ! cmp -s "$1" "$2" 2>/dev/null; then
		new_temp "$2"
		{ cp "$1" "$TEMP" && chmod "$3" "$TEMP" && mv -f "$TEMP" "$2"; } || die "cannot write $2"
		CHANGED=yes
	fi
	chmod "$3" "$2" || die "cannot chmod $2"
}

# place_file, and uninstall removes TARGET.
put_file() {
	place_file "$@"
	remember "file $(rel "$2")"
}

# Write the output of the function GENERATOR to TARGET with MODE (through put_file).
put_generated() {
	make_dir "$(dirname "$2")"
	new_temp "$2"
	"$1" >"$TEMP" || die "cannot write $2"
	put_file "$TEMP" "$2" "$3"
}

# ---- generated files ---------------------------------------------------------------------------

server_ini() {
	cat <<EOF
# MNEDC relay server, written by install.sh. Every key: python3 mnedc_server.py --help
# At its first start the server generates the network secret in state_dir/secret and logs the
# lines each client needs (server = ..., secret = ...).
[server]
listen = 0.0.0.0:3334
subnet = 10.0.0.0/24
state_dir = $STATE_DIR
EOF
}

# The control socket (status, kick) lives in the run directory, which is where the daemons put
# it by default, and inside DIR with --root. @CONTROL@ in a command line becomes the flag.
detect_control() {
	CONTROL=$RUN_DIR/${NAME#mnedc-}.sock
}

fill_control() {
	if [ "${1:-}" = literal ]; then
		sed "s%@CONTROL@% --control $CONTROL%"
	else
		# shellcheck disable=SC2016 # "$CONTROL" is expanded by the generated script
		sed 's%@CONTROL@% --control "$CONTROL"%'
	fi
}

# The variables every generated script starts with.
script_settings() {
	echo "NAME=$NAME"
	echo "PYTHON=$(shquote "$PYTHON")"
	echo "SCRIPT=$(shquote "$SBIN_DIR/$SCRIPT")"
	echo "CONFIG=$(shquote "$CONFIG")"
	echo "RUN_DIR=$(shquote "$RUN_DIR")"
	echo "CONTROL=$(shquote "$CONTROL")"
	cat <<'EOF'
PIDFILE=$RUN_DIR/$NAME.pid
HEARTBEAT=$RUN_DIR/$NAME.heartbeat
EOF
}

sysv_script() {
	{
		cat <<EOF
#!/bin/sh
### BEGIN INIT INFO
# Provides:          $NAME
# Required-Start:    \$network \$remote_fs \$syslog
# Required-Stop:     \$network \$remote_fs \$syslog
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: $TITLE
### END INIT INFO
EOF
		cat <<'EOF'
# Written by install.sh. The daemon writes its own pidfile and touches its heartbeat file every
# 5 s; the cron watchdog (mnedc-watchdog) reads both. stop leaves the marker NAME.stopped so
# that the watchdog does not undo it; start removes it. Logs: syslog, ident mnedc-server/-client.
set -u
EOF
		script_settings
		cat <<'EOF'
STOPPED=$RUN_DIR/$NAME.stopped
START_WAIT_S=30
STOP_WAIT_S=10

# True if process $1 runs SCRIPT: /proc says so, not just kill -0 (pids get reused).
runs_script() {
	tr '\000' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qxF "$SCRIPT"
}

# Print the daemon's pid, if the pidfile names a live daemon.
running_pid() {
	pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
	case $pid in '' | *[!0-9]*) return 1 ;; esac
	runs_script "$pid" && echo "$pid"
}

nap() {
	sleep 0.2 2>/dev/null || sleep 1
}

do_start() {
	if pid=$(running_pid); then
		echo "$NAME is already running (pid $pid)"
		return 0
	fi
	mkdir -p "$RUN_DIR" && rm -f "$PIDFILE" "$STOPPED" || return 1
	set -- -u "$SCRIPT" -c "$CONFIG" --syslog --pidfile "$PIDFILE" --heartbeat "$HEARTBEAT"@CONTROL@
	if command -v start-stop-daemon >/dev/null 2>&1; then
		# No -m: the daemon writes the pidfile itself. -x names the interpreter, never the script.
		start-stop-daemon -S -b -p "$PIDFILE" -x "$PYTHON" -- "$@" </dev/null || return 1
	else
		(
			trap '' HUP
			cd / && exec "$PYTHON" "$@" </dev/null >/dev/null 2>&1
		) &
	fi
	waited=0
	while [ "$waited" -lt $((START_WAIT_S * 5)) ]; do
		if pid=$(running_pid); then
			echo "$NAME started (pid $pid)"
			return 0
		fi
		nap
		waited=$((waited + 1))
	done
	echo "$NAME did not start within $START_WAIT_S s: see the system log (logread, journalctl or /var/log/syslog)" >&2
	return 1
}

# Wait until process $1 no longer runs SCRIPT; false if it still does after $2 s.
wait_gone() {
	waited=0
	while runs_script "$1"; do
		[ "$waited" -lt $(($2 * 5)) ] || return 1
		nap
		waited=$((waited + 1))
	done
}

do_stop() {
	mkdir -p "$RUN_DIR" && : >"$STOPPED"
	if ! pid=$(running_pid); then
		rm -f "$PIDFILE"
		echo "$NAME is not running"
		return 0
	fi
	kill -TERM "$pid" 2>/dev/null
	kill -CONT "$pid" 2>/dev/null   # a stopped (SIGSTOP) process acts on TERM only once continued
	if ! wait_gone "$pid" "$STOP_WAIT_S"; then
		echo "$NAME (pid $pid) ignored SIGTERM for $STOP_WAIT_S s: killing it" >&2
		kill -KILL "$pid" 2>/dev/null
		wait_gone "$pid" "$STOP_WAIT_S" || return 1
	fi
	rm -f "$PIDFILE" "$HEARTBEAT"
	echo "$NAME stopped"
}

# LSB exit codes: 0 running, 1 dead but the pidfile exists, 3 not running.
do_status() {
	if pid=$(running_pid); then
		echo "$NAME is running (pid $pid)"
		return 0
	elif [ -f "$PIDFILE" ]; then
		echo "$NAME is not running, but its pidfile $PIDFILE exists"
		return 1
	fi
	echo "$NAME is not running"
	return 3
}

case ${1:-} in
start) do_start ;;
stop) do_stop ;;
restart | force-reload) do_stop && do_start ;;
status) do_status ;;
*)
	echo "usage: $0 start|stop|restart|force-reload|status" >&2
	exit 2
	;;
esac
EOF
	} | fill_control
}

procd_script() {
	{
		cat <<EOF
#!/bin/sh /etc/rc.common
# shellcheck shell=sh disable=SC2034
# $TITLE under procd, written by install.sh. procd restarts the daemon whenever it exits
# (respawn, never giving up) and logs its output (logread -e $NAME); the cron watchdog
# (mnedc-watchdog) restarts it when it hangs. stop leaves the marker NAME.stopped so that the
# watchdog does not undo it; start removes it.
USE_PROCD=1
START=90
STOP=10
EOF
		script_settings
		cat <<'EOF'

start_service() {
	mkdir -p "$RUN_DIR"
	rm -f "$RUN_DIR/$NAME.stopped"
	procd_open_instance
	procd_set_param command "$PYTHON" -u "$SCRIPT" -c "$CONFIG" --pidfile "$PIDFILE" --heartbeat "$HEARTBEAT"@CONTROL@
	procd_set_param respawn 3600 5 0
	procd_set_param stdout 1
	procd_set_param stderr 1
	procd_set_param pidfile "$PIDFILE"
	procd_set_param file "$CONFIG"
	procd_close_instance
}

stop_service() {
	mkdir -p "$RUN_DIR" && : >"$RUN_DIR/$NAME.stopped"
}
EOF
	} | fill_control
}

systemd_unit() {
	{
		cat <<EOF
# $TITLE, written by install.sh. Logs: journalctl -u $NAME
[Unit]
Description=$TITLE
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
ExecStartPre=/bin/mkdir -p $RUN_DIR
ExecStart=$PYTHON -u $SBIN_DIR/$SCRIPT -c $CONFIG --syslog --pidfile $PIDFILE --heartbeat $HEARTBEAT@CONTROL@
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
EOF
	} | fill_control literal
}

watchdog_script() {
	cat <<'EOF'
#!/bin/sh
# mnedc-watchdog NAME (mnedc-server or mnedc-client), written by install.sh and run every minute
# by cron. It restarts the service NAME through its init script (or systemctl) when
#   - its process is gone (no pidfile, or the pid in it is dead),
#   - its pidfile is stale: the pid now belongs to another program (/proc/PID/cmdline),
#   - it hangs: the heartbeat file its event loop touches every 5 s is older than
#     MNEDC_HEARTBEAT_MAX_S seconds (default 60); the hung (maybe SIGSTOPped) process is
#     killed with SIGKILL first.
# A service stopped on purpose (init script stop, install.sh --no-start; systemd: not active) is
# left alone. Runs never overlap: one that finds the lock taken exits at once. Each restart is
# logged with logger -t mnedc-watchdog and on stderr.
set -u
EOF
	echo "SBIN_DIR=$(shquote "$SBIN_DIR")"
	echo "RUN_DIR=$(shquote "$RUN_DIR")"
	echo "INIT_DIR=$(shquote "$INIT_DIR")"
	echo "UNIT_DIR=$(shquote "$UNIT_DIR")"
	cat <<'EOF'
HEARTBEAT_MAX_S=${MNEDC_HEARTBEAT_MAX_S:-60}
PATH=${PATH:+$PATH:}/usr/sbin:/usr/bin:/sbin:/bin

case ${1:-} in
mnedc-server) SCRIPT=$SBIN_DIR/mnedc_server.py ;;
mnedc-client) SCRIPT=$SBIN_DIR/mnedc_client.py ;;
*)
	echo "usage: $0 mnedc-server|mnedc-client" >&2
	exit 2
	;;
esac
NAME=$1
PIDFILE=$RUN_DIR/$NAME.pid
HEARTBEAT=$RUN_DIR/$NAME.heartbeat
case $HEARTBEAT_MAX_S in '' | *[!0-9]*) HEARTBEAT_MAX_S=60 ;; esac

say() {
	echo "mnedc-watchdog: $*" >&2
	logger -t mnedc-watchdog -p daemon.warning "$*" 2>/dev/null
}

runs_script() {
	tr '\000' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qxF "$SCRIPT"
}

nap() {
	sleep 0.2 2>/dev/null || sleep 1
}

if [ -x "$INIT_DIR/$NAME" ]; then
	[ -e "$RUN_DIR/$NAME.stopped" ] && exit 0
	restart_command() { "$INIT_DIR/$NAME" restart; }
elif [ -f "$UNIT_DIR/$NAME.service" ]; then
	systemctl is-active --quiet "$NAME" || exit 0   # stopped, or systemd is restarting it
	restart_command() { systemctl restart "$NAME"; }
else
	echo "mnedc-watchdog: $NAME is not installed (no $INIT_DIR/$NAME)" >&2
	exit 1
fi

mkdir -p "$RUN_DIR" || exit 1
exec 9>"$RUN_DIR/$NAME.lock" || exit 1
flock -n 9 || exit 0

restart() {
	say "$NAME $1: restarting it"
	restart_command 9>&- >&2   # fd 9 closed: the new daemon must not hold our lock
	status=$?
	pid=$(cat "$PIDFILE" 2>/dev/null)
	if [ "$status" -ne 0 ]; then
		say "$NAME: restart failed (status $status)"
		exit 1
	fi
	say "$NAME restarted (pid ${pid:-unknown})"
	exit 0
}

pid=$(cat "$PIDFILE" 2>/dev/null)
case $pid in
'') restart "is not running (no pidfile)" ;;
*[!0-9]*) restart "has a bad pidfile $PIDFILE" ;;
esac
if ! runs_script "$pid"; then
	other=$(tr '\000' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c 1-60 | sed 's/ *$//')
	[ -z "$other" ] || restart "is not running: its stale pidfile names pid $pid, which is another program ($other)"
	restart "is not running: process $pid is gone"
fi
beat=$(date -r "$HEARTBEAT" +%s 2>/dev/null) || exit 0   # starting, or no heartbeat: trust it
age=$(($(date +%s) - beat))
if [ "$age" -gt "$HEARTBEAT_MAX_S" ]; then
	kill -KILL "$pid" 2>/dev/null
	waited=0
	while runs_script "$pid" && [ "$waited" -lt 50 ]; do
		nap
		waited=$((waited + 1))
	done
	restart "hangs: no heartbeat for $age s (more than $HEARTBEAT_MAX_S); killed pid $pid with SIGKILL"
fi
exit 0
EOF
}

# ---- install -----------------------------------------------------------------------------------

install_config() {
	if [ -n "$CONFIG_SRC" ]; then
		put_file "$CONFIG_SRC" "$CONFIG" 600
	elif [ -f "$CONFIG" ]; then
		chmod 600 "$CONFIG"
		remember "file $(rel "$CONFIG")"
		note "keeping $CONFIG"
	elif [ "$NAME" = mnedc-server ]; then
		put_generated server_ini "$CONFIG" 600
	else
		put_file "$SRC_DIR/client-config.ini" "$CONFIG" 600
	fi
}

install_service() {
	case $INIT in
	procd) put_generated procd_script "$INIT_DIR/$NAME" 755 ;;
	sysv) put_generated sysv_script "$INIT_DIR/$NAME" 755 ;;
	systemd) put_generated systemd_unit "$UNIT_DIR/$NAME.service" 644 ;;
	esac
}

# Print the value of KEY in [SECTION] of the INI file FILE, or nothing.
ini_get() {
	"$PYTHON" - "$@" <<'EOF'
import configparser, sys
parser = configparser.ConfigParser(interpolation=None)
try:
    parser.read(sys.argv[1])
    print(parser.get(sys.argv[2], sys.argv[3], fallback="").strip())
except configparser.Error:
    print("")
EOF
}

# What the client config still lacks ("server", "secret"), or nothing when it can run.
client_config_missing() {
	missing=''
	[ -n "$(ini_get "$CONFIG" client server)" ] || missing='server'
	if [ -z "$(ini_get "$CONFIG" client secret)$(ini_get "$CONFIG" client secret_file)" ]; then
		missing="${missing:+$missing and }secret"
	fi
	echo "$missing"
}

# OpenWrt keeps /var in RAM: a state_dir there loses the secret and the leases at every reboot.
warn_volatile_state() {
	state=$(ini_get "$CONFIG" server state_dir)
	state=${state:-/var/lib/mnedc}
	case ${state#"$ROOT"} in
	/var/* | /tmp/*)
		note "warning: state_dir $state is in RAM on OpenWrt: set state_dir = $STATE_DIR in $CONFIG, or the secret and leases are lost at every reboot"
		;;
	esac
}

# One watchdog line per service in the cron file; other lines are kept. No % in crontab lines.
install_cron_line() {
	make_dir "$(dirname "$CRON_FILE")"
	new_temp "$CRON_FILE"
	temp=$TEMP
	if [ "$INIT" = procd ]; then
		{
			[ -f "$CRON_FILE" ] && grep -v "/mnedc-watchdog $NAME\$" "$CRON_FILE"
			echo "* * * * * $WATCHDOG $NAME"
		} >"$temp"
	else
		{
			echo "# MNEDC watchdog, written by install.sh: restarts a dead or hung MNEDC daemon."
			echo "SHELL=/bin/sh"
			echo "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
			[ -f "$CRON_FILE" ] && grep '/mnedc-watchdog ' "$CRON_FILE" | grep -v "/mnedc-watchdog $NAME\$"
			echo "* * * * * root $WATCHDOG $NAME"
		} >"$temp"
	fi
	place_file "$temp" "$CRON_FILE" 644
	chown 0:0 "$CRON_FILE"
	remember "cron $(rel "$CRON_FILE")"
	if [ -n "$ROOT" ]; then
		return 0
	elif [ "$INIT" = procd ]; then
		{ /etc/init.d/cron enable && /etc/init.d/cron restart; } >/dev/null 2>&1 ||
			note "warning: could not enable cron, so the watchdog will not run: /etc/init.d/cron enable; /etc/init.d/cron start"
	elif ! command -v cron >/dev/null 2>&1 && ! command -v crond >/dev/null 2>&1; then
		note "warning: no cron daemon found, so the watchdog will not run: install cron (apt-get install cron)"
	fi
}

# Remove the watchdog line of service $1 from cron file $2. Our /etc/cron.d/mnedc goes when no
# watchdog line is left; a shared crontab only when nothing is left in it.
remove_cron_line() {
	[ -f "$2" ] || return 0
	new_temp "$2"
	temp=$TEMP
	grep -v "/mnedc-watchdog $1\$" "$2" >"$temp"
	case $2 in
	*/cron.d/mnedc) keep='/mnedc-watchdog ' ;;
	*) keep='[^[:space:]]' ;;
	esac
	if grep -q "$keep" "$temp"; then
		place_file "$temp" "$2" 644
	else
		rm -f "$2"
	fi
	rm -f "$temp"
}

# OpenWrt's sysupgrade keeps only the files listed in /etc/sysupgrade.conf (and package files).
install_sysupgrade() {
	for keep in "$ETC_DIR/" "$SBIN_DIR/$SCRIPT" "$WATCHDOG" "$INIT_DIR/$NAME"; do
		if ! { [ -f "$SYSUPGRADE" ] && grep -qxF "$keep" "$SYSUPGRADE"; }; then
			make_dir "$(dirname "$SYSUPGRADE")"
			echo "$keep" >>"$SYSUPGRADE" || die "cannot write $SYSUPGRADE"
		fi
		remember "sysupgrade $(rel "$keep")"
	done
}

# Tell the watchdog to leave the service alone (until it is started), unless it runs already.
mark_stopped() {
	daemon_pid "$PIDFILE" "$SBIN_DIR/$SCRIPT" >/dev/null || : >"$RUN_DIR/$NAME.stopped"
}

control_hint() {
	if [ "$INIT" = systemd ]; then
		echo "systemctl start|stop|restart|status $NAME"
	else
		echo "$INIT_DIR/$NAME start|stop|restart|status"
	fi
}

# Enable at boot and (re)start, as the init system does it. Never under --root.
activate() {
	if [ -n "$ROOT" ]; then
		mark_stopped
		note "$NAME is neither enabled nor started (--root); run it with: $(control_hint)"
		return 0
	fi
	case $INIT in
	procd) "$INIT_DIR/$NAME" enable ;;
	systemd) systemctl daemon-reload && systemctl enable "$NAME" 2>/dev/null ;;
	sysv)
		if command -v update-rc.d >/dev/null 2>&1; then
			update-rc.d "$NAME" defaults >/dev/null
		else
			note "no update-rc.d here: have $INIT_DIR/$NAME start run at boot (e.g. from /etc/rc.local)"
		fi
		;;
	esac || note "warning: could not enable $NAME at boot"
	if [ "$START" = no ]; then
		[ "$INIT" = systemd ] || mark_stopped
		note "$NAME is not started (--no-start); start it with: $(control_hint)"
		return 0
	fi
	action=start
	[ "$CHANGED" = yes ] && action=restart
	if [ "$INIT" = systemd ]; then
		systemctl "$action" "$NAME" || die "$NAME did not start: see journalctl -u $NAME"
	else
		"$INIT_DIR/$NAME" "$action" || die "$NAME did not start: see the system log (logread or /var/log/syslog)"
	fi
}

# Refuse to install over an installation with another init system or prefix.
check_previous() {
	[ -f "$MANIFEST" ] || return 0
	previous=$(grep "^service $NAME " "$MANIFEST") || return 0
	[ "$previous" = "service $NAME $INIT $PREFIX" ] ||
		die "$NAME is installed already as '${previous#service }' (init, prefix): run install.sh uninstall first"
}

cmd_install() {
	set_service "$1"
	check_python
	check_modules
	[ "$NAME" = mnedc-client ] && check_tun
	if [ -n "$CONFIG_SRC" ]; then
		[ -f "$CONFIG_SRC" ] || die "--config $CONFIG_SRC: no such file"
	fi
	[ -n "$INIT" ] || INIT=$(detect_init)
	set_paths
	detect_control
	check_previous
	if [ -f "$STATE_DIR/install.manifest" ]; then
		NEW_MANIFEST=$(cat "$STATE_DIR/install.manifest")
		NEW_MANIFEST="$NEW_MANIFEST
"
	fi

	make_dir "$ETC_DIR"
	make_dir "$(dirname "$STATE_DIR")"   # the state dir itself is a "state" line, not a "dir"
	[ -d "$STATE_DIR" ] || mkdir "$STATE_DIR" || die "cannot create $STATE_DIR"
	chmod 700 "$STATE_DIR" || die "cannot chmod $STATE_DIR"
	remember "state $(rel "$STATE_DIR")"
	make_dir "$RUN_DIR"
	put_file "$SRC_DIR/$SCRIPT" "$SBIN_DIR/$SCRIPT" 755
	put_generated watchdog_script "$WATCHDOG" 755
	install_config
	install_service
	[ "$INIT" = procd ] && install_sysupgrade

	missing=''
	[ "$NAME" = mnedc-client ] && missing=$(client_config_missing)
	[ "$NAME" = mnedc-server ] && [ "$INIT" = procd ] && warn_volatile_state
	if [ -z "$missing" ]; then
		install_cron_line
	else
		remove_cron_line "$NAME" "$CRON_FILE"
	fi
	remember "service $NAME $INIT $PREFIX"
	write_manifest
	rm -f "$STATE_DIR/install.manifest"

	note "installed $NAME ($INIT): $SBIN_DIR/$SCRIPT, config $CONFIG, state $STATE_DIR"
	if [ -n "$missing" ]; then
		note "$NAME is not enabled: set $missing in $CONFIG (the server logs both at its first start), then run install.sh client again"
		return 0
	fi
	note "watchdog: $WATCHDOG $NAME, every minute from $CRON_FILE"
	activate
	if [ "$NAME" = mnedc-server ]; then
		note "clients need: server = THIS-HOST:3334 and the secret from $STATE_DIR/secret (generated at the first start)"
	fi
}

# ---- uninstall ---------------------------------------------------------------------------------

# True if process $1 runs the script $2 (/proc/PID/cmdline: pids get reused).
pid_runs() {
	tr '\000' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qxF "$2"
}

# Print the pid in pidfile $1 if that process runs the script $2.
daemon_pid() {
	pid=$(cat "$1" 2>/dev/null) || return 1
	case $pid in '' | *[!0-9]*) return 1 ;; esac
	pid_runs "$pid" "$2" && echo "$pid"
}

# Stop the daemon named in pidfile $1 if it runs script $2 (covers --root, where no init runs).
kill_by_pidfile() {
	pid=$(daemon_pid "$1" "$2") || return 0
	for signal in TERM KILL; do
		kill -"$signal" "$pid" 2>/dev/null
		kill -CONT "$pid" 2>/dev/null
		waited=0
		while pid_runs "$pid" "$2"; do
			[ "$waited" -lt 50 ] || break
			sleep 0.2 2>/dev/null || sleep 1
			waited=$((waited + 1))
		done
		pid_runs "$pid" "$2" || return 0
	done
}

# Stop and disable service $1 (init $2, prefix $3).
remove_service() {
	case $1 in
	mnedc-server) script=mnedc_server.py ;;
	mnedc-client) script=mnedc_client.py ;;
	*) return 0 ;;
	esac
	if [ -z "$ROOT" ]; then
		case $2 in
		procd) "$INIT_DIR/$1" stop && "$INIT_DIR/$1" disable ;;
		systemd) systemctl disable --now "$1" 2>/dev/null ;;
		sysv)
			"$INIT_DIR/$1" stop
			if command -v update-rc.d >/dev/null 2>&1; then
				update-rc.d -f "$1" remove >/dev/null
			fi
			;;
		esac
	fi
	kill_by_pidfile "$RUN_DIR/$1.pid" "$ROOT$3/sbin/$script"
	for suffix in pid heartbeat lock stopped; do
		rm -f "$RUN_DIR/$1.$suffix"
	done
	rm -f "$RUN_DIR/${1#mnedc-}.sock"   # the control socket, if a killed daemon left it
	note "removed the service $1"
}

remove_sysupgrade_line() {
	[ -f "$SYSUPGRADE" ] || return 0
	new_temp "$SYSUPGRADE"
	temp=$TEMP
	grep -vxF "$1" "$SYSUPGRADE" >"$temp"
	if grep -q '[^[:space:]]' "$temp"; then
		place_file "$temp" "$SYSUPGRADE" 644
	else
		rm -f "$SYSUPGRADE"
	fi
	rm -f "$temp"
}

# The manifest, and what a plain uninstall left in a state directory (its "state" and "dir" lines).
read_manifest() {
	[ -f "$MANIFEST" ] && cat "$MANIFEST"
	for kept in "$ROOT/var/lib/mnedc" "$ETC_DIR/state"; do
		[ -f "$kept/install.manifest" ] && cat "$kept/install.manifest"
	done
}

cmd_uninstall() {
	set_paths
	manifest=$(read_manifest)
	if [ -z "$manifest" ]; then
		note "nothing to uninstall: no $MANIFEST"
		return 0
	elif [ ! -f "$MANIFEST" ] && [ "$PURGE" = no ]; then
		note "nothing to uninstall but the state (install.sh uninstall --purge removes it)"
		return 0
	fi
	while read -r kind name init prefix; do
		[ "$kind" = service ] && remove_service "$name" "$init" "$prefix"
	done <<EOF
$manifest
EOF
	kept=''
	while read -r kind path; do
		case $kind in
		cron)
			remove_cron_line mnedc-server "$ROOT$path"
			remove_cron_line mnedc-client "$ROOT$path"
			;;
		sysupgrade) remove_sysupgrade_line "$ROOT$path" ;;
		file) rm -f "$ROOT$path" ;;
		state)
			rm -f "$ROOT$path/install.manifest"
			if [ "$PURGE" = yes ]; then
				rm -rf "$ROOT$path"
			elif [ -d "$ROOT$path" ]; then
				kept=$path
			fi
			;;
		esac
	done <<EOF
$manifest
EOF
	rm -f "$MANIFEST"
	if [ -z "$ROOT" ]; then
		[ -d /run/systemd/system ] && systemctl daemon-reload
		[ -x /etc/init.d/cron ] && [ -f /etc/openwrt_release ] && /etc/init.d/cron restart >/dev/null 2>&1
	fi
	# Directories last, deepest first (reverse order of creation); only empty ones go.
	while read -r kind path; do
		[ "$kind" = dir ] && rmdir "$ROOT$path" 2>/dev/null
	done <<EOF
$(printf '%s\n' "$manifest" | sed -n '1!G;h;$p')
EOF
	if [ -z "$kept" ]; then
		note "uninstalled MNEDC"
		return 0
	fi
	# Remember the kept state and the directories around it, for a later uninstall --purge.
	while read -r kind path; do
		[ "$kind" = state ] || [ "$kind" = dir ] || continue
		[ -d "$ROOT$path" ] && echo "$kind $path"
	done >"$ROOT$kept/install.manifest" <<EOF
$manifest
EOF
	note "uninstalled MNEDC; kept the state (secret, leases) in $ROOT$kept: install.sh uninstall --purge removes it"
}

# ---- command line ------------------------------------------------------------------------------

# Print the value of an option ($1) taken from its next argument ($2); fail if there is none.
need_value() {
	if [ $# -lt 2 ] || [ -z "$2" ]; then
		die "$1 needs a value"
	fi
	printf '%s' "$2"
}

main() {
	action=${1:-}
	install_option=''
	[ $# -gt 0 ] && shift
	case $action in
	server | client | uninstall) ;;
	-h | --help)
		echo "$USAGE"
		return 0
		;;
	*) die "$USAGE" ;;
	esac
	check_root
	while [ $# -gt 0 ]; do
		case $1 in
		--config) install_option=$1 CONFIG_SRC=$(need_value "$@") || exit 1; shift ;;
		--prefix) install_option=$1 PREFIX=$(need_value "$@") || exit 1; shift ;;
		--root) ROOT=$(need_value "$@") || exit 1; shift ;;
		--init) install_option=$1 INIT=$(need_value "$@") || exit 1; shift ;;
		--no-start) install_option=$1 START=no ;;
		--purge) PURGE=yes ;;
		*) die "unknown option $1; $USAGE" ;;
		esac
		shift
	done
	if [ "$action" = uninstall ] && [ -n "$install_option" ]; then
		die "uninstall takes only --root and --purge, not $install_option"
	fi
	[ "$PURGE" = no ] || [ "$action" = uninstall ] || die "--purge is for uninstall"
	case $INIT in
	'' | procd | sysv | systemd) ;;
	*) die "--init $INIT: must be procd, sysv or systemd" ;;
	esac
	case $PREFIX in
	/*) PREFIX=${PREFIX%/} ;;
	*) die "--prefix $PREFIX: must be an absolute path" ;;
	esac
	if [ -n "$ROOT" ]; then
		[ -d "$ROOT" ] || die "--root $ROOT: no such directory"
		ROOT=$(cd "$ROOT" && pwd) || exit 1
		[ "$ROOT" = / ] && ROOT=''
	fi
	case $ROOT$PREFIX in
	*[[:space:]\'\"%\\]*) die "--root and --prefix must not contain blanks, quotes, % or backslashes (cron lines and units carry them)" ;;
	esac
	case $CONFIG_SRC in
	'' | /*) ;;
	*) CONFIG_SRC=$(pwd)/$CONFIG_SRC ;;
	esac
	if [ "$action" = uninstall ]; then
		cmd_uninstall
	else
		cmd_install "$action"
	fi
}

main "$@"
