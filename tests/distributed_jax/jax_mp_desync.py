"""One process of a 2-process run of examples/jax_multiprocess.py whose process 1
moves its controller's moving average by a relative 1e-9 after step 4: the digest
check at step 5 (check_every=5) must raise DesyncError on both processes. Prints one JSON
line: the step at which DesyncError was raised and its message."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "jax_multiprocess.py"
spec = importlib.util.spec_from_file_location("jax_multiprocess", EXAMPLE)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)

args = example.parse(sys.argv[1:])
jax = example.start_jax(args)
from cabs_core import DesyncError  # noqa: E402

trainer, state = example.make_trainer(args)
result: dict = {"process": jax.process_index(), "raised_at": None}
try:
    for step in range(1, 11):
        state, _ = trainer.step(state)
        if step == 4 and jax.process_index() == 1:
            c = state.controller
            state = state._replace(controller=dataclasses.replace(c, xi_avg=c.xi_avg * (1 + 1e-9)))
except DesyncError as e:
    result.update(raised_at=step, message=str(e))
print(json.dumps(result), flush=True)
