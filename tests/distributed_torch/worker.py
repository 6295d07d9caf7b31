"""One rank of the data-parallel tests, launched like torchrun does (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) by launch.py.

    python worker.py SCENARIO OUT_DIR [CHECKPOINT]

Writes OUT_DIR/rank{RANK}.json with what the test compares.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from cabs_torch import DataParallelCABSTrainer

from cabs_core import CABSController, DesyncError

torch.set_num_threads(1)
_spec = importlib.util.spec_from_file_location("dist_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(common)  # type: ignore[union-attr]


def run(method: str, x, y, out: Path, save: bool) -> dict:
    model = common.model(seed=dist.get_rank())  # different on each rank: the broadcast makes them equal
    opt = DataParallelCABSTrainer(model, common.ce, common.controller(), method=method, check_every=3)
    sampler = opt.batch_sampler(common.N_EXAMPLES, seed=common.SEED)
    log = common.train(opt, sampler, x, y, common.RESUME_AT)
    if save and dist.get_rank() == 0:
        torch.save({"model": model.state_dict(), "cabs": opt.state_dict()}, out / "ckpt_2proc.pt")
    log += common.train(opt, sampler, x, y, common.STEPS - common.RESUME_AT)
    assert opt.stats_fn.resolved_method == method
    return {"log": log, "params": common.flat_params(model), "state": opt.state.to_dict()}


def resume(path: Path, x, y) -> dict:
    ckpt = torch.load(path, weights_only=True)
    model = common.model(seed=7)
    model.load_state_dict(ckpt["model"])
    opt = DataParallelCABSTrainer(model, common.ce, common.controller())
    sampler = opt.batch_sampler(common.N_EXAMPLES, seed=common.SEED)
    opt.load_state_dict(ckpt["cabs"])
    log = common.train(opt, sampler, x, y, common.STEPS - common.RESUME_AT)
    return {"log": log, "params": common.flat_params(model)}


def desync(x, y) -> dict:
    """Rank 1 moves its moving average by one ulp after step 1; the check at step 2 must catch it."""
    opt = DataParallelCABSTrainer(common.model(), common.ce, common.controller(), check_every=2)
    sampler = opt.batch_sampler(common.N_EXAMPLES, seed=common.SEED)
    result: dict = {"raised_at": None}
    try:
        for step in range(1, 7):
            idx = torch.from_numpy(sampler.next_indices())
            opt.step(x[idx], y[idx])
            if step == 1 and dist.get_rank() == 1:
                nudged = dataclasses.replace(opt.state, xi_avg=math.nextafter(opt.state.xi_avg, math.inf))
                opt.state = nudged
    except DesyncError as e:
        result.update(raised_at=step, message=str(e))
    # another configuration on one rank: caught when the optimizer is built
    lr = 0.5 if dist.get_rank() == 0 else 0.25
    try:
        DataParallelCABSTrainer(common.model(), common.ce, CABSController(lr=lr, bs_min=4, bs_max=96))
    except DesyncError as e:
        result["config_message"] = str(e)
    try:
        DataParallelCABSTrainer(common.model(), common.ce, CABSController(lr=0.5, bs_min=1, bs_max=96))
    except ValueError as e:
        result["bs_min_message"] = str(e)
    return result


def loop_reference_problem() -> dict:
    """The linear problem of cabs_conformance.loop_reference drawn by the trainer itself
    (data=...), plain SGD and, with max_micro_batch=3, torch SGD with momentum."""
    from cabs_conformance.loop_reference import problem

    data, w = problem()
    out = {}
    for name, micro, momentum in (("plain", None, 0.0), ("micro_momentum", 3, 0.9)):
        model = torch.nn.Linear(len(w), 1, bias=False).double()
        torch.nn.init.zeros_(model.weight)
        opt = None if not momentum else torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
        tr = DataParallelCABSTrainer(model, lambda o, t: 0.5 * (o[:, 0] - t) ** 2,
                                     CABSController(lr=0.05, c=40.0, bs_min=4, bs_max=64, mu=0.9), data=data,
                                     seed=3, max_micro_batch=micro, optimizer=opt, check_every=1)
        sizes = [tr.step().batch_size for _ in range(12)]
        out[name] = {"sizes": sizes, "w": np.asarray(model.weight.detach()[0]).tolist()}
    return out


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    (out / f"ready{rank}").write_text(str(os.getpid()))
    if scenario == "hang":  # rank 0 waits in a collective that rank 1 never joins
        if rank == 0:
            dist.barrier()
        time.sleep(600)
        return
    x, y = common.data()
    result = {
        "world_size": dist.get_world_size(),
        "fast": run("fast", x, y, out, save=True),
        "generic": run("generic", x, y, out, save=False),
        "resumed": resume(Path(sys.argv[3]), x, y),
        "desync": desync(x, y),
        "loop": loop_reference_problem(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
