"""The model-level protocol: the zoo's portable layout, and checks that catch
a backend that disagrees (run in the conformance session, every framework installed)."""

from __future__ import annotations

import numpy as np
import pytest
from cabs_conformance import e2e, zoo

pytest.importorskip("torch")
pytest.importorskip("jax")
pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def fws():
    return {fw: e2e.zoo_module(fw) for fw in e2e.FRAMEWORKS}


@pytest.mark.parametrize("model", list(zoo.MODELS))
def test_every_backend_round_trips_the_portable_layout(fws, model):
    params = zoo.init_params(model, seed=5)
    for fw, mod in fws.items():
        if fw == "jax":
            back = mod.export(mod.to_tree(params, "float64"))
        else:
            back = mod.export(mod.build(model, params, "float64"))
        assert set(back) == set(params), fw
        for k in params:
            np.testing.assert_array_equal(back[k], params[k], err_msg=f"{fw} {k}")


def test_npz_exchange_checks_names_and_shapes(tmp_path):
    params = zoo.init_params("embed_ln")
    zoo.save_params(tmp_path / "p.npz", params)
    loaded = zoo.load_params(tmp_path / "p.npz", "embed_ln")
    assert all(np.array_equal(loaded[k], params[k]) for k in params)
    bad = dict(params, **{"dense1/kernel": params["dense1/kernel"].T})
    zoo.save_params(tmp_path / "bad.npz", bad)
    with pytest.raises(ValueError, match=r"dense1/kernel has shape \(32, 16\), expected \(16, 32\)"):
        zoo.load_params(tmp_path / "bad.npz", "embed_ln")
    del bad["norm/scale"]
    zoo.save_params(tmp_path / "bad.npz", bad)
    with pytest.raises(ValueError, match="missing \\['norm/scale'\\]"):
        zoo.load_params(tmp_path / "bad.npz", "embed_ln")


def test_statistics_and_short_training_agree(fws):
    rows = [e2e.check_statistics(fws, "embed_ln", "float64"), e2e.check_training(fws, "paper", steps=8)]
    assert all(r.passed for r in rows), e2e.format_table(rows, list(fws))


def test_a_backend_that_disagrees_fails_the_check(fws, monkeypatch):
    torch_zoo = fws["torch"]
    real = torch_zoo.per_example_loss
    monkeypatch.setattr(torch_zoo, "per_example_loss", lambda logits, y: real(logits * 1.0001, y))
    row = e2e.check_statistics(fws, "mlp", "float64")
    assert not row.passed and not row.cells["torch"][0]
    table = e2e.format_table([row], list(fws))
    assert "FAIL" in table and "0 passed, 1 failed" in table


def test_a_different_decision_fails_the_training_check(fws, monkeypatch):
    jax_zoo = fws["jax"]
    real = jax_zoo.train

    def off_by_one(*args, **kwargs):
        sizes, params = real(*args, **kwargs)
        return [sizes[0] + 1, *sizes[1:]], params

    monkeypatch.setattr(jax_zoo, "train", off_by_one)
    row = e2e.check_training(fws, "reference", steps=4)
    assert not row.passed and "sizes" in row.cells["jax"][1]


def test_rel_dev():
    assert e2e.rel_dev([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert e2e.rel_dev([1.0, 2.1], [1.0, 2.0]) == pytest.approx(0.05)
    assert e2e.rel_dev(0.0, 0.0) == 0.0
