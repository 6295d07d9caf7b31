"""The array libraries the conformance runner (and the core's tests) feed.

A :class:`Backend` turns NumPy values into that library's arrays and back.
TensorFlow has no Array API namespace (``xp is None``): its statistics are
reduced with TensorFlow ops to the four scalars of ``ScalarStats``, stacked,
and copied to the host once (see ``cabs_core.stats``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "tensorflow")


@dataclass(frozen=True)
class Backend:
    """An array library: its Array API namespace and conversions from/to NumPy."""

    name: str
    xp: Any
    asarray: Callable[[Any], Any]  # NumPy array or scalar -> this library's array (dtype kept)
    to_numpy: Callable[[Any], np.ndarray]


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ImportError names the package to install."""
    if name == "numpy":
        return Backend(name, np, lambda a: np.asarray(a), np.asarray)
    if name == "array_api_strict":
        import array_api_strict as xps

        return Backend(name, xps, lambda a: xps.asarray(np.asarray(a)), lambda a: np.from_dlpack(a))
    if name == "torch":
        import torch
        from array_api_compat import torch as xpt

        return Backend(name, xpt, lambda a: torch.asarray(np.asarray(a)), lambda a: a.detach().cpu().numpy())
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # vectors are float64
        import jax.numpy as jnp

        return Backend(name, jnp, lambda a: jnp.asarray(np.asarray(a)), np.asarray)
    if name == "tensorflow":
        import tensorflow as tf

        return Backend(name, None, lambda a: tf.constant(np.asarray(a)), lambda a: a.numpy())
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
