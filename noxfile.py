"""Test sessions, one virtual environment each: ``python3 dev.py test`` runs them all.

numpy, array_api_strict, torch, jax, tensorflow: the core tests on that
library's arrays, plus the framework's adapter tests (run in a separate
pytest process, so that the core tests' float64 settings don't leak).
conformance: every backend in one environment, the vectors through each.
experiments: the experiment command end to end on every framework.
hf: Hugging Face transformers (held-out architectures) on the torch adapter, against the loop.
keras_hub: a keras-hub GPT-2 on the TF adapter (optional: not in the defaults).
timm: timm vision models on the torch adapter (optional: torch 2.14.1, beside the torchvision it needs).
lint: ruff, and mypy on cabs_core. demo: the README's demo (the default experiment).
results: the runs of docs/results.md (not a test; not in the defaults; under 30 minutes).
bench: the torch statistics benchmark beside BackPACK and Opacus (not a test).
All installs are pinned by constraints.txt (CPU builds of the frameworks).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "numpy", "array_api_strict", "torch", "jax", "tensorflow", "conformance", "experiments",
                        "hf"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "uv|venv"  # uv: one shared cache, hard links

PYTHON = None  # the interpreter nox runs on (>= 3.10)
CONSTRAINTS = ("-c", "constraints.txt")
PYTEST = ("python", "-m", "pytest", "-p", "no:cacheprovider", "--import-mode=importlib", "-q")
BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "tensorflow")


def _find_links() -> tuple[str, ...]:
    """pip's local wheel folders (PIP_FIND_LINKS, e.g. the CPU build of torch), which uv does not read."""
    if os.environ.get("UV_FIND_LINKS"):
        return ()
    dirs = os.environ.get("PIP_FIND_LINKS", "")
    if not dirs:  # pip's configuration files
        got = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                             capture_output=True, text=True)
        dirs = got.stdout if got.returncode == 0 else ""
    return tuple(f"--find-links={d}" for d in dirs.split() if Path(d).exists())


def _install(session: nox.Session, *args: str) -> None:
    """pip-compatible install pinned by constraints.txt (uv, or pip without uv)."""
    links = _find_links() if session.venv_backend == "uv" else ()
    session.install(*CONSTRAINTS, *links, *args)


def _install_extras(session: nox.Session, extras: str) -> None:
    _install(session, f".[{extras}]")


def _adapter_tests(session: nox.Session, folder: str) -> None:
    """Run an adapter's tests when its folder has any (they land with their issues)."""
    if any(Path("tests", folder).glob("test_*.py")):
        session.run(*PYTEST, f"tests/{folder}", *session.posargs)


@nox.session(python=PYTHON)
def numpy(session: nox.Session) -> None:
    """Core tests on NumPy arrays, plus the conformance runner's own tests."""
    _install_extras(session, "dev")
    session.run(*PYTEST, "tests/core", "tests/conformance", "--backends=numpy", *session.posargs)


@nox.session(python=PYTHON)
def array_api_strict(session: nox.Session) -> None:
    """Core tests on array-api-strict: catches anything outside the standard."""
    _install_extras(session, "dev")
    session.run(*PYTEST, "tests/core", "--backends=array_api_strict", *session.posargs)


@nox.session(python=PYTHON)
def torch(session: nox.Session) -> None:
    """Core tests on torch tensors, then the PyTorch adapter's tests."""
    _install_extras(session, "torch,dev")
    session.run(*PYTEST, "tests/core", "--backends=torch", *session.posargs)
    _adapter_tests(session, "adapter_torch")
    _adapter_tests(session, "distributed_torch")


@nox.session(python=PYTHON)
def jax(session: nox.Session) -> None:
    """Core tests on jax arrays (float64), then the JAX adapter's tests."""
    _install_extras(session, "jax,equinox,dev")
    session.run(*PYTEST, "tests/core", "--backends=jax", *session.posargs)
    _adapter_tests(session, "adapter_jax")
    _adapter_tests(session, "distributed_jax")


@nox.session(python=PYTHON)
def tensorflow(session: nox.Session) -> None:
    """How TensorFlow values reach the core (no Array API namespace), then the TF adapter's tests."""
    _install_extras(session, "tf,dev")
    session.run(*PYTEST, "tests/interop_tf", *session.posargs)
    _adapter_tests(session, "adapter_tf")
    _adapter_tests(session, "distributed_tf")


@nox.session(python=PYTHON)
def conformance(session: nox.Session) -> None:
    """All frameworks in one environment: every vector through every backend, then the
    model-level checks (same statistics and decisions in torch, JAX and TensorFlow)."""
    _install_extras(session, "all,dev")
    for backend in BACKENDS:
        session.run("python", "-m", "cabs_conformance", "--backend", backend)
    session.run("python", "-m", "cabs_conformance.e2e")
    session.run(*PYTEST, "tests/conformance_e2e", *session.posargs)


@nox.session(python=PYTHON)
def experiments(session: nox.Session) -> None:
    """The experiment command (data loaders, reports, every backend) on tiny budgets."""
    _install_extras(session, "all,dev")
    session.run(*PYTEST, "tests/experiments", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff on everything, mypy on the core."""
    _install(session, "ruff", "mypy", "numpy", "array-api-compat")
    session.run("ruff", "check", ".")
    session.run("mypy", "cabs_core")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The torch statistics benchmark beside BackPACK and Opacus (not a test; not in the defaults).

    ``nox -s bench -- --quick`` passes its arguments to benchmarks/bench_torch_stats.py.
    """
    _install_extras(session, "bench")
    session.run("python", "benchmarks/bench_torch_stats.py", *session.posargs)


@nox.session(python=PYTHON)
def hf(session: nox.Session) -> None:
    """Small random-init Hugging Face transformers on the torch adapter against the loop over single
    examples: GPT-2, BERT, DistilBERT on the fast path, and 27 held-out architectures through auto."""
    _install_extras(session, "torch,dev")
    _install(session, "transformers")
    session.run(*PYTEST, "tests/hf", *session.posargs)


#: timm imports torchvision, whose PyPI wheel does not import beside the CPU torch 2.13 of constraints.txt:
#: the timm session takes the pair that imports together (a CUDA build that runs on the CPU, about 5.5 GB)
TIMM_TORCH = ("torch==2.14.1", "torchvision==0.29.1")


@nox.session(python=PYTHON, venv_backend="venv")  # pip: it takes that pair from the machine's disk, uv downloads it
def timm(session: nox.Session) -> None:
    """Small random-init timm models (ViT, DeiT, CaiT, BEiT, Swin, ConvNeXt, Mixer, ResMLP, EfficientNet) on the
    torch adapter against the loop over single examples (optional; not in the defaults: torch 2.14.1)."""
    pins = Path(session.create_tmp(), "constraints-timm.txt")
    pins.write_text("".join(line for line in Path("constraints.txt").read_text().splitlines(keepends=True)
                            if not line.startswith(("torch==", "torchvision=="))))
    session.install("-c", str(pins), ".[torch,dev]", *TIMM_TORCH, "timm")
    session.run(*PYTEST, "tests/timm", *session.posargs)


@nox.session(python=PYTHON)
def keras_hub(session: nox.Session) -> None:
    """A random-init keras-hub GPT2Backbone with its tied ReversibleEmbedding head on the TF fast path
    against the loop over single examples (optional; not in the defaults: keras-hub pulls tensorflow-text
    and the full tensorflow wheel beside tensorflow-cpu, the same version)."""
    _install_extras(session, "tensorflow,dev")
    _install(session, "keras-hub")
    session.run(*PYTEST, "tests/keras_hub", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The README's demo: CABS against SGD baselines on scikit-learn's digits (torch, CPU)."""
    _install_extras(session, "torch,experiments")
    session.run("cabs-experiment", "--out", "runs/demo", "--overwrite", *session.posargs)


@nox.session(python=PYTHON)
def results(session: nox.Session) -> None:
    """docs/results.md's runs: digits, mnist-5k and mnist1d, 3 seeds, CABS and SGD over learning-rate grids
    (torch, CPU), into runs/results, the page's figures into docs/results (not a test; not in the defaults).
    ``nox -s results -- --datasets digits`` passes its arguments to ``python -m cabs_experiments.results``."""
    _install_extras(session, "torch,experiments")
    session.run("python", "-m", "cabs_experiments.results", "--out", "runs/results", "--overwrite",
                "--figures", "docs/results", *session.posargs)
