"""The fast exact path for Flax linen models built from standard layers.

One forward and one backward pass of the summed loss sum_i w_i l_i. A method
interceptor (``flax.linen.intercept_methods``) records the input ``a`` of every
``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Embed`` and ``nn.LayerNorm`` call
(and of every module whose parameters are all its own, e.g. learned positions) and adds a
zero "perturbation" to its output, so that the gradient with respect to the
perturbation is the output gradient ``b`` (Flax's ``perturb`` idea, without
adding variables to the user's modules). The per-example squared norm of each
layer's gradient then follows from ``a`` and ``b`` with the shared formulas of
:mod:`cabs_core.per_example` (convolutions: unfolded patches); per-example
gradients of the whole model are never formed.

``Embed.attend`` (the tied output projection) is intercepted too: a table
used as lookup and projection gets both terms and their Gram-form cross term.

A DenseGeneral is a Dense over positions (its contracted axes flattened into
the features, its other non-example axes into positions); a module with its own
parameters gets its own VJP on each example alone.

Inside ``nn.remat`` and ``nn.scan`` over layers (a lifted module's body is a
:class:`_Frame`), the zero perturbation and a zero input tap (:func:`_tap`) of each
layer travel as extra variables of the layer in the ``params`` collection, which
``nn.scan`` slices per iteration: the backward pass returns each iteration's ``a``
and ``b``, and each slice of the stacked parameters gets its own norm. Other lifted
transformations (``nn.vmap``, ...) are refused by name.

Requirements: every parameter belongs to one of the supported layer types or to
a module whose parameters are all its own, each such layer is called once per
forward pass (an Embed: once as lookup and once as ``attend``), and every
captured tensor carries the examples along axis 0.
:func:`fast_stats` returns S only once :mod:`cabs_jax.verify` has established
this for the model and input signature (a probe at a batch size no other
dimension has, the accounting of every parameter's gradient, fast S = generic
S); otherwise it raises :class:`~cabs_core.UnsupportedModelError` naming the
layer, and ``method="auto"`` falls back to the generic path with one
:class:`~cabs_core.FastPathFallbackWarning`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import Scope, lift
from flax.core.scope import in_filter
from flax.core.tracers import current_trace
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding

from cabs_core import (
    BatchNormTrainingError,
    BatchStats,
    UnsupportedModelError,
    bias_sq_norms,
    embedding_linear_cross_sq_norms,
    embedding_sq_norms,
    linear_sq_norms,
)

from .stats import PyTree, batch_size_of, check_weights, compute_dtype, float_dtype, generic_stats, stat_dtype

SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed, nn.LayerNorm)

#: the methods of a supported layer the fast path intercepts; ``Embed.attend`` is
#: the tied output projection (query @ embedding^T)
METHODS = {
    "Dense": ("__call__",),
    "DenseGeneral": ("__call__",),
    "Conv": ("__call__",),
    "Embed": ("__call__", "attend"),
    "LayerNorm": ("__call__",),
}

#: the adapter's former error name, kept importable: the core's error


def _unsupported(where: str, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{where}: {reason}", layer=where, reason=reason)


def _batchnorm_error(path: str) -> BatchNormTrainingError:
    return BatchNormTrainingError(
        f"BatchNorm at {path!r} runs in training mode (use_running_average=False): it normalises "
        "with the statistics of the whole batch, so examples are coupled and per-example gradients "
        "(hence CABS's within-batch variance estimate) are not defined. Options: call it with "
        "use_running_average=True inside the loss, replace it by LayerNorm/GroupNorm, or estimate "
        "the variance from micro-batch mean gradients with cabs_core.group_variance.",
        layer=path,
        reason="BatchNorm in training mode couples the examples",
    )


class ModuleLoss:
    """The loss of a module's batched forward pass ``apply(params, x)``: one example's loss
    (the generic signature) and a batch's per-example losses. Subclasses give ``apply``,
    ``inputs(example_or_batch)`` and ``output_loss(output, example)``."""

    inputs: Callable[[PyTree], Any]
    output_loss: Callable[[Any, PyTree], jax.Array]

    def apply(self, params: PyTree, x: Any) -> Any:
        raise NotImplementedError

    def __call__(self, params: PyTree, example: PyTree) -> jax.Array:
        """The loss of one example (the generic signature)."""
        x = jax.tree.map(lambda a: jnp.asarray(a)[None], self.inputs(example))
        out = jax.tree.map(lambda a: a[0], self.apply(params, x))
        return self.output_loss(out, example)

    def batch_losses(self, params: PyTree, batch: PyTree) -> jax.Array:
        """Per-example losses (m,) of a batch, from one batched forward pass."""
        return jax.vmap(self.output_loss)(self.apply(params, self.inputs(batch)), batch)


@dataclass(frozen=True, eq=False)
class FlaxLoss(ModuleLoss):
    """``loss(params, example) -> scalar`` for a linen module, in a form the fast path understands.

    module: the ``flax.linen.Module``; params: its ``'params'`` collection.
    output_loss(output, example) -> scalar: the loss of ONE example given the
    model's output for it. inputs(example_or_batch): the model input (default:
    item 0, for ``(x, y)`` examples). collections: other, constant variable
    collections (e.g. ``{'batch_stats': ...}`` for BatchNorm in eval mode).
    """

    module: nn.Module
    output_loss: Callable[[Any, PyTree], jax.Array]
    inputs: Callable[[PyTree], Any] = operator.itemgetter(0)
    collections: Mapping[str, Any] = field(default_factory=dict)

    def apply(self, params: PyTree, x: Any) -> Any:
        """The module's output on a batch of inputs, refusing BatchNorm in training mode."""
        with nn.intercept_methods(_refuse_batchnorm_training):
            return self.module.apply({"params": params, **self.collections}, x)


def _path(module: nn.Module) -> tuple[str, ...]:
    return tuple(module.scope.path) if module.scope is not None else ()


def _batchnorm_training(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    call_value = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    return not nn.merge_param("use_running_average", module.use_running_average, call_value)


def _refuse_batchnorm_training(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    mod = context.module
    if isinstance(mod, nn.BatchNorm) and context.method_name == "__call__" and _batchnorm_training(mod, args, kwargs):
        raise _batchnorm_error("/".join(_path(mod)) or type(mod).__name__)
    return next_fun(*args, **kwargs)


def _kind(module: nn.Module) -> str | None:
    """Which supported layer this is (exact type, so subclasses with new behaviour are not trusted)."""
    for cls in SUPPORTED:
        if type(module) is cls:
            return cls.__name__
    return None


def _check_config(kind: str, mod: nn.Module, where: str, a: Any = None) -> None:
    """Refuse layer configurations whose per-example gradient the formulas below do not cover."""
    unshared = not getattr(mod, "shared_weights", True)
    if kind == "Conv" and (mod.feature_group_count != 1 or mod.mask is not None or unshared):
        raise _unsupported(where, "Conv with feature_group_count != 1, a mask or unshared weights")
    if kind == "Conv" and (mod.conv_general_dilated is not None or mod.conv_general_dilated_cls is not None):
        raise _unsupported(where, "Conv with a custom convolution function")
    if kind == "LayerNorm":
        red = mod.reduction_axes if isinstance(mod.reduction_axes, int) else tuple(mod.reduction_axes)
        feat = mod.feature_axes if isinstance(mod.feature_axes, int) else tuple(mod.feature_axes)
        if red not in (-1, (-1,)) or feat not in (-1, (-1,)) or mod.axis_name is not None:
            raise _unsupported(where, "LayerNorm over axes other than the last one")
    if kind in ("Dense", "DenseGeneral") and (mod.dot_general is not None or mod.dot_general_cls is not None):
        raise _unsupported(where, f"{kind} with a custom dot_general")
    if kind in ("Dense", "DenseGeneral") and getattr(mod, "promote_dtype", promote_dtype) is not promote_dtype:
        raise _unsupported(where, f"{kind} with a custom promote_dtype (it may change the kernel or the input)")
    if kind == "DenseGeneral":
        if tuple(_canonicalize(mod.batch_dims)):
            raise _unsupported(where, "DenseGeneral with batch_dims (a kernel per batch index)")
        if a is not None:
            ndim = jnp.ndim(a)
            axes = _dense_general_axes(mod, ndim)
            if ndim < 2 or 0 in axes:
                raise _unsupported(
                    where, f"DenseGeneral contracts axis 0 of its input {tuple(jnp.shape(a))}, the example axis"
                )


def _canonicalize(v: Any) -> tuple[int, ...]:
    return (v,) if isinstance(v, int) else tuple(v)


def _dense_general_axes(mod: nn.DenseGeneral, ndim: int) -> tuple[int, ...]:
    """The input axes a DenseGeneral contracts, normalised to [0, ndim) and sorted (as Flax does)."""
    return tuple(sorted(ax % ndim for ax in _canonicalize(mod.axis)))


Key = tuple[tuple[str, ...], str]  # (layer path, method)

#: the kind of a module of another type whose parameters are all its own (``self.param``, no
#: submodule with parameters), e.g. a learned positional embedding added to its input or a learned
#: scale: its per-example gradient is its own VJP on each example alone (:func:`_own_sq_norms`)
OWN = "Module"

#: layers kept off that rule: eval-mode BatchNorm would be exact through it (checked against the
#: float64 loop), but the adapter's tests and docs still have it step aside; a decision for later
NOT_OWN: tuple[type, ...] = (nn.BatchNorm,)

#: at most this many per-example gradient entries of such a module are held at once
OWN_CHUNK_ENTRIES = 2**22


def _own_params(mod: nn.Module) -> tuple[str, ...]:
    """The names of ``mod``'s own parameters if it has some and no submodule of it has any, else ()."""
    try:
        tree = mod.variables.get("params", {}) if mod.scope is not None else {}
    except Exception:  # an unbound module or a scope without variables: nothing to account for here
        return ()
    own = tuple(sorted(k for k, v in tree.items() if not isinstance(v, Mapping) and not k.startswith(_LIFTED)))
    nested = any(isinstance(v, Mapping) and jax.tree.leaves(v) for v in tree.values())
    return () if nested else own


@dataclass(frozen=True)
class Use:
    """One intercepted call of a supported layer: where, which method, the layer
    (an unbound copy), its input ``a`` and output ``y`` (arrays or shapes)."""

    path: tuple[str, ...]
    kind: str
    method: str
    module: nn.Module
    a: Any
    y: Any
    names: tuple[str, ...] = ()  # the parameters this use accounts for (under ``path``)
    #: inside nn.remat / nn.scan: the leading axes nn.scan stacks the layer's parameters along (() under
    #: nn.remat alone; ``a`` and ``y`` are one iteration's); None outside lifted transformations
    stack: tuple[int, ...] | None = None
    scans: int = 0  # how many nn.scan the layer runs inside
    inner: tuple[tuple[str, tuple[int, ...]], ...] = ()  # its parameters' shapes inside the transformations

    @property
    def where(self) -> str:
        name = "/".join(self.path) or self.kind
        return name if self.method == "__call__" else f"{name}.{self.method}"


#: lifted layers' zero input taps and output perturbations travel through the ``params`` collection
#: under these names (no Flax module or parameter name contains ':'), so that nn.scan slices them per
#: iteration and nn.remat passes them in like the layer's own parameters
_LIFTED = "cabs:"
_TAP, _PERTURB = _LIFTED + "a:", _LIFTED + "b:"

#: how the refusals name Flax's lifted transformations
_LIFT_NAMES = {lift.checkpoint: "nn.remat", lift.scan: "nn.scan", lift.vmap: "nn.vmap", lift.jit: "nn.jit"}


@jax.custom_vjp
def _tap(a: jax.Array, zero: jax.Array) -> jax.Array:
    """Identity in ``a``; the cotangent of ``zero`` is ``a`` itself. The gradient with respect to a
    zero variable thus returns a layer's input from inside nn.remat or nn.scan (one slice per
    iteration), where the value itself cannot leave the transformation's trace."""
    return a


def _tap_fwd(a: jax.Array, zero: jax.Array) -> tuple[jax.Array, jax.Array]:
    return a, a


def _tap_bwd(a: jax.Array, ct: jax.Array) -> tuple[jax.Array, jax.Array]:
    return ct, a


_tap.defvjp(_tap_fwd, _tap_bwd)


def _closure(fn: Any) -> dict[str, Any]:
    """The free variables of a function (those bound)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    out = {}
    for name, cell in zip(code.co_freevars if code is not None else (), cells):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    return out


def _lift_chain(cls: type, method: str) -> tuple[tuple[tuple[Any, Mapping[str, Any]], ...], type]:
    """The lifted transformations a class made by ``nn.remat(Block)``, ``nn.scan(Block, ...)``, ...
    applies to ``method``, outermost first, as (transform, its keyword arguments), and the class
    they wrap (Flax's ``module_class_lift_transform`` keeps both in the method's closure)."""
    chain = []
    while True:
        cells = _closure(cls.__dict__.get(method))
        if "transform" not in cells or not isinstance(cells.get("module_class"), type):
            return tuple(chain), cls
        chain.append((cells["transform"], dict(cells.get("trafo_kwargs") or {})))
        cls = cells["module_class"]


def _lifted_step(transform: Any, kwargs: Mapping[str, Any], where: str) -> tuple[int, int]:
    """(traces of the body per call, parameter axes stacked) of an nn.remat or nn.scan the fast path
    covers; raises for other transformations and configurations, naming them."""
    name = _LIFT_NAMES.get(transform, f"nn.{getattr(transform, '__name__', 'lifted transformation')}")
    if transform is lift.checkpoint:
        if not in_filter(kwargs.get("variables", True), "params"):
            raise _unsupported(where, "nn.remat that does not lift the 'params' collection")
        return 1, 0
    if transform is lift.scan:
        if kwargs.get("data_transform") is not None:
            raise _unsupported(where, "nn.scan with a data_transform (it may change the variables)")
        for what in ("variable_broadcast", "variable_carry"):
            if in_filter(kwargs.get(what, False), "params"):
                raise _unsupported(
                    where, f"nn.scan with 'params' in {what}: the same weights at every iteration (shared weights)"
                )
        axes = [ax for f, ax in (kwargs.get("variable_axes") or {}).items() if in_filter(f, "params")]
        if not axes or type(axes[0]) is not int or axes[0] != 0:
            raise _unsupported(
                where, f"nn.scan with variable_axes {axes[0] if axes else None!r} for 'params': the fast path "
                "needs the layers' parameters stacked along axis 0 (variable_axes={'params': 0})"
            )
        return (2 if kwargs.get("check_constancy_invariants", True) else 1), 1
    raise _unsupported(
        where, f"a layer inside {name}, a lifted transformation the fast path does not cover (it covers "
        "nn.remat and nn.scan over layers)"
    )


@dataclass
class _Frame:
    """One trace of a body: the forward pass's top level, or one trace of the body of an nn.remat /
    nn.scan module (nn.scan traces its body twice per call, once for its constancy check)."""

    trace: Any  # flax.core.tracers.current_trace() of this trace (when the recorder checks traces)
    scans: int = 0  # the nn.scan this body runs inside
    keys: set[Key] = field(default_factory=set)  # the layer calls in this trace
    entered: dict[Key, int] = field(default_factory=dict)  # traces of lifted bodies entered from here


def _sds(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(jnp.shape(x)), jnp.result_type(x))


class _Recorder:
    """Method interceptor: records supported layer calls, adds perturbations to their outputs.

    Outside lifted transformations the perturbations are the arrays ``perturbations[key]`` and the
    inputs are recorded as they are. Inside nn.remat and nn.scan (each call of such a module's body
    is a :class:`_Frame`) the zero perturbation and a zero input tap (:func:`_tap`) are variables of
    the layer in the ``params`` collection (``_PERTURB``, ``_TAP`` + method), which nn.scan slices
    per iteration, so that the gradient returns both per iteration; ``uses`` then holds shapes.
    ``check`` (in the plan's abstract trace): refuse a layer that runs in a trace other than its
    frame's (a lifted transformation the recorder did not enter, or another inner trace).
    """

    def __init__(self, perturbations: Mapping[Key, jax.Array] | None = None, check: bool = False) -> None:
        self.perturbations = perturbations
        self.uses: dict[Key, Use] = {}
        self.check = check
        self.frames = [_Frame(current_trace() if check else None)]
        self.calls: list[nn.Module] = []  # the modules whose intercepted methods are running, innermost last

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        mod, method = context.module, context.method_name
        path = _path(mod)
        where = "/".join(path) or type(mod).__name__
        frame = self._enter(mod, method, path, where)
        if frame is not None:
            self.frames.append(frame)
        self.calls.append(mod)
        try:
            return self._intercept(next_fun, args, kwargs, mod, method, path, where)
        finally:
            self.calls.pop()
            if frame is not None:
                self.frames.pop()

    def _enter(self, mod: nn.Module, method: str, path: tuple[str, ...], where: str) -> _Frame | None:
        """A new frame if this call is the body of a lifted module (Flax calls a clone of the module
        bound to the transformation's scope), once the transformations are ones the fast path covers."""
        if not path or not isinstance(mod.parent, Scope):
            return None
        owner = self.calls[-1] if self.calls else None
        child = None
        if owner is not None and _path(owner) == path[:-1]:
            child = getattr(owner, "_state", None) and owner._state.children.get(path[-1])
        chain, base = _lift_chain(type(child), method) if isinstance(child, nn.Module) else ((), None)
        if not chain or base is not type(mod):
            raise _unsupported(
                where, "runs inside a lifted transformation (nn.remat, nn.vmap, nn.scan, ...) the fast path cannot "
                "identify (it covers nn.remat and nn.scan applied to a module class)"
            )
        traces, scans = 1, 0
        for transform, trafo_kwargs in chain:
            t, s = _lifted_step(transform, trafo_kwargs, where)
            traces, scans = traces * t, scans + s
        parent, key = self.frames[-1], (path, method)
        parent.entered[key] = parent.entered.get(key, 0) + 1
        if parent.entered[key] > traces:
            raise _unsupported(
                where, "a module inside nn.remat / nn.scan called more than once per forward pass (shared weights)"
            )
        return _Frame(current_trace() if self.check else None, parent.scans + scans)

    def _intercept(
        self, next_fun: Callable, args: tuple, kwargs: dict, mod: nn.Module, method: str, path: tuple[str, ...],
        where: str,
    ) -> Any:
        if isinstance(mod, nn.BatchNorm) and method == "__call__" and _batchnorm_training(mod, args, kwargs):
            raise _batchnorm_error(where)
        kind = _kind(mod)
        names = _PARAM_NAMES.get(kind, ())
        if kind is None and method == "__call__" and not isinstance(mod, NOT_OWN):
            names = _own_params(mod)
            kind = OWN if names else None
        if kind is None or method == "setup":
            return next_fun(*args, **kwargs)
        if kind == OWN and (kwargs or len(args) != 1 or not hasattr(args[0], "shape")):
            raise _unsupported(
                where, f"a module with its own parameters ({', '.join(names)}) called with other than one array "
                "argument: the fast path needs its input to differentiate it per example"
            )
        if method not in METHODS.get(kind, ("__call__",)):
            raise _unsupported(where, f"{kind}.{method} is not a method the fast path knows")
        if self.check and current_trace() != self.frames[-1].trace:
            raise _unsupported(
                where, "layer runs inside a lifted transformation (nn.remat, nn.vmap, nn.scan, ...) or another inner "
                "trace the fast path did not enter, where its input and output gradient cannot be captured"
            )
        key = (path, method)
        frame = self.frames[-1]
        if key in frame.keys or (len(self.frames) == 1 and key in self.uses):
            raise _unsupported(
                where, f"{kind}{'' if method == '__call__' else '.' + method} called more than once per forward "
                "pass (shared weights)"
            )
        frame.keys.add(key)
        if kwargs or len(args) != 1:
            raise _unsupported(where, f"{kind} called with extra arguments")
        _check_config(kind, mod, where, args[0])
        if len(self.frames) > 1:
            return self._lifted(next_fun, args[0], mod, kind, method, path, where, names)
        y = next_fun(*args, **kwargs)
        if kind == OWN and not hasattr(y, "shape"):
            raise _unsupported(where, f"a module with its own parameters ({', '.join(names)}) returns a "
                               f"{type(y).__name__}, not one array")
        self.uses[key] = Use(path, kind, method, mod.clone(parent=None), args[0], y, names)
        if self.perturbations is not None:
            y = y + self.perturbations[key]
        return y

    def _lifted(
        self, next_fun: Callable, a: Any, mod: nn.Module, kind: str, method: str, path: tuple[str, ...], where: str,
        names: tuple[str, ...],
    ) -> Any:
        """A layer call inside nn.remat / nn.scan: input tap and output perturbation as variables."""
        scope = mod.scope
        inner = tuple((n, tuple(jnp.shape(scope.get_variable("params", n))))
                      for n in names if scope.has_variable("params", n))
        if not inner:  # no parameters (e.g. a LayerNorm without scale and bias): nothing to account for
            return next_fun(a)
        if not jnp.issubdtype(jnp.result_type(a), jnp.inexact):
            raise _unsupported(
                where, f"{kind} with an input of dtype {jnp.result_type(a)} inside nn.remat / nn.scan (e.g. an "
                "embedding lookup): the fast path reads layer inputs there through gradients, which integers lack"
            )
        if self.perturbations is not None:
            a = _tap(a, scope.get_variable("params", _TAP + method))
        y = next_fun(a)
        if not hasattr(y, "shape"):
            raise _unsupported(where, f"{kind} returns a {type(y).__name__}, not one array")
        if self.perturbations is not None:
            y = y + scope.get_variable("params", _PERTURB + method)
        self.uses[(path, method)] = Use(
            path, kind, method, mod.clone(parent=None), _sds(a), _sds(y), names, (), self.frames[-1].scans, inner
        )
        return y


Plan = tuple[Use, ...]  # a and y as jax.ShapeDtypeStruct


def _plan(floss: FlaxLoss, params: PyTree, x: Any, m: int) -> Plan:
    """Abstractly trace one forward pass of a batch of ``m`` examples: every
    supported layer call, refusing models whose parameters are not all covered
    and captured tensors whose leading axis is not of length ``m``."""

    def forward(p: PyTree, x: Any) -> Any:
        recorder = _Recorder(check=True)
        with nn.intercept_methods(recorder):
            floss.module.apply({"params": p, **floss.collections}, x)
        forward.uses = recorder.uses  # type: ignore[attr-defined]
        return {key: (u.a, u.y) for key, u in recorder.uses.items() if u.stack is None}  # lifted: shapes already

    shapes = eval_shapes(forward, params, x, "(nn.remat, nn.vmap, nn.scan, ...) ")
    uses = tuple(
        Use(u.path, u.kind, u.method, u.module, *shapes[key], u.names) if u.stack is None
        else dataclasses.replace(u, stack=_stack_of(u, params))
        for key, u in forward.uses.items()  # type: ignore[attr-defined]
    )
    owned = {u.path + (name,) for u in uses for name in u.names}
    for key_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)
        if p not in owned:
            raise UnsupportedModelError(
                f"parameter {'/'.join(p)!r} does not belong to a Dense, DenseGeneral, Conv, Embed or LayerNorm layer "
                f"the fast path knows, nor to a module called once with one array whose parameters are all its "
                f"own (self.param in a module without submodules that have parameters)",
                layer="/".join(p),
                reason="a parameter outside the supported layers",
            )
    check_example_axis(uses, m)
    return uses


def eval_shapes(forward: Callable[..., Any], params: PyTree, x: Any, transforms: str = "") -> Any:
    """``jax.eval_shape`` of a recording forward pass; a layer recorded inside an inner trace
    (a lifted transformation ``transforms`` names) is refused with its reason."""
    try:
        return jax.eval_shape(forward, params, x)
    except jax.errors.UnexpectedTracerError as e:
        raise UnsupportedModelError(
            f"a layer runs inside a lifted transformation {transforms}or another inner trace, where the fast "
            f"path cannot capture its input and output gradient ({str(e).splitlines()[0]})",
            reason="a layer inside a lifted transformation",
        ) from None


def check_example_axis(uses: Sequence[Use], m: int) -> None:
    """Refuse a recorded layer whose input or output has no leading axis of the m examples."""
    for u in uses:
        for what, t in (("input", u.a), ("output", u.y)):
            shape = tuple(t.shape)
            min_ndim = 1 if (u.kind, u.method, what) == ("Embed", "__call__", "input") or u.kind == OWN else 2
            if len(shape) < min_ndim or shape[0] != m:
                raise _unsupported(
                    u.where, f"its {what} {shape} has no leading example axis of the batch's {m} examples (a "
                    "time-major or folded layout, a broadcast buffer, or part of the batch)"
                )


def _stack_of(u: Use, params: PyTree) -> tuple[int, ...]:
    """The leading axes nn.scan stacked a lifted layer's parameters along: the parameters' shapes
    outside the transformations are these axes (one per nn.scan) and then the shapes inside."""
    sub = _subtree(params, u.path)
    stacks = set()
    for name, inner in u.inner:
        outer = tuple(jnp.shape(sub[name])) if isinstance(sub, Mapping) and name in sub else None
        n = len(outer) - len(inner) if outer is not None else -1
        if outer is None or n != u.scans or outer[n:] != inner:
            raise _unsupported(
                u.where, f"its parameter {name!r} has shape {outer} outside nn.remat / nn.scan and {inner} inside: "
                f"not {u.scans} leading axes of stacked layers"
            )
        stacks.add(outer[:n])
    if len(stacks) != 1:
        raise _unsupported(u.where, f"its parameters are stacked along different axes {sorted(stacks)}")
    return stacks.pop()


def structure(uses: Plan) -> tuple:
    """What must agree between the probed and the full batch: the layer calls in
    order, their captured shapes without the example axis and their stacking by nn.scan."""
    return tuple((u.path, u.method, tuple(u.a.shape[1:]), tuple(u.y.shape[1:]), u.stack) for u in uses)


_PARAM_NAMES = {
    "Dense": ("kernel", "bias"),
    "DenseGeneral": ("kernel", "bias"),
    "Conv": ("kernel", "bias"),
    "Embed": ("embedding",),
    "LayerNorm": ("scale", "bias"),
}


def _per_position(x: jax.Array, m: int, where: str) -> jax.Array:
    """(m, ..., f) -> (m, T, f): every non-example, non-feature axis is a position sharing the weights."""
    if x.ndim < 2 or x.shape[0] != m:
        raise _unsupported(where, f"layer input/output {tuple(x.shape)} has no leading example axis {m}")
    return x.reshape(m, -1, x.shape[-1])


def _sliced_patches(
    x: jax.Array, ks: tuple[int, ...], strides: tuple[int, ...], k_dil: tuple[int, ...], padding: Any
) -> jax.Array:
    """Patches (N, *out_spatial, prod(ks), c_in) by strided slicing: no arithmetic, unlike an
    identity-filter convolution, whose cost grows with (prod(ks) * c_in)^2."""
    spatial = x.shape[1:-1]
    window = tuple((k - 1) * d + 1 for k, d in zip(ks, k_dil))
    pads = jax.lax.padtype_to_pads(spatial, window, strides, padding) if isinstance(padding, str) else padding
    x = jnp.pad(x, [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)])
    out = tuple((n - w) // s + 1 for n, w, s in zip(x.shape[1:-1], window, strides))
    slices = []
    for offsets in itertools.product(*(range(k) for k in ks)):
        start = tuple(o * d for o, d in zip(offsets, k_dil))
        limit = tuple(b + (o - 1) * s + 1 for b, o, s in zip(start, out, strides))
        slices.append(
            jax.lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), (1, *strides, 1))
        )
    return jnp.stack(slices, axis=-2)


def _conv_patches(mod: nn.Conv, x: jax.Array, m: int) -> jax.Array:
    """The unfolded input patches of a Conv call, shape (m, T, k * c_in)."""
    ks = (mod.kernel_size,) if isinstance(mod.kernel_size, int) else tuple(mod.kernel_size)
    n = len(ks)

    def bc(v: Any) -> tuple[int, ...]:
        v = 1 if v is None else v
        return (v,) * n if isinstance(v, int) else tuple(v)

    x = x.reshape((-1,) + x.shape[x.ndim - n - 1 :])
    strides, in_dil, k_dil = bc(mod.strides), bc(mod.input_dilation), bc(mod.kernel_dilation)
    padding = canonicalize_padding(mod.padding, n)
    if padding in ("CIRCULAR", "REFLECT"):  # as flax pads before a VALID convolution
        dil = [(k - 1) * d + 1 for k, d in zip(ks, k_dil)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dil] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    elif padding == "CAUSAL":
        x = jnp.pad(x, [(0, 0), (k_dil[0] * (ks[0] - 1), 0), (0, 0)])
        padding = "VALID"
    if all(d == 1 for d in in_dil):
        return _sliced_patches(x, ks, strides, k_dil, padding).reshape(m, -1, x.shape[-1] * math.prod(ks))
    nd = x.ndim
    spec = (0, nd - 1) + tuple(range(1, nd - 1))
    dn = jax.lax.ConvDimensionNumbers(spec, (nd - 1, nd - 2) + tuple(range(nd - 2)), spec)
    patches = jax.lax.conv_general_dilated_patches(
        x, ks, strides, padding, lhs_dilation=in_dil, rhs_dilation=k_dil,
        dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST,
    )  # (N, *out_spatial, c_in * prod(ks)); the order of the features does not change norms
    return patches.reshape(m, -1, patches.shape[-1])


def _dense_general_positions(
    mod: nn.DenseGeneral, a: jax.Array, b: jax.Array, m: int, where: str
) -> tuple[jax.Array, jax.Array]:
    """A DenseGeneral (batch_dims=()) as a Dense over positions: input (m, T, prod(contracted axes))
    and output gradient (m, T, prod(features)), T = prod(the input's other non-example axes).

    Its output is ``dot_general(a, kernel)``: the input's free axes in order, then the features,
    so position t of the output is the kernel applied to position t's contracted block of ``a``.
    """
    axes = _dense_general_axes(mod, a.ndim)
    free = tuple(ax for ax in range(1, a.ndim) if ax not in axes)
    if a.shape[0] != m or 0 in axes:
        raise _unsupported(where, f"input {tuple(a.shape)} has no leading example axis {m} outside the contraction")
    features = _canonicalize(mod.features)
    t = math.prod(a.shape[ax] for ax in free)
    want = (m, *(a.shape[ax] for ax in free), *features)
    if tuple(b.shape) != want:
        raise _unsupported(where, f"output {tuple(b.shape)} is not (examples, free input axes, features) {want}")
    a3 = jnp.transpose(a, (0, *free, *axes)).reshape(m, t, math.prod(a.shape[ax] for ax in axes))
    return a3, b.reshape(m, t, math.prod(features))


def _layer_sq_norms(kind: str, mod: nn.Module, a: Any, b: jax.Array, m: int, where: str) -> jax.Array:
    """Per-example squared norm (m,) of the gradient of this layer's parameters."""
    b3 = _per_position(b, m, where)
    if kind == "Dense":
        sq = linear_sq_norms(_per_position(a, m, where).astype(b.dtype), b3)
    elif kind == "DenseGeneral":
        assert isinstance(mod, nn.DenseGeneral)
        a3, b3 = _dense_general_positions(mod, a.astype(b.dtype), b, m, where)
        sq = linear_sq_norms(a3, b3)
    elif kind == "Conv":
        assert isinstance(mod, nn.Conv)
        patches = _conv_patches(mod, a.astype(b.dtype), m)
        if patches.shape[1] != b3.shape[1]:
            raise _unsupported(where, f"unfolded positions {patches.shape[1]} != outputs {b3.shape[1]}")
        sq = linear_sq_norms(patches, b3)
    elif kind == "Embed":
        return embedding_sq_norms(jnp.reshape(a, (m, -1)), b3)
    else:  # LayerNorm: d scale_i = sum_t b_it * xhat_it, d bias_i = sum_t b_it
        x = _per_position(a, m, where).astype(jnp.promote_types(b.dtype, jnp.float32))
        mean = jnp.mean(x, axis=-1, keepdims=True)
        if mod.use_fast_variance:
            var = jnp.maximum(0.0, jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean)
        else:
            var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
        xhat = ((x - mean) * jax.lax.rsqrt(var + mod.epsilon)).astype(b.dtype)
        sq = jnp.zeros((m,), b.dtype)
        if mod.use_scale:
            sq = sq + jnp.sum(jnp.sum(b3 * xhat, axis=1) ** 2, axis=1)
        return sq + bias_sq_norms(b3) if mod.use_bias else sq
    return sq + bias_sq_norms(b3) if mod.use_bias else sq


def _own_sq_norms(u: Use, own: PyTree, a: Any, b: jax.Array, m: int, consts: Mapping[str, Any]) -> jax.Array:
    """Per-example squared norm (m,) of the gradient of a module's own parameters ``own``: the
    module's VJP on each example alone, at its captured input row and output gradient row (exact
    for a module that treats its examples separately; the probe's value check catches one that
    does not). ``consts``: the module's variables in the constant collections
    (``FlaxLoss.collections``, e.g. running statistics). Chunks of examples bound the
    per-example gradients held at once."""
    wide = compute_dtype(b.dtype)
    b = b.astype(u.y.dtype)  # the cotangent in the output's own dtype

    def one(ab: tuple) -> jax.Array:
        ai, bi = ab
        _, vjp = jax.vjp(lambda lp: u.module.apply({"params": lp, **consts}, ai[None]), own)
        g = vjp(bi[None])[0]
        return sum(jnp.sum(jnp.square(x.astype(wide))) for x in jax.tree.leaves(g))

    size = max(1, sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(own)))
    return jax.lax.map(one, (a, b), batch_size=max(1, min(m, OWN_CHUNK_ENTRIES // size)))


def _path_sq_norms(
    uses: list[Use], inputs: dict, out_grads: dict, m: int, params: PyTree, collections: Mapping[str, Any]
) -> jax.Array:
    """Per-example squared norm (m,) of the gradient of one layer's parameters,
    summed over its uses (an Embed used as lookup and as tied projection ``attend``)."""
    if len(uses) == 1 and uses[0].kind == OWN:
        u = uses[0]
        key = (u.path, u.method)
        own, consts = _subtree(params, u.path), _constants(collections, u.path)
        return _own_sq_norms(u, own, inputs[key], out_grads[key], m, consts)
    if len(uses) == 1 and uses[0].kind != "Embed":
        u = uses[0]
        key = (u.path, u.method)
        return _layer_sq_norms(u.kind, u.module, inputs[key], out_grads[key], m, u.where)
    by_method = {u.method: u for u in uses}
    look, att = by_method.get("__call__"), by_method.get("attend")
    dtype = out_grads[(uses[0].path, uses[0].method)].dtype
    sq = jnp.zeros((m,), dtype)
    if look is not None:
        ids = jnp.reshape(inputs[(look.path, look.method)], (m, -1))
        b1 = _per_position(out_grads[(look.path, look.method)], m, look.where)
        sq = sq + embedding_sq_norms(ids, b1)
    if att is not None:
        b2 = _per_position(out_grads[(att.path, att.method)], m, att.where)
        q = _per_position(inputs[(att.path, att.method)], m, att.where).astype(b2.dtype)
        sq = sq + linear_sq_norms(q, b2)
    if look is not None and att is not None:
        sq = sq + 2 * embedding_linear_cross_sq_norms(ids, b1, q, b2)
    return sq


def _unstack(x: Any, stack: tuple[int, ...]) -> Any:
    """(*stack, ...) -> (prod(stack), ...): one row per stacked layer."""
    return jnp.reshape(x, (math.prod(stack),) + tuple(jnp.shape(x))[len(stack):])


def _nest(path: tuple[str, ...], tree: PyTree) -> PyTree:
    for name in reversed(path):
        tree = {name: tree}
    return tree


def _stacked_sq_norms(
    uses: list[Use], inputs: dict, out_grads: dict, m: int, params: PyTree, collections: Mapping[str, Any]
) -> jax.Array:
    """:func:`_path_sq_norms` of a layer stacked by nn.scan: each iteration's parameters are their own,
    so the norms of the layers stacked along the leading axes add (one layer at a time, ``lax.map``)."""
    stack = uses[0].stack
    if not stack:  # outside lifted transformations, or under nn.remat alone
        return _path_sq_norms(uses, inputs, out_grads, m, params, collections)
    path = uses[0].path
    if _constants(collections, path):
        raise _unsupported(uses[0].where, "constant collections (FlaxLoss.collections) of a layer inside nn.scan")
    keys = [(u.path, u.method) for u in uses]
    rows = (
        {k: _unstack(inputs[k], stack) for k in keys},
        {k: _unstack(out_grads[k], stack) for k in keys},
        jax.tree.map(lambda x: _unstack(x, stack), _subtree(params, path)),
    )

    def one(row: tuple) -> jax.Array:
        ins, outs, own = row
        return _path_sq_norms(uses, ins, outs, m, _nest(path, own), {})

    return jnp.sum(jax.lax.map(one, rows), axis=0)


def _with_lifted(params: PyTree, extras: Mapping[Key, tuple[jax.Array, jax.Array]]) -> PyTree:
    """The parameters with each lifted layer's zero output perturbation and input tap added under
    its path (``_PERTURB``, ``_TAP`` + method), new dicts along those paths."""
    if not extras:
        return params
    out = dict(params)
    for (path, method), (b, a) in extras.items():
        node = out
        for name in path:
            node[name] = dict(node[name])
            node = node[name]
        node[_PERTURB + method], node[_TAP + method] = b, a
    return out


def _fast_parts(floss: FlaxLoss, params: PyTree, batch: PyTree, w: jax.Array, uses: Plan) -> tuple:
    """One forward and backward pass: (BatchStats, parameter gradients, captured
    inputs and output gradients by (path, method), per-example squared norms by path)."""
    m = batch_size_of(batch)
    dtype = stat_dtype(params)  # count, loss sum and S: >= float32 whatever the parameters' dtype
    w = jnp.asarray(w).astype(dtype)
    x = floss.inputs(batch)
    zeros = {(u.path, u.method): jnp.zeros(u.y.shape, u.y.dtype) for u in uses if u.stack is None}
    # inside nn.remat / nn.scan: (output perturbation, input tap), one slice per stacked layer
    lifted = {
        (u.path, u.method): (jnp.zeros(u.stack + u.y.shape, u.y.dtype), jnp.zeros(u.stack + u.a.shape, u.a.dtype))
        for u in uses if u.stack is not None
    }

    def weighted_loss(p: PyTree, eps: dict, lifted_zeros: dict) -> tuple[jax.Array, tuple]:
        recorder = _Recorder(eps)
        with nn.intercept_methods(recorder):
            out = floss.module.apply({"params": _with_lifted(p, lifted_zeros), **floss.collections}, x)
        losses = jax.vmap(floss.output_loss)(out, batch).astype(dtype)
        losses = jnp.where(w != 0, losses, 0)
        return jnp.sum(w * losses), (losses, {k: u.a for k, u in recorder.uses.items() if u.stack is None})

    grads, (losses, inputs) = jax.grad(weighted_loss, argnums=(0, 1, 2), has_aux=True)(params, zeros, lifted)
    param_grads, out_grads, lifted_grads = grads
    for key, (b, a) in lifted_grads.items():  # the gradient of the tap is the layer's input
        out_grads[key], inputs[key] = b, a
    by_path: dict[tuple[str, ...], list[Use]] = {}
    for u in uses:
        by_path.setdefault(u.path, []).append(u)
    sq_by_path = {}
    # the norms from activations and output gradients in at least float32 (bfloat16 ones are upcast)
    wide_grads = {k: b.astype(compute_dtype(b.dtype)) for k, b in out_grads.items()}
    with jax.default_matmul_precision("highest"):  # no reduced-precision (e.g. TF32) products in the norms
        for path, group in by_path.items():
            sq_by_path[path] = _stacked_sq_norms(group, inputs, wide_grads, m, params, floss.collections).astype(dtype)
    sq = sum(sq_by_path.values(), jnp.zeros((m,), dtype))
    # b carries the factor w_i, so the norms carry w_i^2 = w_i for a 0/1 mask
    sq_sum = jnp.sum(jnp.where(w != 0, sq, 0))
    leaves = zip(jax.tree.leaves(param_grads), jax.tree.leaves(params))
    grad_sum = tuple(g.astype(jnp.result_type(p)) for g, p in leaves)  # the parameters' dtypes (they feed the update)
    stats = BatchStats(jnp.sum(w), jnp.sum(w * losses), grad_sum, sq_sum)
    return stats, param_grads, inputs, out_grads, sq_by_path


def _constants(collections: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The constant collections' variables of the module at ``path`` (those that have some)."""
    out = {}
    for name, tree in collections.items():
        try:
            out[name] = _subtree(tree, path)
        except (KeyError, TypeError):
            continue
    return out


def _subtree(tree: PyTree, path: tuple[str, ...]) -> PyTree:
    for name in path:
        tree = tree[name]
    return tree


def probe_numbers(floss: FlaxLoss, params: PyTree, batch: PyTree) -> tuple:
    """What the probe compares, on a small batch (traceable; jitted by the caller):
    the fast and the generic S, and for every layer the norm of (its gradient rebuilt
    from the captured per-layer terms - its full gradient), the full gradient's norm
    and the layer's S (the accounting check's scale)."""
    k = batch_size_of(batch)
    uses = _plan(floss, params, floss.inputs(batch), k)
    stats, param_grads, inputs, out_grads, sq_by_path = _fast_parts(
        floss, params, batch, jnp.ones((k,), float_dtype(params)), uses
    )
    generic = generic_stats(floss, params, batch)
    rebuilt: dict[tuple[str, ...], PyTree] = {}
    for u in uses:  # the layer's own VJP at its captured input and output gradient, summed over its uses
        key = (u.path, u.method)

        def layer_grad(row: tuple, u: Use = u) -> PyTree:
            lp, a, b = row
            consts = _constants(floss.collections, u.path)
            _, vjp = jax.vjp(lambda q: u.module.apply({"params": q, **consts}, a, method=u.method), lp)
            return vjp(b)[0]

        row = (_subtree(params, u.path), inputs[key], out_grads[key])
        if u.stack:  # one layer of the stack at a time
            g = jax.lax.map(layer_grad, jax.tree.map(lambda x, st=u.stack: _unstack(x, st), row))
            g = jax.tree.map(lambda x, st=u.stack: x.reshape(st + x.shape[1:]), g)
        else:
            g = layer_grad(row)
        rebuilt[u.path] = g if u.path not in rebuilt else jax.tree.map(jnp.add, rebuilt[u.path], g)
    accounting = {}
    for path, g in rebuilt.items():
        full = _subtree(param_grads, path)
        diff = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(full))))
        norm = jnp.sqrt(sum(jnp.sum(b**2) for b in jax.tree.leaves(full)))
        accounting["/".join(path)] = (diff, norm, jnp.sum(sq_by_path[path]))
    return stats.sq_norm_sum, generic.sq_norm_sum, accounting


def fast_stats_unchecked(
    floss: FlaxLoss, params: PyTree, batch: PyTree, weights: jax.Array | None = None
) -> BatchStats:
    """The fast path without the probe (the caller has established it for this
    signature): only the structural checks of the full batch."""
    m = batch_size_of(batch)
    w = check_weights(weights, m, stat_dtype(params))
    uses = _plan(floss, params, floss.inputs(batch), m)
    return _fast_parts(floss, params, batch, w, uses)[0]


def fast_stats(floss: FlaxLoss, params: PyTree, batch: PyTree, weights: jax.Array | None = None) -> BatchStats:
    """Exact :class:`~cabs_core.BatchStats` from one forward and one backward pass.

    Same contract as :func:`cabs_jax.generic_stats` (``weights`` a 0/1 mask);
    raises :class:`~cabs_core.UnsupportedModelError` naming the layer for models
    whose per-example decomposition it cannot establish (see :mod:`cabs_jax.verify`).
    """
    from .verify import resolve

    resolve(floss, params, batch, weights, "fast")
    return fast_stats_unchecked(floss, params, batch, weights)


def is_supported(floss: FlaxLoss, params: PyTree, batch: PyTree) -> tuple[bool, str | None]:
    """Whether :func:`fast_stats` establishes its decomposition for this model and batch (and why not)."""
    from .verify import resolve

    try:
        resolve(floss, params, batch, None, "fast")
    except BatchNormTrainingError:
        raise
    except UnsupportedModelError as e:
        return False, str(e)
    return True, None


__all__ = ["BatchNormTrainingError", "FlaxLoss", "fast_stats", "is_supported"]
