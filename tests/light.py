"""Run the real scripts as on OpenWrt's python3-light: the interpreters and the environment.

tests/python3_light/sitecustomize.py, put first on PYTHONPATH, makes any interpreter refuse the
modules OpenWrt ships apart from python3-light (../shared/PLATFORMS.md), so the idna trap and
a missing ssl, logging or unicodedata show up as they do on a board.
"""

import os

from tests.conftest import ROOT
from tests.interpreters import interpreters

SIMULATION = os.path.join(ROOT, "tests", "python3_light")


def light_env(packages=(), pythonpath=()):
    """os.environ with the simulation on; packages: split-out opkg packages to count as installed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SIMULATION] + list(pythonpath)))
    env["PYTHON3_LIGHT_PACKAGES"] = " ".join(packages)
    return env


def light_pythons():
    """{"3.7": path, "3.13": path}: the floor and the newest Python here, the two ends boards run."""
    found = interpreters()
    versions = sorted(found, key=lambda version: int(version.split(".")[1]))
    return {version: found[version] for version in {versions[0], versions[-1]}}
