"""Cross terms of a parameter used by two layers (cabs_core.per_example, issue 12),
on every array backend, against per-example gradients built explicitly in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from cabs_core import embedding_linear_cross_sq_norms, linear_cross_sq_norms


def test_linear_cross_equals_inner_product_of_materialised_gradients(xb):
    rng = np.random.default_rng(0)
    m, t1, t2, p, q = 3, 4, 2, 5, 6
    a1, b1 = rng.normal(size=(m, t1, p)), rng.normal(size=(m, t1, q))
    a2, b2 = rng.normal(size=(m, t2, p)), rng.normal(size=(m, t2, q))
    g1 = np.einsum("mtq,mtp->mqp", b1, a1)
    g2 = np.einsum("mtq,mtp->mqp", b2, a2)
    got = linear_cross_sq_norms(*(xb.asarray(t) for t in (a1, b1, a2, b2)))
    np.testing.assert_allclose(xb.to_numpy(got), (g1 * g2).sum((1, 2)), rtol=1e-12)
    with pytest.raises(ValueError, match="equal m, p and q"):
        linear_cross_sq_norms(*(xb.asarray(t) for t in (a1, b1, a2[:, :, :4], b2)))


def test_embedding_linear_cross_equals_inner_product_of_materialised_gradients(xb):
    """A table W (V, d) used as a lookup (with repeated ids) and as an output projection."""
    rng = np.random.default_rng(1)
    m, t1, t2, vocab, d = 4, 5, 3, 6, 2
    tokens = rng.integers(0, vocab, size=(m, t1))
    tokens[:, 1] = tokens[:, 0]  # repeated ids add up
    e = rng.normal(size=(m, t1, d))
    a, b = rng.normal(size=(m, t2, d)), rng.normal(size=(m, t2, vocab))
    g_lookup = np.zeros((m, vocab, d))
    for i in range(m):
        np.add.at(g_lookup[i], tokens[i], e[i])
    g_proj = np.einsum("msv,msd->mvd", b, a)
    want = (g_lookup * g_proj).sum((1, 2))
    got = embedding_linear_cross_sq_norms(*(xb.asarray(t) for t in (tokens, e, a, b)))
    np.testing.assert_allclose(xb.to_numpy(got), want, rtol=1e-12)
    with pytest.raises(ValueError, match="equal m and d"):
        embedding_linear_cross_sq_norms(*(xb.asarray(t) for t in (tokens, e, a[:, :, :1], b)))
