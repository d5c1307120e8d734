#!/bin/sh
# One-command MNEDC demo on one machine (needs root): builds a multi-level-NAT network in
# namespaces, runs the real server and clients on it, shows them reaching each other, cleans up.
set -u
cd "$(dirname "$0")" || exit 1
tools/ensure-deps.sh ip ss iptables ping nc || exit 1
exec python3 tools/demo.py
