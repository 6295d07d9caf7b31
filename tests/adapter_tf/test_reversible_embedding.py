"""Keras's ``ReversibleEmbedding`` (the tied embedding of keras-hub's GPT2 and
Gemma backbones: ``emb(ids)`` looks up, ``emb(h, reverse=True)`` projects back
with the table) on the exact fast path: tied (the lookup's and the projection's
terms plus their cross term), untied (``tie_weights=False``: the reverse table is
a Dense without bias), with ``logit_soft_cap`` and ``reverse_dtype``, called twice in reverse, and on a
pooled (m, d) input. Every S is compared with a float64 loop over single examples
and the fast path (not the generic fallback) must have produced it. keras-hub's
own models: ``tests/keras_hub/``."""

import cabs_tf
import keras
import numpy as np
import pytest
from exactness_models import F64, build, lm_loss, token_data
from keras import layers as kl
from keras import ops
from test_attention import assert_matches, fast_stats, oracle

import cabs_core

V, T, D = 7, 4, 5


class ReversibleLM(keras.Model):
    """ids (m, T) -> lookup -> Dense -> logits through ``emb(h, reverse=True)``;
    ``twice``: a second reverse call on another hidden state, summed;
    ``pooled``: the reverse call on the mean over positions (logits (m, V))."""

    def __init__(self, tie=True, cap=None, twice=False, pooled=False, rdtype=None):
        super().__init__()
        self.emb = kl.ReversibleEmbedding(V, D, tie_weights=tie, logit_soft_cap=cap, reverse_dtype=rdtype, dtype=F64)
        self.mix = kl.Dense(D, activation="tanh", dtype=F64)
        self.twice, self.pooled = twice, pooled

    def call(self, ids):
        h = self.mix(self.emb(ids))
        if self.pooled:
            return self.emb(ops.mean(h, axis=1), reverse=True)
        z = self.emb(h, reverse=True)
        return z + self.emb(ops.tanh(h), reverse=True) if self.twice else z


def pooled_loss(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y[:, 0], logits, from_logits=True)


CASES = {"tied": {}, "untied": {"tie": False}, "soft_cap": {"cap": 2.0}, "twice": {"twice": True},
         "untied_twice": {"tie": False, "twice": True}, "pooled": {"pooled": True},
         "reverse_dtype": {"rdtype": F64, "cap": 3.0}}


@pytest.mark.parametrize("mode", ["graph", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_reversible_embedding_is_exact_on_the_fast_path(case, mode):
    keras.utils.set_random_seed(0)
    x, y = token_data(6, T, V, seed=3)  # ids repeat within an example: the lookup's Gram terms matter
    model = build(ReversibleLM(**CASES[case]), x)
    loss = pooled_loss if CASES[case].get("pooled") else lm_loss
    grads, vec = fast_stats(model, loss, x, y, mode=mode)
    assert_matches(grads, vec, oracle(model, loss, x, y))


def test_the_cross_term_matters():
    """The tied table's S is not the sum of the lookup's and the projection's own
    terms: the fast path's value equals the loop's, which differs from that sum."""
    keras.utils.set_random_seed(0)
    x, y = token_data(5, T, V, seed=4)
    model = build(ReversibleLM(), x)
    _, vec = fast_stats(model, lm_loss, x, y)
    untied = build(ReversibleLM(tie=False), x)
    untied.emb.embeddings.assign(model.emb.embeddings)
    untied.emb.reverse_embeddings.assign(ops.transpose(model.emb.embeddings))
    untied.mix.set_weights(model.mix.get_weights())
    _, vec_u = fast_stats(untied, lm_loss, x, y)  # the same logits, the two uses' terms without the cross term
    want = oracle(model, lm_loss, x, y).sq_norm_sum
    np.testing.assert_allclose(vec[2], want, rtol=1e-9)
    assert abs(vec_u[2] - want) > 1e-6 * want


def test_mask_zero_is_refused_by_name():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((T,), dtype="int32"),
                              kl.ReversibleEmbedding(V, D, mask_zero=True, dtype=F64),
                              kl.GlobalAveragePooling1D(dtype=F64), kl.Dense(3, dtype=F64)])
    with pytest.raises(cabs_core.UnsupportedModelError, match="mask_zero"):
        cabs_tf.PerExampleStats(model, pooled_loss, method="fast")
