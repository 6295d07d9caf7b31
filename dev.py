#!/usr/bin/env python3
"""Set up and run, on a fresh machine with only Python 3 (>= 3.10):

    python3 dev.py demo      # the demo, end to end
    python3 dev.py test      # every test session (nox), each in its own venv
    python3 dev.py results   # the runs of docs/results.md into runs/results (under 30 minutes)

Extra arguments go to nox, e.g. ``python3 dev.py test -s torch``. The first
run creates ``.venv-tools`` with nox and uv (pinned in constraints.txt); nox then
builds one virtual environment per session under ``.nox`` with uv, whose shared
cache installs each framework once rather than once per session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TOOLS = ROOT / ".venv-tools"


def _works(py: Path, module: str) -> bool:
    return py.exists() and subprocess.run([str(py), "-c", f"import {module}"], capture_output=True).returncode == 0


def _tools_python() -> Path:
    py = TOOLS / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if _works(py, "nox") and _works(py, "uv"):
        return py
    if not _works(py, "pip"):  # absent, or left half-made by an interrupted first run
        print(f"dev.py: creating {TOOLS.name} with nox", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(TOOLS)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), "nox", "uv"],
                   check=True)
    return py


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 (dev.py must explain itself on an old Python)
        print("dev.py: Python >= 3.10 is needed", file=sys.stderr)
        return 2
    if not argv or argv[0] not in ("demo", "test", "results"):
        print(__doc__.strip())
        return 2
    command, rest = argv[0], argv[1:]
    sessions = ["-s", command] if command in ("demo", "results") else []
    nox = [str(_tools_python()), "-m", "nox", "--noxfile", str(ROOT / "noxfile.py"), *sessions, *rest]
    return subprocess.run(nox, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
