"""Makes this interpreter look like OpenWrt's python3-light (../shared/PLATFORMS.md).

On PYTHONPATH, Python's site module imports this file at start. It refuses every module that
OpenWrt splits out of python3-light into a package of its own, as an ImportError that names the
opkg package, the way the board fails. So `import ssl` fails on `_ssl`, hashlib falls back to the
builtin SHA modules, and `socket.getaddrinfo("127.0.0.1", ...)` raises LookupError, because the
idna codec imports unicodedata (the idna trap).
"""

import os
import sys

SPLIT_OUT = {
    "logging": "python3-logging",
    "_ssl": "python3-openssl", "_hashlib": "python3-openssl",
    "unicodedata": "python3-codecs",
    "email": "python3-email", "urllib": "python3-urllib", "asyncio": "python3-asyncio",
    "ctypes": "python3-ctypes", "_ctypes": "python3-ctypes",
    "multiprocessing": "python3-multiprocessing", "unittest": "python3-unittest",
    "decimal": "python3-decimal", "_decimal": "python3-decimal", "_pydecimal": "python3-decimal",
    "xml": "python3-xml", "pyexpat": "python3-xml",
    "sqlite3": "python3-sqlite3", "_sqlite3": "python3-sqlite3",
    "dbm": "python3-dbm", "lzma": "python3-lzma", "_lzma": "python3-lzma",
    "curses": "python3-ncurses", "_curses": "python3-ncurses", "readline": "python3-readline",
    "pydoc": "python3-pydoc", "uuid": "python3-uuid", "_uuid": "python3-uuid",
    "venv": "python3-venv", "cgi": "python3-cgi", "distutils": "python3-distutils",
    "lib2to3": "python3-lib2to3",
}


class SplitOutModules:
    """A meta-path finder that refuses the split-out modules before any other finder sees them."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        package = SPLIT_OUT.get(name.split(".")[0])
        if package is not None:
            raise ImportError("No module named %r (python3-light: opkg install %s)" % (name, package),
                              name=name)
        return None


def install():
    """PYTHON3_LIGHT_PACKAGES="python3-openssl ..." names split-out packages that are installed;
    PYTHON3_LIGHT_ALSO_MISSING="json ..." names more modules to refuse."""
    for package in os.environ.get("PYTHON3_LIGHT_PACKAGES", "").split():
        for name in [name for name, owner in SPLIT_OUT.items() if owner == package]:
            del SPLIT_OUT[name]
    for name in os.environ.get("PYTHON3_LIGHT_ALSO_MISSING", "").split():
        SPLIT_OUT[name] = "(a test removed it)"
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in SPLIT_OUT)
    if loaded:
        raise SystemExit("python3-light simulation: already imported at start: %s" % ", ".join(loaded))
    sys.meta_path.insert(0, SplitOutModules)


install()
