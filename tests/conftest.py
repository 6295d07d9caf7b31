"""Shared test configuration: the array backends the core tests run on.

Core tests take an ``xb`` fixture (a ``cabs_conformance.backends.Backend``) and are parametrised
over the backends named by ``--backends`` (default: every one installed), the
way array-api-extra parametrises over ``xp``. Each nox session selects its own.
"""

from __future__ import annotations

import importlib.util

import pytest
from cabs_conformance.backends import get_backend
from hypothesis import HealthCheck, settings

ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax")

settings.register_profile(
    "cabs", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("cabs")


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
