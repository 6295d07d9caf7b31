"""Equinox models for :mod:`cabs_jax`: :class:`EquinoxLoss`, a functional ``loss(params, example)``
of an ``eqx.Module``, with no glue written by the user.

An Equinox module is a pytree whose leaves are its arrays. ``EquinoxLoss`` partitions it once with
``eqx.partition(module, filter_spec)`` (default ``eqx.is_inexact_array``: every floating array is
trained) into the trainable part, the ``params`` pytree CABS's statistics and trainer take, and the
rest, held constant; ``eqx.combine`` puts them back for each evaluation. An Equinox module maps
ONE example, so the batch's forward pass is its ``jax.vmap``. The statistics are those of the
generic path (``vmap`` of ``grad``, exact), or of the fast path of :mod:`cabs_jax.eqx_fast` where
its probe establishes it (``eqx.nn.Linear``, ``Conv``, ``Embedding``, ``LayerNorm``,
``MultiheadAttention``; docs/jax.md, "Equinox").
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from cabs_core import BatchNormTrainingError, UnsupportedModelError

from .flax_fast import ModuleLoss

PyTree = Any


def _refuse_training_mode(module: eqx.Module) -> None:
    """Batch statistics couple the examples; dropout with a key is not a deterministic loss."""
    leaves = jax.tree.leaves(module, is_leaf=lambda n: isinstance(n, (eqx.nn.BatchNorm, eqx.nn.Dropout)))
    for node in leaves:
        if isinstance(node, eqx.nn.BatchNorm) and not node.inference:
            raise BatchNormTrainingError(
                "eqx.nn.BatchNorm runs in training mode (inference=False): it normalises with the statistics "
                "of the whole batch, so examples are coupled and per-example gradients (hence CABS's "
                "within-batch variance estimate) are not defined. Put the model in inference mode "
                "(eqx.nn.inference_mode(model)), use eqx.nn.LayerNorm/GroupNorm, or estimate the variance "
                "from micro-batch mean gradients with cabs_core.group_variance.",
                layer="BatchNorm", reason="BatchNorm in training mode couples the examples")
        if isinstance(node, eqx.nn.Dropout) and not node.inference and node.p > 0:
            raise UnsupportedModelError(
                "eqx.nn.Dropout is in training mode (inference=False): the loss must be a deterministic "
                "function of the parameters; use eqx.nn.inference_mode(model) or Dropout(inference=True)",
                layer="Dropout", reason="dropout in training mode")


class EquinoxLoss(ModuleLoss):
    """``loss(params, example) -> scalar`` for an Equinox module.

    module: the ``eqx.Module`` (it maps one example). output_loss(output, example) -> scalar: the
    loss of ONE example given the model's output for it. inputs(example_or_batch): the model input
    (default: item 0, for ``(x, y)`` examples). filter_spec: which leaves are trained (default
    ``eqx.is_inexact_array``); the others are constants. ``params``: the trainable part at
    construction, what ``batch_stats`` and ``CABSTrainer.init`` take (the module itself works too).
    BatchNorm and Dropout in training mode are refused. ``method="fast"``/``"auto"`` take the fast
    path of :mod:`cabs_jax.eqx_fast` where its probe establishes it.
    """

    def __init__(self, module: eqx.Module, output_loss: Callable[[Any, PyTree], jax.Array], *,
                 inputs: Callable[[PyTree], Any] = operator.itemgetter(0),
                 filter_spec: Any = eqx.is_inexact_array) -> None:
        if not isinstance(module, eqx.Module):
            raise TypeError(f"EquinoxLoss needs an equinox.Module, got {type(module).__name__}")
        _refuse_training_mode(module)
        self.module, self.output_loss, self.inputs, self.filter_spec = module, output_loss, inputs, filter_spec
        self.params, self.static = eqx.partition(module, filter_spec)
        if not jax.tree.leaves(self.params):
            raise ValueError(f"the module {type(module).__name__} has no leaves selected by {filter_spec!r}")

    @property
    def fast_impl(self) -> Any:
        """The fast path's implementation for Equinox modules (:mod:`cabs_jax.eqx_fast`)."""
        from . import eqx_fast

        return eqx_fast

    def apply(self, params: PyTree, x: Any) -> Any:
        """The module's outputs on a batch of inputs (``vmap`` over the examples), with ``params``."""
        return jax.vmap(eqx.combine(params, self.static))(x)

    def trainable_of(self, params: PyTree) -> PyTree:
        """The trainable part of ``params`` (a whole module, or already the trainable part)."""
        return eqx.filter(params, self.filter_spec)

    def combine(self, params: PyTree) -> eqx.Module:
        """The module with trained ``params`` (e.g. a trainer state's), for inference or saving."""
        if jax.tree.structure(params) != jax.tree.structure(self.params):
            raise ValueError("params do not have the structure of this EquinoxLoss's trainable part "
                             f"({jax.tree.structure(params)} vs {jax.tree.structure(self.params)})")
        return eqx.combine(jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array)
                                        and not a.is_fully_addressable else a, params), self.static)


__all__ = ["EquinoxLoss"]
