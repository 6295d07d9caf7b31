"""cabs_core.tied_embedding_sq_norms: an embedding table also used as the
output projection, against per-example gradients built explicitly."""

from __future__ import annotations

import numpy as np
import pytest

from cabs_core import tied_embedding_sq_norms


def explicit(tokens, b1, h, b2, vocab):
    """||G1_i + G2_i||^2 with G1 = sum_t e_{id_t} b1_t^T and G2 = b2_i^T h_i, materialised."""
    out = []
    for i in range(tokens.shape[0]):
        g = np.zeros((vocab, b1.shape[2]))
        np.add.at(g, tokens[i], b1[i])
        g += b2[i].T @ h[i]
        out.append(float(np.sum(g * g)))
    return np.array(out)


@pytest.mark.parametrize("m,t,s,q,vocab", [(3, 4, 4, 2, 5), (2, 1, 3, 3, 4), (4, 5, 2, 3, 3)])
def test_tied_embedding_matches_explicit_gradients(xb, m, t, s, q, vocab):
    rng = np.random.default_rng(m * 100 + t)
    tokens = rng.integers(0, vocab, size=(m, t)).astype(np.int64)  # repeated ids included
    b1, h, b2 = rng.normal(size=(m, t, q)), rng.normal(size=(m, s, q)), rng.normal(size=(m, s, vocab))
    got = tied_embedding_sq_norms(xb.asarray(tokens), xb.asarray(b1), xb.asarray(h), xb.asarray(b2))
    np.testing.assert_allclose(xb.to_numpy(got), explicit(tokens, b1, h, b2, vocab), rtol=1e-10)


def test_tied_embedding_shapes_are_checked(xb):
    z = np.zeros
    shapes = r"\(2, 3, 4\) and the projection.s inputs \(m, T2, d\) \(2, 5, 3\) need equal m and d"
    with pytest.raises(ValueError, match=shapes):
        tied_embedding_sq_norms(xb.asarray(z((2, 3), np.int64)), xb.asarray(z((2, 3, 4))),
                                xb.asarray(z((2, 5, 3))), xb.asarray(z((2, 5, 7))))
