"""What an adapter's fast path must establish before it returns S (spec section 4).

A fast path computes S = sum_i ||g_i||^2 layer by layer from captured layer
inputs and output gradients. That decomposition holds only if (a) every
captured tensor's example axis really carries the batch's examples, and (b)
every use of every parameter is seen. The adapters check both; this module
holds what they share: the error and warning they raise, the tolerances, the
probe batch size and the schedule of repeated probes.

- *Accounting check*: the per-layer terms, summed over the examples, must
  rebuild each parameter's full gradient (which includes any use outside the
  layer): :func:`check_close` with :func:`accounting_scale`.
- *Probe*: on first use of a model and input signature, and every
  ``verify_every`` steps, the fast S on a small batch (:func:`probe_batch_size`,
  a size that differs from every other dimension) equals the generic S.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

#: relative tolerances of the checks by floating-point dtype name: a few
#: thousand ulps of the accumulation, far below any error a broken
#: decomposition gives (the smallest seen was 2.5e-3)
RTOL = {"float64": 1e-9, "float32": 2e-4, "bfloat16": 2e-2, "float16": 1e-2}

#: default steps between two probes in the trainers (the first step always probes)
VERIFY_EVERY = 100


class UnsupportedModelError(ValueError):
    """The fast path cannot establish exact per-example statistics for this model.

    ``layer`` names the layer or parameter (None when the cause is global) and
    ``reason`` says what could not be established.
    """

    def __init__(self, message: str, *, layer: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.layer, self.reason = layer, reason if reason is not None else message


class BatchNormTrainingError(UnsupportedModelError):
    """BatchNorm normalising with batch statistics couples the examples, so
    per-example gradients (and the within-batch variance) are not defined."""


class FastPathFallbackWarning(UserWarning):
    """``method="auto"`` stepped aside from the fast path to the exact generic path."""


def rtol_for(dtype_name: str) -> float:
    """The checks' relative tolerance for a dtype name such as ``"float32"``."""
    name = str(dtype_name).rsplit(".", 1)[-1]
    if name not in RTOL:
        raise ValueError(f"no exactness tolerance for dtype {dtype_name!r}; known: {sorted(RTOL)}")
    return RTOL[name]


def relative_error(value: float, reference: float) -> float:
    """|value - reference| / |reference| (0 when both are 0, inf when only reference is)."""
    value, reference = float(value), float(reference)
    if value == reference:
        return 0.0
    if reference == 0.0 or not (math.isfinite(value) and math.isfinite(reference)):
        return math.inf
    return abs(value - reference) / abs(reference)


def accounting_scale(full_grad_norm: float, count: float, layer_sq_norm_sum: float) -> float:
    """The scale an accounting difference is compared with: the rounding error of
    sum_i g_i is bounded by eps * sum_i ||g_i|| <= eps * sqrt(m * S_layer), which
    can exceed eps * ||sum_i g_i|| when the examples' gradients cancel."""
    return max(float(full_grad_norm), math.sqrt(max(float(count), 0.0) * max(float(layer_sq_norm_sum), 0.0)))


def check_close(what: str, difference: float, scale: float, rtol: float, *, layer: str | None = None) -> None:
    """Raise :class:`UnsupportedModelError` unless ``difference <= rtol * scale``.

    ``what`` says which quantity disagreed (e.g. ``"gradient of 'emb.weight'
    rebuilt from the layer's terms"``); the message names it and the layer.
    """
    difference, scale = float(difference), float(scale)
    if math.isfinite(difference) and math.isfinite(scale) and difference <= rtol * scale:
        return
    rel = difference / scale if scale > 0 else math.inf
    where = f" at {layer}" if layer else ""
    raise UnsupportedModelError(
        f"the fast path's per-example decomposition does not hold{where}: {what} differs by "
        f"{rel:.3g} (relative; tolerance {rtol:.1g}). The layer's example axis or a use of its "
        f"parameters is not what the fast path assumes; method='generic' is exact for any model.",
        layer=layer,
        reason=f"{what} differs by {rel:.3g} relative",
    )


def probe_batch_size(batch_size: int, avoid: Iterable[int] = (), smallest: int = 3) -> int | None:
    """The size of a probe batch drawn from a batch of ``batch_size`` examples:
    the smallest k >= ``smallest`` (or 2) that equals no dimension in ``avoid``
    (the inputs' other dimensions, and any the adapter adds). None if no
    k <= batch_size qualifies: such a step cannot be probed."""
    taken = {int(d) for d in avoid}
    for k in range(min(max(2, smallest), batch_size), batch_size + 1):
        if k >= 2 and k not in taken:
            return k
    return None


def verify_due(step: int, verify_every: int | None) -> bool:
    """Whether step ``step`` (0-based count of steps taken so far) probes:
    the first step always does, then every ``verify_every`` steps; ``None`` or 0
    probes only on the first step of each model and input signature."""
    if verify_every is not None and (
        isinstance(verify_every, bool) or not isinstance(verify_every, (int, np.integer)) or verify_every < 0
    ):
        raise ValueError(f"verify_every must be None or an integer >= 0, got {verify_every!r}")
    if step == 0:
        return True
    return verify_every is not None and verify_every > 0 and step % verify_every == 0


PATH_CODES = {"fast": 0, "generic": 1, "refused": 2}


def agree_on_path(probe: Callable[[], str], gather: Callable[[np.ndarray], np.ndarray]) -> str:
    """The one path every process takes for a step (a collective): each process
    establishes the fast path on its own shard, so their verdicts can differ, and
    processes on different programs would meet in the same collective.

    ``probe()``: this process's verdict (``"fast"`` or ``"generic"``), raising
    :class:`UnsupportedModelError` if it refuses the fast path (``method="fast"``).
    ``gather``: every process's int32 words, as :meth:`cabs_core.loop.Backend.gather`.
    Returns ``"fast"`` only if every process established it; a refusal on any
    process raises :class:`UnsupportedModelError` on every process, naming the
    ones that refused.
    """
    try:
        path, error = probe(), None
    except UnsupportedModelError as e:  # raised below on every process, after the gather
        path, error = None, e
    code = PATH_CODES["refused" if error is not None else path or "generic"]
    codes = np.asarray(gather(np.asarray([code], np.int32))).reshape(-1)
    refused = [p for p, c in enumerate(codes) if c == PATH_CODES["refused"]]
    if refused:
        why = f": {error}" if error is not None else " (see that process's error)"
        raise UnsupportedModelError(f"the fast path was refused on process(es) {refused}{why}",
                                    layer=getattr(error, "layer", None), reason=getattr(error, "reason", None))
    return "fast" if (codes == PATH_CODES["fast"]).all() else "generic"
