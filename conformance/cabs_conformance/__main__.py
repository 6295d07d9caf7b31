"""python -m cabs_conformance --backend NAME [--vectors FILE ...]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .backends import BACKENDS, get_backend
from .runner import VectorFormatError, builtin_vectors, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cabs_conformance",
        description="Run CABS conformance vectors through cabs_core on one array backend.",
    )
    p.add_argument("--backend", choices=BACKENDS, default="numpy", help="array library (default: numpy)")
    p.add_argument(
        "--vectors",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="vector files or folders of *.json (default: the vectors shipped with this package)",
    )
    args = p.parse_args(argv)
    paths = builtin_vectors()
    if args.vectors:
        paths = []
        for v in args.vectors:
            if not v.exists():
                p.error(f"no such vector file or folder: {v}")
            paths += sorted(v.glob("*.json")) if v.is_dir() else [v]
        if not paths:
            p.error("no *.json vector files found in " + ", ".join(map(str, args.vectors)))
    try:
        backend = get_backend(args.backend)
    except ImportError as e:
        p.error(f"backend {args.backend!r} is not installed ({e})")

    failed = total = 0
    width = max(len(path.stem) for path in paths)
    print(f"backend: {args.backend}")
    print(f"{'vector':<{width}}  {'kind':<10}  {'checked':>7}  result")
    try:
        for r in run(paths, backend):
            total += 1
            failed += not r.passed
            status = "PASS" if r.passed else f"FAIL  {r.detail}"
            print(f"{r.name:<{width}}  {r.kind:<10}  {r.checked:>7}  {status}")
    except VectorFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{total - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
