"""Fixtures of the torch adapter tests; the oracles live in torch_oracles.py (importable by the
test files: this folder is put on sys.path, as tests/adapter_jax does for jax_test_models)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for torch_oracles under --import-mode=importlib
from torch_oracles import assert_stats_match, brute_force, ce  # noqa: E402


@pytest.fixture
def oracle() -> Callable[..., dict[str, Any]]:
    return brute_force


@pytest.fixture
def check() -> Callable[..., None]:
    return assert_stats_match


@pytest.fixture
def ce_loss() -> Callable:
    return ce
