"""Shared test setup: the project root on sys.path, the scripts importable as modules."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


IN_CI = os.environ.get("CI") == "true"


def required_tools():
    """The commands the suite runs (tests/tools.txt, which test.sh installs)."""
    with open(os.path.join(ROOT, "tests", "tools.txt")) as source:
        return [word for line in source if not line.startswith("#") for word in line.split()]


def pytest_sessionstart(session):
    """In CI (CI=true, as root) a missing namespace/TUN capability or tool is an error, not a skip."""
    if IN_CI:
        import pytest
        import shutil
        from tests.nettopo import have_netns_support
        ok, why = have_netns_support()
        if not ok:
            pytest.exit("CI must run the root tests, but: %s" % why, returncode=3)
        missing = [tool for tool in required_tools() if shutil.which(tool) is None]
        if missing:
            pytest.exit("CI must run every test, but these tools are missing: %s (tests/tools.txt; "
                        "test.sh installs them)" % " ".join(missing), returncode=3)


def pytest_runtest_makereport(item, call):
    """In CI a skipped test is a failed one: nothing a user relies on may go untested there."""
    if IN_CI and call.excinfo is not None and call.excinfo.typename == "Skipped":
        from _pytest.reports import TestReport
        report = TestReport.from_item_and_call(item, call)
        report.outcome = "failed"
        report.longrepr = "skipped under CI: %s" % call.excinfo.value
        return report
    return None


SUMMARY = []    # (title, lines) that tests report after the run, e.g. tests/test_soak.py


def pytest_terminal_summary(terminalreporter):
    """Print the reports in SUMMARY at the end, whatever -r, -s or -q say."""
    for title, lines in SUMMARY:
        terminalreporter.write_sep("-", title)
        for line in lines:
            terminalreporter.write_line(line)
