#!/usr/bin/env python3
"""Set up and run, on a fresh machine with only Python 3 (>= 3.10):

    python3 dev.py demo      # the demo, end to end
    python3 dev.py test      # every test session (nox), each in its own venv
    python3 dev.py results   # the runs of docs/results.md into runs/results (under 30 minutes)

``test`` runs the sessions in two lanes at once (a 2-core machine does both in
little more than the longer lane's time): the first lane prints as it goes, the
second writes ``.nox/lane-2.log`` and prints it when it ends. ``--serial`` runs
them one after another. Extra arguments go to nox, e.g. ``python3 dev.py test
-s torch`` (one nox run, no lanes) or ``python3 dev.py test -- --durations=10``
(pytest's). The first
run creates ``.venv-tools`` with nox and uv (pinned in constraints.txt); nox then
builds one virtual environment per session under ``.nox`` with uv, whose shared
cache installs each framework once rather than once per session.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TOOLS = ROOT / ".venv-tools"
#: the default sessions split in two lanes of about equal length (15 minutes each on 2 cores)
LANES = (("lint", "numpy", "array_api_strict", "torch", "jax"), ("tensorflow", "conformance", "experiments", "hf"))


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


def _default_sessions() -> list[str]:
    """``nox.options.sessions`` of the noxfile, read without importing nox."""
    for node in ast.walk(ast.parse((ROOT / "noxfile.py").read_text())):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "nox.options.sessions":
            return list(ast.literal_eval(node.value))
    raise SystemExit("dev.py: noxfile.py sets no nox.options.sessions")


def _lanes(nox: list[str], rest: list[str]) -> int:
    """Run the default sessions in :data:`LANES`, concurrently; the exit status is the worse lane's."""
    listed = [s for lane in LANES for s in lane]
    if sorted(listed) != sorted(_default_sessions()):
        raise SystemExit(f"dev.py: LANES {listed} differ from noxfile's sessions {_default_sessions()}")
    log = ROOT / ".nox" / "lane-2.log"
    log.parent.mkdir(exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as out:
        second = subprocess.Popen([*nox, "-s", *LANES[1], *rest], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        first = subprocess.run([*nox, "-s", *LANES[0], *rest], cwd=ROOT).returncode
        first_s = time.monotonic() - start
        second_rc = second.wait()
    print(f"\n===== lane 2 ({', '.join(LANES[1])}), from {log.relative_to(ROOT)} =====", flush=True)
    print(log.read_text(), flush=True)
    print(f"dev.py: lane 1 ({', '.join(LANES[0])}) rc {first} in {first_s:.0f} s; "
          f"lane 2 rc {second_rc}; both in {time.monotonic() - start:.0f} s", flush=True)
    return first or second_rc


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 (dev.py must explain itself on an old Python)
        print("dev.py: Python >= 3.10 is needed", file=sys.stderr)
        return 2
    if not argv or argv[0] not in ("demo", "test", "results"):
        print(__doc__.strip())
        return 2
    command, rest = argv[0], argv[1:]
    serial = "--serial" in rest
    rest = [a for a in rest if a != "--serial"]
    nox = [str(_tools_python()), "-m", "nox", "--noxfile", str(ROOT / "noxfile.py")]
    if command in ("demo", "results"):
        return subprocess.run([*nox, "-s", command, *rest], cwd=ROOT).returncode
    options = rest[: rest.index("--")] if "--" in rest else rest
    if serial or options:  # sessions or other nox options chosen: one plain nox run
        return subprocess.run([*nox, *rest], cwd=ROOT).returncode
    return _lanes(nox, rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
