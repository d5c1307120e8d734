"""Shared test setup: the project root on sys.path, the scripts importable as modules."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_sessionstart(session):
    """In CI (CI=true, as root) a missing namespace/TUN capability is an error, not a skip."""
    if os.environ.get("CI") == "true":
        from tests.nettopo import have_netns_support
        ok, why = have_netns_support()
        if not ok:
            import pytest
            pytest.exit("CI must run the root tests, but: %s" % why, returncode=3)


SUMMARY = []    # (title, lines) that tests report after the run, e.g. tests/test_soak.py


def pytest_terminal_summary(terminalreporter):
    """Print the reports in SUMMARY at the end, whatever -r, -s or -q say."""
    for title, lines in SUMMARY:
        terminalreporter.write_sep("-", title)
        for line in lines:
            terminalreporter.write_line(line)
