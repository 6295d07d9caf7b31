"""Flax NNX models for :mod:`cabs_jax`: :class:`NNXLoss`, a functional ``loss(params, example)`` of an ``nnx.Module``.

NNX modules are stateful objects; CABS's statistics and trainer work on a parameter pytree. ``NNXLoss``
splits the module once with ``nnx.split(module, wrt, ...)`` into its graph definition, the trainable
state (default: every ``nnx.Param``, an ``nnx.State`` pytree) and the rest (batch statistics, other
variables), held constant. ``loss(params, example)`` merges them back
(``nnx.merge``) into a fresh copy of the module for each evaluation, so the user's module is never
mutated by a trace; :meth:`NNXLoss.update` writes trained parameters back into it (``nnx.update``).
The statistics take the fast path of :mod:`cabs_jax.nnx_fast` where its probe establishes it, else the
exact generic path (``vmap`` of ``grad``; docs/jax.md, "Flax NNX").
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from cabs_core import ConfigError, UnsupportedModelError

from .flax_fast import BatchNormTrainingError, ModuleLoss

PyTree = Any


def _refuse_training_mode(module: nnx.Module) -> None:
    """BatchNorm normalising with batch statistics couples the examples (no per-example gradients);
    dropout would draw the same mask at every step (the rng state is a constant of the loss)."""
    for path, node in nnx.iter_graph(module):
        where = ".".join(str(p) for p in path) or type(module).__name__
        if isinstance(node, nnx.Dropout) and not node.deterministic and node.rate > 0:
            raise UnsupportedModelError(
                f"nnx.Dropout at {where!r} is in training mode (deterministic=False): the loss must be a "
                "deterministic function of the parameters (its rng state would be a constant, the same "
                "mask at every step); call module.eval() or construct it with deterministic=True",
                layer=where, reason="dropout in training mode")
        if isinstance(node, nnx.BatchNorm) and not node.use_running_average:
            raise BatchNormTrainingError(
                f"nnx.BatchNorm at {where!r} runs in training mode (use_running_average=False): it "
                "normalises with the statistics of the whole batch, so examples are coupled and "
                "per-example gradients (hence CABS's within-batch variance estimate) are not defined. "
                "Options: construct it with use_running_average=True (or call module.eval() before "
                "building the NNXLoss), replace it by nnx.LayerNorm/nnx.GroupNorm, or estimate the "
                "variance from micro-batch mean gradients with cabs_core.group_variance.",
                layer=where,
                reason="BatchNorm in training mode couples the examples",
            )


class NNXLoss(ModuleLoss):
    """``loss(params, example) -> scalar`` for a Flax NNX module.

    module: the ``nnx.Module``. output_loss(output, example) -> scalar: the loss of ONE example
    given the model's output for it. inputs(example_or_batch): the model input (default: item 0,
    for ``(x, y)`` examples). wrt: the ``nnx`` filter of the trainable variables (default
    ``nnx.Param``); every other variable is a constant, read at construction. ``params``: the
    trainable state at construction (an ``nnx.State``), what ``batch_stats`` and
    ``CABSTrainer.init`` take. BatchNorm in training mode is refused
    (:class:`cabs_jax.BatchNormTrainingError`).
    """

    def __init__(self, module: nnx.Module, output_loss: Callable[[Any, PyTree], jax.Array], *,
                 inputs: Callable[[PyTree], Any] = operator.itemgetter(0), wrt: Any = nnx.Param) -> None:
        if not isinstance(module, nnx.Module):
            raise TypeError(f"NNXLoss needs a flax.nnx.Module, got {type(module).__name__}; "
                            "for a flax.linen module use cabs_jax.FlaxLoss")
        _refuse_training_mode(module)
        self.module, self.output_loss, self.inputs, self.wrt = module, output_loss, inputs, wrt
        self.graphdef, self.params, self.rest = nnx.split(module, wrt, ...)
        if not jax.tree.leaves(self.params):
            raise ValueError(f"the module {type(module).__name__} has no trainable variables matching {wrt!r}")

    def apply(self, params: PyTree, x: Any) -> Any:
        """The module's output on a batch of inputs, with ``params`` as its trainable state (pure)."""
        return nnx.merge(self.graphdef, params, self.rest)(x)

    def update(self, params: PyTree) -> nnx.Module:
        """Write ``params`` (e.g. a trainer state's ``params``) into the user's module and return it."""
        if jax.tree.structure(params) != jax.tree.structure(self.params):
            raise ValueError("params do not have the structure of this NNXLoss's trainable state "
                             f"({jax.tree.structure(params)} vs {jax.tree.structure(self.params)})")
        nnx.update(self.module, jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array)
                                             and not a.is_fully_addressable else a, params))
        return self.module


def optax_of(optimizer: Any) -> Any:
    """The optax transformation of a fresh ``nnx.Optimizer`` (its ``tx``); anything else is returned as is.

    The trainer keeps the optimizer state in its :class:`cabs_jax.TrainState`, so an ``nnx.Optimizer``
    that has already stepped (its state would be dropped) is refused."""
    if not isinstance(optimizer, nnx.Optimizer):
        return optimizer
    steps = int(optimizer.step[...])
    if steps != 0:
        raise ConfigError("optimizer", f"this nnx.Optimizer has already taken {steps} steps: the trainer starts "
                          "its own optimizer state and would drop that one; pass a fresh nnx.Optimizer or its "
                          "optax transformation (optimizer.tx)")
    return optimizer.tx


def trainable_state(loss_fn: Any, params: PyTree) -> PyTree:
    """``params`` as a pytree: an ``nnx.Module`` (with an :class:`NNXLoss`) becomes its state of the loss's
    ``wrt`` filter, an Equinox module (with a :class:`cabs_jax.EquinoxLoss`) its trainable part; anything
    else is returned as is."""
    if hasattr(loss_fn, "trainable_of"):
        return loss_fn.trainable_of(params)
    if not isinstance(params, nnx.Module):
        return params
    if not isinstance(loss_fn, NNXLoss):
        raise TypeError(f"params is an nnx.Module ({type(params).__name__}): the loss must be a cabs_jax.NNXLoss, "
                        f"got {type(loss_fn).__name__}")
    return nnx.state(params, loss_fn.wrt)


__all__ = ["NNXLoss", "optax_of", "trainable_state"]
