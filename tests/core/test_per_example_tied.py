"""The tied-embedding cross term against per-example gradients formed explicitly (one-hot, float64)."""

from __future__ import annotations

import numpy as np
import pytest

from cabs_core import embedding_linear_cross_sq_norms, embedding_sq_norms, linear_sq_norms


def _explicit(tokens, b_lookup, query, b_attend, vocab):
    """Per-example gradients of the table from each use, formed with the one-hot."""
    onehot = np.eye(vocab)[tokens]  # (m, T1, V)
    g_lookup = np.einsum("mtv,mtd->mvd", onehot, b_lookup)
    g_attend = np.einsum("msv,msd->mvd", b_attend, query)
    return g_lookup, g_attend


@pytest.mark.parametrize("m, t1, t2, vocab, d", [(3, 4, 5, 6, 2), (2, 1, 1, 3, 4), (4, 6, 3, 2, 5)])
def test_tied_table_norm_is_the_sum_of_the_terms(m: int, t1: int, t2: int, vocab: int, d: int) -> None:
    rng = np.random.default_rng(m * 100 + t1)
    tokens = rng.integers(0, vocab, size=(m, t1))  # small vocabularies: repeated ids
    b_lookup, query = rng.normal(size=(m, t1, d)), rng.normal(size=(m, t2, d))
    b_attend = rng.normal(size=(m, t2, vocab))
    g_lookup, g_attend = _explicit(tokens, b_lookup, query, b_attend, vocab)
    cross = embedding_linear_cross_sq_norms(tokens, b_lookup, query, b_attend)
    np.testing.assert_allclose(cross, np.einsum("mvd,mvd->m", g_lookup, g_attend), rtol=1e-12)
    total = embedding_sq_norms(tokens, b_lookup) + linear_sq_norms(query, b_attend) + 2 * cross
    np.testing.assert_allclose(total, np.sum((g_lookup + g_attend) ** 2, axis=(1, 2)), rtol=1e-12)


def test_array_api_strict_and_bad_shapes() -> None:
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(0)
    tokens, b_lookup = rng.integers(0, 4, size=(2, 3)), rng.normal(size=(2, 3, 2))
    query, b_attend = rng.normal(size=(2, 5, 2)), rng.normal(size=(2, 5, 4))
    want = embedding_linear_cross_sq_norms(tokens, b_lookup, query, b_attend)
    got = embedding_linear_cross_sq_norms(*(xps.asarray(a) for a in (tokens, b_lookup, query, b_attend)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    with pytest.raises(ValueError, match="need equal m and d"):
        embedding_linear_cross_sq_norms(tokens, b_lookup, query[:, :, :1], b_attend)
