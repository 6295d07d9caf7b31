"""Conformance vectors for CABS implementations and the runner that checks
``cabs_core`` against them on one backend: ``python -m cabs_conformance --help``."""

from .backends import BACKENDS, Backend, get_backend
from .runner import Result, VectorFormatError, builtin_vectors, load, run

__all__ = ["BACKENDS", "Backend", "Result", "VectorFormatError", "builtin_vectors", "get_backend", "load", "run"]
