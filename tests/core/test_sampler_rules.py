"""The batch sampler (host NumPy indices) and the batch-size rules (every backend)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cabs_core import (
    SamplerState,
    bucket_for,
    cabs_batch_size,
    discretise,
    epoch_permutation,
    geometric_buckets,
    gradient_noise_scale,
    inner_product_test_batch_size,
    next_batch,
    norm_test_batch_size,
    pad_indices,
    padded_shards,
    shard,
    shard_buckets,
)

MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """Python-int transcription of conformance/README.md, independent of NumPy."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


@pytest.mark.parametrize("seed,epoch,n", [(0, 0, 10), (123, 4, 57), (2**64 - 1, 2, 33)])
def test_permutation_is_the_documented_keyed_sort(seed, epoch, n):
    base = _splitmix64((_splitmix64(seed) + epoch) & MASK)
    keys = [_splitmix64((base + i) & MASK) for i in range(n)]
    expected = sorted(range(n), key=lambda i: (keys[i], i))
    assert epoch_permutation(seed, epoch, n).tolist() == expected


def test_splitmix64_known_outputs():
    # the first outputs of the SplitMix64 generator seeded with 0
    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    assert _splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


@given(
    n=st.integers(1, 60), seed=st.integers(0, 2**64 - 1), sizes=st.lists(st.integers(1, 50), min_size=1, max_size=40)
)
def test_every_example_once_per_epoch(n, seed, sizes):
    state, stream = SamplerState(n, seed), []
    for b in sizes:
        idx, state = next_batch(state, b)
        assert len(idx) == b and idx.dtype == np.int64
        stream.extend(idx.tolist())
    assert state.examples_seen == sum(sizes) and state.epoch == sum(sizes) / n
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    tail = stream[(len(stream) // n) * n :]
    assert len(set(tail)) == len(tail)  # a partial epoch repeats nothing


@given(seed=st.integers(0, 2**32), sizes=st.lists(st.integers(1, 30), min_size=2, max_size=20), cut=st.integers(1, 19))
def test_reproducible_from_seed_and_from_restored_state(seed, sizes, cut):
    cut = min(cut, len(sizes) - 1)
    a = b = SamplerState(25, seed)
    first = []
    for s in sizes:
        idx, a = next_batch(a, s)
        first.append(idx.tolist())
    for s in sizes[:cut]:
        _, b = next_batch(b, s)
    b = SamplerState.from_dict(dict(b.to_dict()))
    rest = []
    for s in sizes[cut:]:
        idx, b = next_batch(b, s)
        rest.append(idx.tolist())
    assert rest == first[cut:]


def test_different_seeds_give_different_orders():
    assert epoch_permutation(1, 0, 100).tolist() != epoch_permutation(2, 0, 100).tolist()
    assert epoch_permutation(1, 0, 100).tolist() != epoch_permutation(1, 1, 100).tolist()


@given(b=st.integers(0, 100), w=st.integers(1, 9))
def test_shards_partition_the_batch_evenly(b, w):
    idx = np.arange(b) * 3
    parts = [shard(idx, w, r) for r in range(w)]
    assert np.concatenate(parts).tolist() == idx.tolist()
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [len(p) for p in parts] == sorted((len(p) for p in parts), reverse=True)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: SamplerState(0), "num_examples"),
        (lambda: SamplerState(10, -1), "seed"),
        (lambda: SamplerState(10, 2**64), "seed"),
        (lambda: next_batch(SamplerState(10), 0), "batch_size"),
        (lambda: next_batch(SamplerState(10), 2.5), "batch_size"),
        (lambda: shard(np.arange(4), 0, 0), "world_size"),
        (lambda: shard(np.arange(4), 2, 2), "rank"),
        (lambda: SamplerState.from_dict({"format": "x"}), "not a sampler state"),
    ],
)
def test_sampler_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_rules_by_hand(xb):
    a = xb.asarray
    assert float(xb.to_numpy(cabs_batch_size(0.1, a(np.float64(50.0)), a(np.float64(2.0))))) == pytest.approx(2.5)
    assert float(
        xb.to_numpy(cabs_batch_size(0.1, a(np.float64(50.0)), a(np.float64(2.0)), c=2.0, loss_floor=1.0, eps=0.25))
    ) == pytest.approx(10 / 1.25)
    assert float(xb.to_numpy(cabs_batch_size(0.1, a(np.float64(50.0)), a(np.float64(1.0)), loss_floor=1.0))) == math.inf
    # norm test: xi / (theta^2 ||g||^2) = 8 / (0.25 * 4)
    assert float(xb.to_numpy(norm_test_batch_size(a(np.float64(8.0)), a(np.float64(4.0)), 0.5))) == pytest.approx(8.0)
    # inner product test: 8 / (0.25 * 16)
    assert float(
        xb.to_numpy(inner_product_test_batch_size(a(np.float64(8.0)), a(np.float64(4.0)), 0.5))
    ) == pytest.approx(2.0)
    # noise scale: 10 / (3 - 10/10) = 5; and +inf when ||g||^2 <= xi / m
    assert float(
        xb.to_numpy(gradient_noise_scale(a(np.float64(10.0)), a(np.float64(3.0)), a(np.float64(10.0))))
    ) == pytest.approx(5.0)
    assert (
        float(xb.to_numpy(gradient_noise_scale(a(np.float64(10.0)), a(np.float64(1.0)), a(np.float64(10.0)))))
        == math.inf
    )


def test_rules_are_elementwise(xb):
    v = xb.asarray(np.array([1.0, 2.0, 3.0]))
    loss = xb.asarray(np.array([1.0, 0.0, 2.0]))
    np.testing.assert_allclose(xb.to_numpy(cabs_batch_size(1.0, v, loss)), [1.0, math.inf, 1.5])


@pytest.mark.parametrize(
    "raw,kw,expected",
    [
        (16.5, {}, 16),
        (17.5, {}, 18),
        (2.0, {}, 16),
        (math.inf, {}, 2048),
        (1e300, {}, 2048),
        (33.0, {"multiple_of": 32}, 64),
        (2040.0, {"multiple_of": 1000}, 2000),
        (40.0, {"buckets": (16, 48, 100)}, 48),
        (150.0, {"buckets": (16, 48, 100)}, 100),
    ],
)
def test_discretise_by_hand(raw, kw, expected):
    assert discretise(raw, 16, 2048, **kw) == expected


@given(raw=st.floats(0, 1e5), k=st.integers(1, 64))
def test_discretise_monotone_and_bounded(raw, k):
    lo, hi = discretise(raw, 16, 4096, multiple_of=k), discretise(raw * 1.5 + 1, 16, 4096, multiple_of=k)
    assert 16 <= lo <= hi <= 4096 and lo % k == 0


def test_discretise_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        discretise(math.nan, 16, 32)


def test_geometric_buckets_and_bucket_for():
    assert geometric_buckets(16, 2048) == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert geometric_buckets(16, 128, ratio=2**0.5) == (16, 23, 33, 47, 67, 95, 128)
    assert geometric_buckets(3, 20) == (3, 6, 12, 20)
    assert geometric_buckets(5, 5) == (5,)
    assert bucket_for(17, (16, 32)) == 32 and bucket_for(16, (16, 32)) == 16
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_for(33, (16, 32))
    for bad, match in (((16, 64, 1.0), "ratio"), ((0, 4, 2.0), "bs_min"), ((8, 4, 2.0), "bs_min")):
        with pytest.raises(ValueError, match=match):
            geometric_buckets(*bad)


@given(lo=st.integers(1, 100), span=st.integers(0, 5000), ratio=st.floats(1.05, 4.0))
def test_geometric_buckets_bound_the_padding(lo, span, ratio):
    buckets = geometric_buckets(lo, lo + span, ratio)
    assert buckets[0] == lo and buckets[-1] == lo + span and list(buckets) == sorted(set(buckets))
    for n in range(lo, lo + span + 1, max(1, span // 50)):
        b = bucket_for(n, buckets)
        assert n <= b and (b == n or b <= math.ceil((n - 1) * ratio) + 1 or b == buckets[0])


def test_pad_indices_repeats_a_real_example():
    idx, mask = pad_indices(np.array([7, 3, 9]), 5)
    assert idx.tolist() == [7, 3, 9, 7, 7] and mask.tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="cannot pad"):
        pad_indices(np.array([1, 2, 3]), 2)


def test_shard_buckets_and_padded_shards():
    assert shard_buckets((3, 6, 12, 24, 40), 4) == (1, 2, 3, 6, 10)
    idx = np.arange(100, 114)  # 14 examples over 4 workers: 4, 4, 3, 3
    gidx, mask, size = padded_shards(idx, 4, (1, 2, 3, 6, 10))
    assert size == 6 and gidx.shape == mask.shape == (24,)
    for r in range(4):
        part = shard(idx, 4, r)
        rows, keep = gidx[r * 6 : (r + 1) * 6], mask[r * 6 : (r + 1) * 6]
        assert rows[keep].tolist() == part.tolist() and keep.sum() == len(part)
        assert np.all(rows[~keep] == part[0])  # padding copies a real example of the shard
    gidx, mask, size = padded_shards(np.array([7, 9]), 4, (1, 2))  # two workers get nothing
    assert size == 1 and mask.tolist() == [True, True, False, False] and gidx.tolist() == [7, 9, 7, 7]
    with pytest.raises(ValueError, match="world_size"):
        shard_buckets((4,), 0)
    with pytest.raises(ValueError, match="empty batch"):
        padded_shards(np.array([], dtype=np.int64), 2, (2,))
