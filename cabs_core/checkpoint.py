"""One checkpoint envelope for every adapter: the controller's configuration and
state, the sampler's position, and whatever the framework adds (parameters,
optimizer state), checked against the run that loads it.

A checkpoint written under one configuration and loaded under another would
continue a different algorithm without a word (another ``lr`` changes every
later decision; a decided size above the new ``bs_max`` fails a step later).
:func:`restore` compares the saved configuration with the current one and
raises :class:`CheckpointMismatchError` naming every difference, unless the
caller lists the keys it means to change in ``allow``. The envelope is plain
JSON-serialisable data; :func:`write_atomic` writes bytes so that an
interruption leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from .controller import CABSController, ControllerState
from .sampler import SamplerState

FORMAT = "cabs-checkpoint/1"


class CheckpointMismatchError(ValueError):
    """A checkpoint from another configuration or data set; ``differences``
    lists them, one ``"key: checkpoint X, now Y"`` string each."""

    def __init__(self, differences: list[str], hint: str = "") -> None:
        super().__init__(
            "the checkpoint does not match this run: " + "; ".join(differences)
            + (f". {hint}" if hint else "")
        )
        self.differences = differences


def controller_config(controller: CABSController) -> dict[str, Any]:
    """The controller's configuration as plain JSON values (buckets as a list)."""
    out = {}
    for f in fields(controller):
        v = getattr(controller, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def envelope(
    controller: CABSController, state: ControllerState, sampler: SamplerState | None = None, **extra: Any
) -> dict[str, Any]:
    """The checkpoint of a CABS run: ``{"format", "config", "controller", "sampler", **extra}``.
    ``extra`` holds the framework's own entries (e.g. its format tag, parameters)."""
    reserved = {"format", "config", "controller", "sampler"} & set(extra)
    if reserved:
        raise ValueError(f"extra entries may not be named {sorted(reserved)}")
    return {
        "format": FORMAT,
        "config": controller_config(controller),
        "controller": state.to_dict(),
        "sampler": None if sampler is None else sampler.to_dict(),
        **extra,
    }


def restore(
    d: dict[str, Any],
    controller: CABSController,
    sampler: SamplerState | None = None,
    *,
    allow: Iterable[str] = (),
) -> tuple[ControllerState, SamplerState | None]:
    """The controller and sampler states of checkpoint ``d``, for a run with
    ``controller`` (and ``sampler``, the run's fresh sampler, if it has one).

    Raises :class:`CheckpointMismatchError` naming every configuration key whose
    value differs, a different number of examples, or a different sampler seed,
    except the keys listed in ``allow`` (configuration keys, or ``"seed"``). When
    allowed changes move the bounds or the discretisation, the decision in force
    is discretised again under the new configuration, so that the next batch is
    one the new controller could have decided.
    """
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"not a CABS checkpoint (format {got!r}, expected {FORMAT!r})")
    allowed = set(allow)
    known = set(controller_config(controller)) | {"seed"}
    if allowed - known:
        raise ValueError(f"allow names unknown keys {sorted(allowed - known)}; known: {sorted(known)}")
    saved, now = d["config"], controller_config(controller)
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}"
        for k in now
        if saved.get(k) != now[k] and k not in allowed
    ]
    state = ControllerState.from_dict(d["controller"])
    restored = None
    if d.get("sampler") is not None:
        restored = SamplerState.from_dict(d["sampler"])
        if sampler is not None:
            if restored.num_examples != sampler.num_examples:
                diffs.append(f"num_examples: checkpoint {restored.num_examples}, now {sampler.num_examples}")
            if restored.seed != sampler.seed:
                if "seed" in allowed:
                    restored = replace(restored, seed=sampler.seed)
                else:
                    diffs.append(f"seed: checkpoint {restored.seed}, now {sampler.seed}")
    elif sampler is not None:
        diffs.append("sampler: the checkpoint has no sampler state, this run has a sampler")
    if diffs:
        raise CheckpointMismatchError(
            diffs,
            "Load it with the configuration it was written with, or pass allow=[...] naming the keys "
            "you mean to change.",
        )
    decided = controller.discretise(state.batch_size)
    return replace(state, batch_size=decided), restored


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a
    rename: an interruption leaves the old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
