"""Shared test configuration: the array backends the core tests run on.

Core tests take an ``xb`` fixture (a ``cabs_conformance.backends.Backend``) and are parametrised
over the backends named by ``--backends`` (default: every one installed), the
way array-api-extra parametrises over ``xp``. Each nox session selects its own.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from cabs_conformance.backends import get_backend
from hypothesis import HealthCheck, settings

ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax")

# Hypothesis profiles, chosen by CABS_HYPOTHESIS_PROFILE (default: "ci" where the
# CI variable is set, else "dev"). "ci" is deterministic: the same examples on
# every run, nothing read from or written to the example database, so no run goes
# red by luck or by a failure another checkout stored. "dev" draws new examples on
# every run and replays stored failures; "explore" draws many more (tests that fix
# their own max_examples keep it). A failure found there is a finding about the code.
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture], "print_blob": True}
settings.register_profile("ci", max_examples=40, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=40, **_COMMON)
settings.register_profile("explore", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("CABS_HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backends",
        default=None,
        help=f"comma-separated array backends for the core tests (default: installed ones of {ALL_BACKENDS})",
    )


def _selected(config: pytest.Config) -> list[str]:
    opt = config.getoption("--backends")
    if opt:
        names = [n.strip() for n in opt.split(",") if n.strip()]
        unknown = [n for n in names if n not in ALL_BACKENDS]
        if unknown:
            raise pytest.UsageError(f"--backends: unknown {unknown}; choose from {ALL_BACKENDS}")
        return names
    return [n for n in ALL_BACKENDS if importlib.util.find_spec(n) is not None]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "xb" in metafunc.fixturenames:
        names = _selected(metafunc.config)
        metafunc.parametrize("xb", [get_backend(n) for n in names], ids=names, scope="session")
