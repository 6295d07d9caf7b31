"""Data-parallel CABS on torch.distributed (gloo, 2 processes on the CPU) against
the single-process CABSTrainer on the same global batches: the same decisions, the
same parameters (float64, 1e-10 relative), resumption across world sizes
1 -> 2 and 2 -> 1, desync detection, and no process left behind."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from cabs_conformance.loop_reference import LinearBackend, problem
from cabs_torch import CABSTrainer, DataParallelCABSTrainer

from cabs_core import CABSController, shard
from cabs_core.loop import CABSLoop


def _load(name: str) -> ModuleType:
    """A helper module of this directory, by file path (the tests run with --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(f"distributed_torch_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


common, launcher = _load("common"), _load("launch")
LaunchError, launch, start, stop, wait = (
    launcher.LaunchError, launcher.launch, launcher.start, launcher.stop, launcher.wait
)
RTOL = 1e-10


def single_process(method: str, ckpt: Path | None = None) -> dict:
    """The reference: one process, whole global batches; saves a checkpoint after RESUME_AT steps."""
    x, y = common.data()
    model = common.model(seed=0)
    opt = CABSTrainer(model, common.ce, common.controller(), method=method)
    sampler = opt.batch_sampler(common.N_EXAMPLES, seed=common.SEED)
    log = common.train(opt, sampler, x, y, common.RESUME_AT)
    if ckpt is not None:
        torch.save({"model": model.state_dict(), "cabs": opt.state_dict()}, ckpt)
    log += common.train(opt, sampler, x, y, common.STEPS - common.RESUME_AT)
    return {"log": log, "params": common.flat_params(model), "state": opt.state.to_dict()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("dist")
    ref = {"fast": single_process("fast", out / "ckpt_1proc.pt"), "generic": single_process("generic")}
    t0 = time.monotonic()
    ranks = launch("main", out, str(out / "ckpt_1proc.pt"))
    print(f"2-rank gloo run: {time.monotonic() - t0:.1f} s")
    return {"ref": ref, "ranks": ranks, "out": out}


def assert_params_close(got: list[float], want: list[float]) -> None:
    got_t, want_t = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(got_t, want_t, rtol=RTOL, atol=RTOL * float(want_t.abs().max()))


@pytest.mark.parametrize("method", ["fast", "generic"])
def test_two_ranks_make_the_single_process_decisions_and_steps(runs, method):
    ref = runs["ref"][method]
    decisions = [s["decision"] for s in ref["log"]]
    globals_ = [common.controller().init().batch_size, *decisions[:-1]]
    assert len(set(decisions)) > 3, f"decisions barely move, the test would be weak: {decisions}"
    assert any(b % 2 for b in globals_), "no uneven split was exercised"
    for rank, result in enumerate(runs["ranks"]):
        got = result[method]
        assert [s["decision"] for s in got["log"]] == decisions, f"rank {rank}"
        # each rank trained on its contiguous shard of the global batch (first rank one more when odd)
        assert [s["local_batch"] for s in got["log"]] == [len(shard(np.arange(b), 2, rank)) for b in globals_]
        assert_params_close(got["params"], ref["params"])
        assert got["state"]["step"] == ref["state"]["step"] and got["state"]["batch_size"] == ref["state"]["batch_size"]
        for key in ("xi_avg", "loss_avg"):
            assert got["state"][key] == pytest.approx(ref["state"][key], rel=RTOL)
    r0, r1 = (r[method] for r in runs["ranks"])
    assert r0["params"] == r1["params"], "ranks hold different parameters"
    assert [s["digest"] for s in r0["log"]] == [s["digest"] for s in r1["log"]], "controller states differ"


def test_resume_from_a_single_process_checkpoint_on_two_ranks(runs):
    ref = runs["ref"]["fast"]
    for result in runs["ranks"]:
        got = result["resumed"]
        assert [s["decision"] for s in got["log"]] == [s["decision"] for s in ref["log"][common.RESUME_AT:]]
        assert_params_close(got["params"], ref["params"])


def test_resume_from_a_two_rank_checkpoint_in_one_process(runs):
    ref = runs["ref"]["fast"]
    ckpt = torch.load(runs["out"] / "ckpt_2proc.pt", weights_only=True)
    assert ckpt["cabs"]["world_size"] == 2
    x, y = common.data()
    model = common.model(seed=5)
    model.load_state_dict(ckpt["model"])
    opt = CABSTrainer(model, common.ce, common.controller())
    sampler = opt.batch_sampler(common.N_EXAMPLES, seed=common.SEED)
    opt.load_state_dict(ckpt["cabs"])
    log = common.train(opt, sampler, x, y, common.STEPS - common.RESUME_AT)
    assert [s["decision"] for s in log] == [s["decision"] for s in ref["log"][common.RESUME_AT:]]
    assert_params_close(common.flat_params(model), ref["params"])


def test_an_injected_desync_is_detected_on_every_rank(runs):
    for rank, result in enumerate(runs["ranks"]):
        d = result["desync"]
        assert d["raised_at"] == 2, f"rank {rank}: {d}"  # perturbed after step 1, checked at step 2
        assert "diverged at step 2" in d["message"] and "state digests differ" in d["message"]
        assert "process 0" in d["message"] and "process 1" in d["message"]
        assert "diverged at step 0" in d["config_message"]  # another lr on one rank: caught at construction
        assert "bs_min (1) must be >= the world size (2)" in d["bs_min_message"]


@pytest.mark.parametrize("name, micro, momentum", [("plain", None, 0.0), ("micro_momentum", 3, 0.9)])
def test_two_ranks_drawing_their_shards_make_the_reference_decisions(runs, name, micro, momentum):
    """DataParallelCABSTrainer(data=...) on the loop reference problem, with and without
    max_micro_batch: the decisions and weights of the single-process NumPy reference."""
    data, w = problem()
    loop = CABSLoop(LinearBackend(momentum=momentum), CABSController(lr=0.05, c=40.0, bs_min=4, bs_max=64, mu=0.9),
                    num_examples=len(data[1]), seed=3)
    run, model, sizes = loop.init(), (w, np.zeros_like(w)), []
    for _ in range(12):
        run, model, info = loop.step(run, model, data)
        sizes.append(info.batch_size)
    assert len(set(sizes)) > 3
    for result in runs["ranks"]:
        got = result["loop"][name]
        assert got["sizes"] == sizes
        np.testing.assert_allclose(got["w"], model[0], rtol=RTOL, atol=1e-14)


def test_a_hung_rank_is_killed_and_reaped(tmp_path):
    procs = start("hang", tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline, "ranks did not start"
            assert None in [p.poll() for p in procs], "ranks exited early"
            time.sleep(0.1)
        time.sleep(1)
        assert [p.poll() for p in procs] == [None, None]  # rank 0 blocked in a barrier, rank 1 asleep
        with pytest.raises(LaunchError, match="timed out"):
            wait(procs, tmp_path, timeout=1)
    finally:
        stop(procs)
    assert all(p.returncode is not None and p.returncode < 0 for p in procs)  # killed and reaped
    for r in range(2):
        pid = int((tmp_path / f"ready{r}").read_text())
        assert pid == procs[r].pid


def test_needs_an_initialised_process_group():
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        DataParallelCABSTrainer(common.model(), common.ce, common.controller())


def test_one_rank_is_the_single_process_optimizer_bit_for_bit(tmp_path):
    """World size 1 (an in-process gloo group): all-reduces are identities, so
    DataParallelCABSTrainer is CABSTrainer exactly."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x, y = common.data()
        model = common.model(seed=0)
        opt = DataParallelCABSTrainer(model, common.ce, common.controller(), check_every=1)
        log = common.train(opt, opt.batch_sampler(common.N_EXAMPLES, seed=common.SEED), x, y, common.STEPS)
        assert opt.state_dict()["world_size"] == 1
    finally:
        torch.distributed.destroy_process_group()
    ref = single_process("auto")
    assert log == ref["log"]
    assert common.flat_params(model) == ref["params"]
