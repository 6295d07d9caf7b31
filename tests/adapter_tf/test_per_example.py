"""The TF transcriptions of cabs_core.per_example against the core's NumPy results."""

import cabs_tf
import numpy as np
import pytest
import tensorflow as tf

import cabs_core.per_example as core


@pytest.mark.parametrize("t,p,q", [(1, 5, 3), (2, 5, 4), (3, 2, 2), (7, 6, 5), (9, 30, 40)])
def test_linear_matches_core_and_definition(t, p, q):
    rng = np.random.default_rng(t * 100 + p)
    a, b = rng.normal(size=(4, t, p)), rng.normal(size=(4, t, q))
    got = cabs_tf.linear_sq_norms(tf.constant(a), tf.constant(b)).numpy()
    np.testing.assert_allclose(got, core.linear_sq_norms(a, b), rtol=1e-12)
    g = np.einsum("mtq,mtp->mqp", b, a)
    np.testing.assert_allclose(got, np.sum(g * g, axis=(1, 2)), rtol=1e-12)


def test_both_forms_are_exercised():
    assert core.gram_is_cheaper(2, 5, 4) and not core.gram_is_cheaper(7, 6, 5)


def test_bias_and_embedding_match_core():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(3, 6, 4))
    tokens = rng.integers(0, 3, size=(3, 6))  # repeated ids: rows add up
    np.testing.assert_allclose(cabs_tf.bias_sq_norms(tf.constant(b)).numpy(), core.bias_sq_norms(b), rtol=1e-12)
    np.testing.assert_allclose(
        cabs_tf.embedding_sq_norms(tf.constant(tokens), tf.constant(b)).numpy(),
        core.embedding_sq_norms(tokens, b),
        rtol=1e-12,
    )


def test_scale_shift_is_the_gain_gradient():
    rng = np.random.default_rng(1)
    xhat, b = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))
    want = np.sum(np.sum(xhat * b, axis=1) ** 2, axis=1)
    got = cabs_tf.scale_shift_sq_norms(tf.constant(xhat), tf.constant(b)).numpy()
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(got, core.scale_sq_norms(xhat, b), rtol=1e-12)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(m, T, p\)"):
        cabs_tf.linear_sq_norms(tf.zeros([2, 3]), tf.zeros([2, 3, 1]))
    with pytest.raises(ValueError, match="tokens"):
        cabs_tf.embedding_sq_norms(tf.zeros([2, 3], tf.int32), tf.zeros([2, 4, 1]))


@pytest.mark.parametrize("t,s", [(4, 4), (1, 3), (5, 2)])
def test_tied_embedding_matches_core_and_definition(t, s):
    rng = np.random.default_rng(t * 10 + s)
    m, q, vocab = 3, 2, 5
    tokens = rng.integers(0, vocab, size=(m, t))
    b1, h, b2 = rng.normal(size=(m, t, q)), rng.normal(size=(m, s, q)), rng.normal(size=(m, s, vocab))
    want = []
    for i in range(m):
        g = np.zeros((vocab, q))
        np.add.at(g, tokens[i], b1[i])
        want.append(np.sum((g + b2[i].T @ h[i]) ** 2))
    got = cabs_tf.tied_embedding_sq_norms(*(tf.constant(a) for a in (tokens, b1, h, b2))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got, core.tied_embedding_sq_norms(tokens, b1, h, b2), rtol=1e-12)
