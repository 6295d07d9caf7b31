"""One worker of the MultiWorkerMirroredStrategy tests (test_multiworker.py sets TF_CONFIG):
several scenarios in one process (TensorFlow's import is the slow part), built from the
example's own functions (examples/tf_multiworker.py).

    python multiworker_worker.py OUT_DIR TIMEOUT_S

Writes OUT_DIR/worker{i}.json; worker 1 kills itself (SIGKILL) in the last scenario.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import cabs_tf  # noqa: E402

import cabs_core  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("tf_multiworker", ROOT / "examples" / "tf_multiworker.py")
ex = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(ex)  # type: ignore[union-attr]

STEPS, SAVE_EVERY, KILL_AFTER = 8, 2, 5  # the killed run's last checkpoint: step 4


def main() -> None:
    out, timeout_s = Path(sys.argv[1]), float(sys.argv[2])
    me = int(json.loads(os.environ["TF_CONFIG"])["task"]["index"])
    strategy = ex.make_strategy(timeout_s)
    result: dict = {"worker": me, "replicas": strategy.num_replicas_in_sync}

    # 1. the single-process CABSTrainer (default strategy) and the two-worker trainer on the same batches
    ref = ex.make_trainer(None)
    result["single"] = ex.train(ref, STEPS)
    result["single_params"], result["single_state"] = ex.parameters(ref), ref.state.to_dict()
    full = ex.make_trainer(strategy, check_every=2)
    result["processes"], result["process_index"] = full.backend.processes, full.backend.process_index
    result["full"] = ex.train(full, STEPS)
    result["full_params"], result["full_state"] = ex.parameters(full), full.state.to_dict()

    # 2. worker 1 nudges its controller's average by 1e-12 (relative) after step 1 (one ulp can round away in
    #    the next average): the check at step 2 fails on both workers
    nudged = ex.make_trainer(strategy, check_every=2)
    result["desync"] = None
    try:
        for step in range(1, 5):
            nudged.step()
            if step == 1 and me == 1:
                nudged.state = dataclasses.replace(nudged.state, xi_avg=nudged.state.xi_avg * (1 + 1e-12))
    except cabs_core.DesyncError as e:
        result["desync"] = {"step": step, "error_step": e.step, "names": e.names, "message": str(e)}

    # 3. a run that saves every 2 steps; worker 1 dies after step 5, worker 0 must fail at step 6 naming it
    killed = ex.make_trainer(strategy, check_every=2)
    ex.train(killed, KILL_AFTER, chief=me == 0, save=str(out / "killed.npz"), save_every=SAVE_EVERY)
    (out / f"worker{me}.json").write_text(json.dumps(result))
    if me == 1:  # once worker 0 has finished step 5 too (its last pulls from worker 1 served)
        deadline = time.monotonic() + 60
        while not (out / "worker0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        killed.step()
        result["lost"] = None
    except cabs_tf.WorkerLostError as e:
        result["lost"] = {"seconds": time.monotonic() - start, "message": str(e), "workers": e.lost,
                          "cause": type(e.__cause__).__name__}
    (out / f"worker{me}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
