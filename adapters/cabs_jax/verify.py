"""What the fast path establishes before it returns S (issue 12), and the fallback.

The fast path's per-layer decomposition holds only if every captured layer
input and output gradient carries the examples along its leading axis and
every use of every parameter is seen. For each *signature* (the
:class:`FlaxLoss`, the parameters' tree and shapes, the inputs' shapes and
dtypes without the example axis) :func:`resolve` establishes it once with a
**probe** on ``k`` examples, ``k = cabs_core.probe_batch_size(m, avoid=<every
other input dimension and, where possible, every parameter dimension>)``:

1. structure: traced at k examples, every captured tensor's leading axis has
   length k (a time-major ``(T, m, d)`` tensor, an ``x.reshape(m*T, d)``, a
   broadcast ``(T, d)`` buffer or half a batch all fail this, also when T
   equals m), and the same layer calls with the same non-example shapes as at
   the full batch;
2. accounting: each layer's gradient rebuilt from its captured terms (the
   layer's own VJP at its input and output gradient, summed over examples)
   equals the parameter's full gradient, so there is no unseen use (e.g.
   ``self.embed.embedding.T`` as an output projection);
3. values: the fast S equals the generic S on those k examples.

The probe runs as its own jitted computation on real examples (the first k
with weight != 0) when the values are concrete (eager calls, the trainer,
which probes on the host side before its compiled step); inside a caller's
``jax.jit`` trace, where no values exist yet, it runs at trace time on
synthetic values of the same shapes (normal floats, zero integers). The
verdict is cached per signature; the trainer re-probes every ``verify_every``
steps. A failed check: ``method="fast"`` raises
:class:`~cabs_core.UnsupportedModelError` naming the layer and the reason;
``method="auto"`` warns once per signature (:class:`~cabs_core.FastPathFallbackWarning`)
and uses the exact generic path for that signature.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cabs_core import (
    BatchNormTrainingError,
    FastPathFallbackWarning,
    UnsupportedModelError,
    accounting_scale,
    check_close,
    probe_batch_size,
    rtol_for,
)

from . import flax_fast, nnx_fast
from .flax_fast import FlaxLoss, structure
from .nnx import NNXLoss
from .stats import PyTree, batch_size_of, float_dtype


def fast_impl(floss: Any) -> Any:
    """The module implementing the fast path of this loss (``_plan``, ``probe_numbers``,
    ``fast_stats_unchecked``): the loss's own ``fast_impl`` (e.g. :mod:`cabs_jax.eqx_fast` for an
    :class:`~cabs_jax.EquinoxLoss`), :mod:`cabs_jax.nnx_fast` for an :class:`~cabs_jax.NNXLoss`,
    else :mod:`cabs_jax.flax_fast` (linen)."""
    impl = getattr(floss, "fast_impl", None)
    if impl is not None:
        return impl
    return nnx_fast if isinstance(floss, NNXLoss) else flax_fast


def has_fast_path(floss: Any) -> bool:
    """Whether ``floss`` is a loss the fast path knows (linen, NNX, or one that names its ``fast_impl``)."""
    return isinstance(floss, (FlaxLoss, NNXLoss)) or getattr(floss, "fast_impl", None) is not None


def _plan(floss: Any, params: PyTree, x: Any, m: int) -> tuple:
    return fast_impl(floss)._plan(floss, params, x, m)


def probe_numbers(floss: Any, params: PyTree, batch: PyTree) -> tuple:
    return fast_impl(floss).probe_numbers(floss, params, batch)


@dataclass
class Verdict:
    """The outcome of a probe for one signature: ``error`` None when the fast path holds."""

    error: UnsupportedModelError | None
    structure: tuple = ()
    checked: dict[int, UnsupportedModelError | None] = field(default_factory=dict)  # full-batch sizes seen
    warned: bool = False
    probes: int = 0
    inconclusive: bool = False  # the probe's values were not finite: probe again on the next call


_VERDICTS: weakref.WeakKeyDictionary[FlaxLoss, dict[tuple, Verdict]] = weakref.WeakKeyDictionary()


def _packed_probe(floss: FlaxLoss, params: PyTree, rows: PyTree) -> jax.Array:
    """:func:`probe_numbers` as one vector in their promoted dtype (exact: promotion only
    widens), so that a probe copies its numbers to the host in one transfer instead of
    one per number: ``[fast S, generic S, then per layer (difference, norm, layer S)]``."""
    s_fast, s_generic, accounting = probe_numbers(floss, params, rows)
    values = [s_fast, s_generic] + [v for t in accounting.values() for v in t]
    dtype = jnp.result_type(*values)
    return jnp.stack([jnp.asarray(v, dtype) for v in values])


def _unpack(vector: Any, known: tuple) -> tuple:
    """(fast S, generic S, {layer: (difference, norm, layer S)}) from :func:`_packed_probe`'s
    vector; ``known``: the probed structure, whose layer paths in order of first use are the
    order of the accounting (:func:`~cabs_jax.flax_fast.probe_numbers` plans the same calls)."""
    names = list(dict.fromkeys("/".join(entry[0]) for entry in known))
    v = [float(a) for a in np.asarray(vector)]
    if len(v) != 2 + 3 * len(names):
        raise UnsupportedModelError(f"the probe returned {len(v)} numbers for {len(names)} layers",
                                    reason="probe layers differ from the plan")
    return v[0], v[1], {name: tuple(v[2 + 3 * i: 5 + 3 * i]) for i, name in enumerate(names)}


_probe_jit = jax.jit(_packed_probe, static_argnums=0)


def _is_traced(tree: PyTree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], Any]:
    if isinstance(x, jax.Array):  # the common case, kept cheap: the trainer looks this up every step
        return x.shape, x.dtype
    return tuple(np.shape(x)), jax.dtypes.canonicalize_dtype(jnp.result_type(x))


def signature(params: PyTree, x: PyTree) -> tuple:
    """The parameters' tree, shapes and dtypes and the model input's without the example axis."""
    p_leaves, p_def = jax.tree.flatten(params)
    x_leaves, x_def = jax.tree.flatten(x)
    xs = [_shape_dtype(a) for a in x_leaves]
    return (p_def, tuple(_shape_dtype(a) for a in p_leaves), x_def, tuple((s[1:], d) for s, d in xs))


def _probe_size(params: PyTree, batch: PyTree, m: int) -> int | None:
    inputs = {int(d) for x in jax.tree.leaves(batch) for d in jnp.shape(x)[1:]}
    weights = {int(d) for x in jax.tree.leaves(params) for d in jnp.shape(x)}
    k = probe_batch_size(m, inputs | weights)
    return k if k is not None else probe_batch_size(m, inputs)


def _synthetic(tree: PyTree, seed: int) -> PyTree:
    """Concrete values of the shapes and dtypes of ``tree``: normal floats (scaled),
    zero integers and booleans; NumPy arrays, which stay concrete inside a caller's trace."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    out = []
    for x in leaves:
        shape, dtype = tuple(jnp.shape(x)), jnp.result_type(x)
        if jnp.issubdtype(dtype, jnp.floating):
            out.append(np.asarray(0.5 * rng.standard_normal(shape), dtype))
        else:
            out.append(np.zeros(shape, dtype))
    return jax.tree.unflatten(treedef, out)


def _run_probe(floss: FlaxLoss, params: PyTree, rows: PyTree) -> Any:
    """The probe program's numbers on host (one jitted program per signature, cached by the jit).
    Called with concrete values under a caller's trace (values closed over), the jit would be
    staged into that trace and give tracers: the program is then compiled and run by itself."""
    out = _probe_jit(floss, params, rows)
    if _is_traced(out):
        return _run_compiled(floss, params, rows)
    return jax.device_get(out)


def _run_compiled(floss: FlaxLoss, params: PyTree, rows: PyTree) -> Any:
    """Compile the probe program for these values and run it on them, also inside a caller's
    trace: lowering traces ``probe_numbers`` afresh and a compiled program runs on concrete
    arrays without entering the caller's trace. (Not ``jax.ensure_compile_time_eval``: under
    it every operation on constants in the probe's own trace ran eagerly, one small compilation
    each, 4x the probe's compilation time.)"""
    return jax.device_get(_probe_jit.lower(floss, params, rows).compile()(params, rows))


def _probe_rows(batch: PyTree, weights: Any, k: int) -> PyTree:
    """The first k examples with weight != 0 (padding rows only if there are fewer real ones).
    Arrays held on the host or on CPU devices are indexed in NumPy: an eager ``jnp.take``
    would compile a gather program for every batch size (a tenth of a second, once per
    bucket, on the first probe); arrays on an accelerator are gathered there."""
    if weights is None:
        idx = np.arange(k)
    else:
        w = np.asarray(weights)
        idx = np.concatenate([np.flatnonzero(w != 0), np.flatnonzero(w == 0)])[:k]

    def take(a: Any) -> Any:
        if isinstance(a, jax.Array) and (not a.is_fully_addressable or any(d.platform != "cpu" for d in a.devices())):
            return jnp.take(a, jnp.asarray(idx), axis=0)
        return np.asarray(a)[idx]

    return jax.tree.map(take, batch)


def probe(
    floss: FlaxLoss, params: PyTree, batch: PyTree, weights: Any, m: int, k: int, known: tuple | None = None
) -> Verdict:
    """Run the three checks on k examples (see the module docstring). ``known``: the
    structure an earlier probe of this signature established (a re-probe checks the
    values only: the traced structure is a function of the signature)."""
    x = floss.inputs(batch)
    try:
        if known is None:
            x_k = jax.tree.map(lambda a: jax.ShapeDtypeStruct((k,) + tuple(jnp.shape(a)[1:]), jnp.result_type(a)), x)
            uses_k = _plan(floss, params, x_k, k)
            uses_m = _plan(floss, params, x, m)
            if structure(uses_k) != structure(uses_m):
                where, reason = _first_difference(uses_k, uses_m, k, m)
                raise UnsupportedModelError(f"{where}: {reason}", layer=where, reason=reason)
            known = structure(uses_m)
            checked = {m: None}  # the full batch has the probed structure: _full_batch_check need not trace it again
        else:
            checked = {}
        if not (_is_traced(params) or _is_traced(batch) or _is_traced(weights)):
            with jax.ensure_compile_time_eval():  # the rows' values, also under a caller's trace (one gather)
                rows = _probe_rows(batch, weights, k)
            vector = _run_probe(floss, params, rows)
        else:  # inside a caller's trace: no values yet
            b_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct((k,) + tuple(jnp.shape(a)[1:]), a.dtype), batch)
            vector = _run_compiled(floss, _synthetic(params, 0), _synthetic(b_shapes, 1))
        s_fast, s_generic, accounting = _unpack(vector, known)
        numbers = [s_fast, s_generic] + [v for t in accounting.values() for v in t]
        if not all(np.isfinite(v) for v in numbers):
            return Verdict(None, inconclusive=True)  # non-finite values establish nothing either way
        rtol = rtol_for(str(float_dtype(params)))
        for layer, (diff, norm, s_layer) in accounting.items():
            check_close(
                f"the gradient of {layer!r} rebuilt from the layer's captured terms (an unseen use of its "
                "parameters, e.g. its weight used outside the layer)",
                diff, accounting_scale(norm, k, s_layer), rtol, layer=layer,
            )
        check_close(f"the fast S on a probe batch of {k} examples vs the generic S", abs(s_fast - s_generic),
                    abs(s_generic), rtol)
    except BatchNormTrainingError:
        raise
    except UnsupportedModelError as e:
        return Verdict(e)
    except Exception as e:  # the fast path's own machinery failed on this model: a result, not a crash
        reason = f"the fast path failed on this model: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return Verdict(UnsupportedModelError(reason, reason=reason))
    return Verdict(None, known, checked)


def _first_difference(uses_k: tuple, uses_m: tuple, k: int, m: int) -> tuple[str, str]:
    for a, b in zip(uses_k, uses_m):
        if structure((a,)) != structure((b,)):
            return a.where, f"its captured shapes depend on the batch size beyond the example axis ({k} vs {m})"
    return "model", f"the layer calls differ between a batch of {k} and one of {m} examples"


def _full_batch_check(floss: FlaxLoss, params: PyTree, batch: PyTree, m: int, verdict: Verdict) -> None:
    """The full batch has the probed capture structure (cached per batch size)."""
    if m not in verdict.checked:
        err = None
        try:
            uses = _plan(floss, params, floss.inputs(batch), m)
            if structure(uses) != verdict.structure:
                reason = f"the layer calls at {m} examples differ from the probed ones"
                err = UnsupportedModelError(reason, reason=reason)
        except UnsupportedModelError as e:
            err = e
        verdict.checked[m] = err
    if verdict.checked[m] is not None:
        raise verdict.checked[m]


def resolve(
    floss: FlaxLoss, params: PyTree, batch: PyTree, weights: Any, method: str, *, reprobe: bool = False
) -> str:
    """``"fast"`` or ``"generic"`` for this call; ``method="fast"`` raises
    :class:`~cabs_core.UnsupportedModelError` where ``"auto"`` falls back (one
    :class:`~cabs_core.FastPathFallbackWarning` per signature). ``reprobe``:
    probe again even if the signature has a verdict (the trainer's ``verify_every``)."""
    x = floss.inputs(batch)
    sig = signature(params, x)
    m = int(jnp.shape(jax.tree.leaves(x)[0])[0]) if jax.tree.leaves(x) else batch_size_of(batch)
    cache = _VERDICTS.get(floss)
    if cache is None:
        cache = _VERDICTS[floss] = {}
    verdict = cache.get(sig)
    if verdict is None or (reprobe and verdict.error is None):
        k = _probe_size(params, x, m)
        if k is None:
            reason = f"a batch of {m} examples is too small for a probe batch of a size no other dimension has"
            if method == "fast":
                raise UnsupportedModelError(f"cannot establish the fast path: {reason}", reason=reason)
            return "generic"
        known = verdict.structure if verdict is not None and m in verdict.checked else None
        new = probe(floss, params, batch, weights, m, k, known)
        if new.inconclusive:  # this call is exact on the generic path; the next one probes again
            return "generic"
        new.probes = (verdict.probes if verdict is not None else 0) + 1
        new.warned = verdict.warned if verdict is not None else False
        if verdict is not None and new.error is None and new.structure == verdict.structure:
            new.checked = {**verdict.checked, **new.checked}  # the full-batch sizes already checked against it
        cache[sig] = verdict = new
    try:
        if verdict.error is not None:
            raise verdict.error
        _full_batch_check(floss, params, batch, m, verdict)
    except UnsupportedModelError as e:
        if method == "fast":
            raise
        if not verdict.warned:
            verdict.warned = True
            warnings.warn(
                f"cabs_jax: method='auto' uses the exact generic path for this model and input signature: {e}",
                FastPathFallbackWarning,
                stacklevel=3,
            )
        return "generic"
    return "fast"


def probes_run(floss: FlaxLoss) -> int:
    """How many probes ran for ``floss`` (all signatures): for tests and the benchmark."""
    return sum(v.probes for v in _VERDICTS.get(floss, {}).values())
