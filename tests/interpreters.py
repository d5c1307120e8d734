"""The Python interpreters on this machine that the scripts must run on (3.7 and newer)."""

import glob
import os
import subprocess
import sys


def pyenv_root():
    try:
        return subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.path.expanduser("~/.pyenv")


def interpreters():
    """{"3.7": path, ...}: one per minor version from 3.7 up, from pyenv and this interpreter."""
    found = {"%d.%d" % sys.version_info[:2]: sys.executable}
    for path in sorted(glob.glob(os.path.join(pyenv_root(), "versions", "3.*", "bin", "python3.*"))):
        minor = os.path.basename(path)[len("python"):]
        if minor.count(".") == 1 and minor.replace(".", "").isdigit() and int(minor.split(".")[1]) >= 7:
            found.setdefault(minor, path)
    return dict(sorted(found.items(), key=lambda item: int(item[0].split(".")[1])))
