"""config.eval.distance: "sigmoid" (the authors' v1.x / v2.1 tag) vs "neg_logit" (their master),
row by row against what their reid/evaluators.py computes (docs/method.md §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from qaconv_jax.errors import ConfigError
from qaconv_jax.evaluation.scoring import pairwise_distance
from qaconv_jax.evaluation.testset import evaluate_testset
from qaconv_jax.evaluation.tlift import temporal_lift
from qaconv_jax.models.qaconv import logit_distance, qaconv_distance
from tests.test_eval import FakeSource
from tests.test_rerank import rerank_ref

P, G = 8, 24  # N = 32 > k1 + 1 at the authors' k1 = 20


def test_logit_distance_kinds():
  logits = jnp.asarray([-30.0, -1.5, 0.0, 2.0, 40.0])
  np.testing.assert_array_equal(logit_distance(logits), qaconv_distance(logits))
  np.testing.assert_array_equal(logit_distance(logits, "sigmoid"), qaconv_distance(logits))
  np.testing.assert_array_equal(logit_distance(logits, "neg_logit"), -logits)
  with pytest.raises(ConfigError, match=r"eval.distance='logit': expected 'sigmoid' or"):
    logit_distance(logits, "logit")


def _one_hot_embed(n):
  """Feature = the image's first pixel value (its index), one-hot over ``n``."""
  return jax.jit(
    lambda x: jax.nn.one_hot(jnp.round(x[:, 0, 0, 0] * 255).astype(jnp.int32), n)[:, None, None, :]
  )


def _table_match(table):
  """A matcher that reads the two indices back and answers ``table[probe, gallery]``."""

  def match(p, g):
    return jnp.asarray(table)[jnp.argmax(p[:, 0, 0], 1)[:, None], jnp.argmax(g[:, 0, 0], 1)]

  return jax.jit(match)


def test_pairwise_distance_neg_logit_is_minus_the_logits(rng):
  table = rng.normal(0, 8, size=(10, 10)).astype(np.float32)
  maps = np.eye(10, dtype=np.float32)[:, None, None, :]
  dist, logits = pairwise_distance(
    _table_match(table), maps[:4], maps, block=(3, 4), return_logits=True, distance="neg_logit"
  )
  np.testing.assert_array_equal(logits, table[:4])
  np.testing.assert_array_equal(dist, -table[:4])
  with pytest.raises(ConfigError, match="eval.distance='-logit'"):
    pairwise_distance(_table_match(table), maps[:4], maps, distance="-logit")


def _setup(rng, table):
  """Query images 0..P-1, gallery P..P+G-1, with times in 300 s (TLift rows) and 5 ids."""
  gallery = FakeSource(np.arange(G) + P, np.arange(G) % 5, np.arange(G) % 3, rng.uniform(0, 300, G))
  query = FakeSource(np.arange(P), np.arange(P) % 5, (np.arange(P) + 1) % 3, rng.uniform(0, 300, P))
  return _one_hot_embed(P + G), _table_match(table), query, gallery


def _cfg(distance, rerank=True):
  cfg = get_config("tiny").eval
  cfg.update(
    batch_size=8,
    memory_budget_gb=1e-4,
    distance=distance,
    rerank=rerank,
    tlift=True,
    tlift_k=3,
    topk=5,
  )
  return cfg


def _lift(score, query, gallery):
  args = (query.cameras, query.times, gallery.cameras, gallery.times, 100.0, 200.0, 3, 0.2)
  return 1.0 - np.asarray(temporal_lift(score, *args))


def test_neg_logit_rows_are_what_the_authors_master_computes(rng):
  table = rng.normal(0, 8, size=(P + G, P + G)).astype(np.float32)
  # Query 0's column of the full distance holds -table[:P, 0] and -table[0, P:]: all
  # negative, so its maximum is negative and the authors' normalisation reverses the order.
  table[:P, 0] = np.abs(table[:P, 0]) + 1.0
  table[0, P:] = np.abs(table[0, P:]) + 1.0
  embed, match, query, gallery = _setup(rng, table)
  out = {
    d: evaluate_testset(embed, match, query, gallery, _cfg(d), (8, 4))
    for d in ("sigmoid", "neg_logit")
  }
  sig, neg = out["sigmoid"], out["neg_logit"]
  methods = ["QAConv", "QAConv+TLift", "QAConv+RR", "QAConv+RR+TLift"]
  assert list(sig["results"]) == list(neg["results"]) == methods
  qg, qq, gg = table[:P, P:], table[:P, :P], table[P:, P:]

  # Plain QAConv: master's pairwise_distance returns -score; the ranking is the same.
  np.testing.assert_array_equal(neg["dist"]["QAConv"], -qg)
  assert neg["results"]["QAConv"] == sig["results"]["QAConv"]
  np.testing.assert_array_equal(neg["topk"]["QAConv"], sig["topk"]["QAConv"])
  # TLift without re-ranking lifts sigmoid(logit) under both (reid/tlift.py's advice).
  np.testing.assert_array_equal(neg["dist"]["QAConv+TLift"], sig["dist"]["QAConv+TLift"])

  # +RR: master's reranking on the -logit blocks, column maxima and all (float64 reference).
  want = rerank_ref(-qg, -qq, -gg, 20, 6, 0.3)
  np.testing.assert_allclose(neg["dist"]["QAConv+RR"], want, rtol=2e-5, atol=2e-5)
  sigmoid = lambda x: 1 / (1 + np.exp(-x.astype(np.float64) / 10))  # noqa: E731
  ref_sig = rerank_ref(1 - sigmoid(qg), 1 - sigmoid(qq), 1 - sigmoid(gg), 20, 6, 0.3)
  np.testing.assert_allclose(sig["dist"]["QAConv+RR"], ref_sig, rtol=2e-5, atol=2e-5)
  # +RR+TLift: TLift on score_rerank = 1 - dist_rerank, ranked by 1 - lifted.
  np.testing.assert_allclose(
    neg["dist"]["QAConv+RR+TLift"],
    _lift(1.0 - neg["dist"]["QAConv+RR"], query, gallery),
    rtol=1e-5,
    atol=1e-5,
  )

  # The setting changes what re-ranking returns, not just its scale.
  assert np.abs(neg["dist"]["QAConv+RR"] - sig["dist"]["QAConv+RR"]).max() > 0.1
  assert not np.array_equal(neg["topk"]["QAConv+RR"], sig["topk"]["QAConv+RR"])
  assert not np.array_equal(neg["topk"]["QAConv+RR+TLift"], sig["topk"]["QAConv+RR+TLift"])
  # Query 0's re-ranked distances grow with its logits (the flipped column), as on master.
  assert np.corrcoef(neg["dist"]["QAConv+RR"][0], qg[0])[0, 1] > 0
  assert sig["notes"] == []
  assert neg["notes"] == [
    "re-ranking: 1 of 32 images have only positive logits in their column, whose negative "
    "maximum reverses their neighbour order (as the authors' reranking computes it from "
    "-logit distances)."
  ]


def test_a_zero_column_maximum_leaves_reranking_out(rng):
  table = rng.normal(0, 8, size=(P + G, P + G)).astype(np.float32)
  table[:P, 0] = np.abs(table[:P, 0])
  table[0, P:] = np.abs(table[0, P:])
  table[3, 0] = 0.0  # query 0's column of -logit: its maximum is exactly 0
  embed, match, query, gallery = _setup(rng, table)
  out = evaluate_testset(embed, match, query, gallery, _cfg("neg_logit"), (8, 4))
  assert list(out["results"]) == ["QAConv", "QAConv+TLift"]
  assert out["notes"] == [
    "re-ranking not applied: 1 column(s) of the eval.distance='neg_logit' distance have the "
    "maximum 0, which re-ranking divides by."
  ]


def test_an_overflowing_reranking_is_left_out_not_a_crash(rng):
  """A column whose most negative logit is near 0 (-0.01) and whose others reach 20 makes
  exp(-D') overflow (as in the authors' code): the RR rows are left out with a note."""
  table = rng.uniform(1.0, 20.0, size=(P + G, P + G)).astype(np.float32)
  table[0, :] = -0.01  # every column's maximum of -logit: 0.01
  embed, match, query, gallery = _setup(rng, table)
  out = evaluate_testset(embed, match, query, gallery, _cfg("neg_logit"), (8, 4))
  assert list(out["results"]) == ["QAConv", "QAConv+TLift"]
  assert any("re-ranking not applied: it overflowed" in n for n in out["notes"])
