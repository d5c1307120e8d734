#!/bin/sh
# Run the whole MNEDC test suite. As root it also runs the namespace, TUN and NAT tests
# (non-root, those are skipped with the reason). Installs what it needs when missing.
set -u
cd "$(dirname "$0")" || exit 1
# shellcheck disable=SC2046 # the list is words: split it on purpose
tools/ensure-deps.sh --pytest $(grep -v '^#' tests/tools.txt) || echo "test.sh: some tools are missing; tests that need them will say so (under CI=true they fail)" >&2
exec python3 -m pytest -q -rs tests "$@"
