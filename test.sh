#!/bin/sh
# Run the whole MNEDC test suite. As root it also runs the namespace, TUN and NAT tests
# (non-root, those are skipped with the reason). Installs what it needs when missing.
set -u
cd "$(dirname "$0")" || exit 1
tools/ensure-deps.sh --pytest ip ss iptables ping nc shellcheck busybox sshd ssh iperf3 openvpn openssl || echo "test.sh: some tools are missing; tests that need them will say so" >&2
exec python3 -m pytest -q -rs tests "$@"
