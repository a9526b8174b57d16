"""Two-stage retrieval (docs/method.md §13) against loop references and exact mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qaconv_jax.evaluation import eval_lib
from qaconv_jax.evaluation.metrics import evaluate_ranking
from qaconv_jax.evaluation.testset import top_k_lists
from qaconv_jax.evaluation.two_stage import (
  MapTable,
  ShortlistDistance,
  device_table,
  generic_lists_fn,
  global_descriptors,
  nearest,
  score_lists,
)
from qaconv_jax.models.model import QAConvModel
from tests.conftest import random_unit_maps


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _sign_vectors(rng, n, d=16):
  """Unit vectors with entries +-1/sqrt(d) (d a power of 4): every cosine between two of them
  is a multiple of 2/d, exact in float32 whatever the summation order, so ties are exact."""
  return (rng.choice([-1.0, 1.0], size=(n, d)) / np.sqrt(d)).astype(np.float32)


# ---------------------------------------------------------------- global descriptors, nearest


def test_global_descriptors_are_the_renormalised_mean(rng):
  maps = random_unit_maps(rng, 7, 3, 2, 8)
  want = maps.astype(np.float64).mean(axis=(1, 2))
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  for stored in (maps, maps.astype(np.float16)):
    got = global_descriptors(stored, chunk=3)  # chunks of 3, 3, 1
    assert got.shape == (7, 8) and got.dtype == np.float32
    ref = stored.astype(np.float64).mean(axis=(1, 2))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
  np.testing.assert_allclose(global_descriptors(maps), want, rtol=0, atol=1e-6)
  assert global_descriptors(maps[:0]).shape == (0, 8)


def _nearest_ref(rows, cols, k, far):
  sim = rows.astype(np.float64) @ cols.astype(np.float64).T
  c = np.arange(len(cols))
  near = np.stack([np.lexsort((c, -s))[:k] for s in sim])  # largest cosine, then lower index
  farthest = np.stack([np.lexsort((c, s))[:far] for s in sim])
  return near, 1.0 - np.take_along_axis(sim, near, 1), farthest


@pytest.mark.parametrize("ties", [True, False])
def test_nearest_is_exact_with_ties_to_the_lower_column(ties):
  rng = np.random.default_rng(5)
  if ties:  # 6 distinct columns repeated: many exactly equal cosines
    cols = _sign_vectors(rng, 6)[rng.integers(0, 6, 20)]
    rows = _sign_vectors(rng, 5)
  else:
    cols, rows = _unit(rng.normal(size=(20, 16))), _unit(rng.normal(size=(5, 16)))
    gaps = np.diff(np.sort(rows.astype(np.float64) @ cols.T.astype(np.float64), axis=1))
    assert gaps.min() > 1e-5  # no near-tie float32 could order otherwise
  for k, far in [(7, 4), (20, 0), (1, 20)]:
    idx, dist, far_idx = nearest(rows, cols, k, far, block=2)  # 5 rows padded to 6
    want_idx, want_dist, want_far = _nearest_ref(rows, cols, k, far)
    assert idx.dtype == np.int32 and idx.shape == (5, k) and far_idx.shape == (5, far)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, want_dist, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(far_idx, want_far)
  if ties:  # the tie-break is really exercised
    sim = rows @ cols.T
    assert any(len(np.unique(s)) < len(s) for s in sim)
  for k, far in [(0, 0), (21, 0), (3, 21)]:
    with pytest.raises(ValueError, match="nearest"):
      nearest(rows, cols, k, far)


# ---------------------------------------------------------------- score_lists vs the matcher

H, W, D = 3, 2, 8  # h != w: a transposed location order would show


def _perturb(variables, seed):
  rng = np.random.default_rng(seed)

  def one(path, a):
    noise = rng.normal(size=a.shape).astype(np.float32)
    if path[-1].key == "var":  # running variances stay positive
      return a * np.exp(0.3 * noise)
    return a + 0.3 * noise

  return jax.tree_util.tree_map_with_path(one, variables)


@functools.cache
def _head(head, h, w, d, seed=0):
  """(model, variables, match_fn, model lists_fn) of a matcher with perturbed parameters."""
  model = QAConvModel(depth=18, width=8, neck_dim=d, head=head)
  x = jnp.zeros((1, h, w, d))
  variables = model.init(jax.random.key(seed), x, x, train=False, method=QAConvModel.match)
  variables = _perturb(variables, seed)
  _, match = eval_lib.model_fns(model, variables)
  return model, variables, match, eval_lib.lists_fn(model, variables)


@pytest.mark.parametrize("head", ["v1", "v2", "gap"])
@pytest.mark.parametrize("own, on_device", [(True, False), (False, False), (True, True)])
def test_score_lists_equals_the_cross_matcher(head, own, on_device):
  rng = np.random.default_rng(11)
  p, g, n, k = 7, 11, 13, 5
  q_maps, g_maps = random_unit_maps(rng, p, H, W, D), random_unit_maps(rng, g, H, W, D)
  _, _, match, lists = _head(head, H, W, D)
  everything = np.concatenate([q_maps, g_maps])
  cross = np.asarray(match(everything, everything))  # [N, N]: probe row, gallery column
  anchors = rng.integers(0, p + g, n)
  cands = rng.integers(0, p + g, (n, k))
  aip = rng.random((n, k)) < 0.5
  table = MapTable(q_maps, g_maps)
  got = score_lists(
    lists if own else generic_lists_fn(match),
    table,
    anchors,
    cands,
    aip,
    batch=4,  # 13 anchors: 4 batches, the last padded
    on_device=device_table(table) if on_device else None,  # gathered by the devices
  )
  a = np.broadcast_to(anchors[:, None], cands.shape)
  want = np.where(aip, cross[a, cands], cross[cands, a])
  assert got.shape == (n, k) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  if head == "v1":  # asymmetric: swapped roles would fail the check above
    swapped = np.where(aip, cross[cands, a], cross[a, cands])
    assert np.abs(swapped - want).max() > 1e-2
  with pytest.raises(ValueError, match="differ"):
    MapTable(q_maps, g_maps[:, :2])


# ---------------------------------------------------------------- ShortlistDistance ranking


def _ranked_ref(index, values, q_desc, g_desc, q):
  """Query q's whole ranked gallery, built item by item (float64)."""
  g = len(g_desc)
  short = sorted(range(index.shape[1]), key=lambda s: (float(values[q, s]), int(index[q, s])))
  short = [int(index[q, s]) for s in short]
  cos = g_desc.astype(np.float64) @ q_desc[q].astype(np.float64)
  rest = sorted((x for x in range(g) if x not in short), key=lambda x: (max(1.0 - cos[x], 0), x))
  return short + rest


def _metrics_ref(ranked, qp, qc, gp, gc, ap_mode):
  """Market-1501 protocol from ranked lists: (first-hit rank, AP, INP) per query."""
  out = []
  for q, order in enumerate(ranked):
    kept = [x for x in order if not (gp[x] == qp[q] and gc[x] == qc[q])]
    hits = [r for r, x in enumerate(kept) if gp[x] == qp[q]]
    if not hits:
      out.append((-1, np.nan, np.nan))
      continue
    terms = []
    for k, r in enumerate(hits, 1):
      precision = k / (r + 1)
      before = (k - 1) / r if r > 0 else 1.0
      terms.append(precision if ap_mode == "step" else (before + precision) / 2)
    out.append((hits[0], np.mean(terms), len(hits) / (hits[-1] + 1)))
  return out


@pytest.mark.parametrize("ap_mode", ["step", "trapezoid"])
def test_shortlist_ranking_metrics_match_a_reference(ap_mode):
  rng = np.random.default_rng(3)
  p, g, k = 7, 24, 6
  g_desc = _sign_vectors(rng, 9)[rng.integers(0, 9, g)]  # duplicates: tied global distances
  q_desc = _sign_vectors(rng, p)
  q_desc[0] = g_desc[5]  # a global distance of exactly 0
  index = np.stack([rng.permutation(g)[:k] for _ in range(p)])  # not the global nearest
  values = rng.choice([-0.4, 0.1, 0.3, 0.7], size=(p, k)).astype(np.float32)  # tied values
  gp, gc = rng.integers(0, 4, g), rng.integers(0, 3, g)
  qp, qc = rng.integers(0, 4, p), rng.integers(0, 3, p)
  qp[1] = 9  # no such person in the gallery: skipped
  gc[gp == 3] = 1  # person 3 is seen by camera 1 only ...
  qp[2], qc[2] = 3, 1  # ... so this query has no valid positive either
  dist = ShortlistDistance(index, values, q_desc, g_desc)
  ranked = [_ranked_ref(index, values, q_desc, g_desc, q) for q in range(p)]
  ref = _metrics_ref(ranked, qp, qc, gp, gc, ap_mode)
  got = evaluate_ranking(dist, qp, gp, qc, gc, max_rank=g, ap_mode=ap_mode, chunk=3)
  first = np.array([r[0] for r in ref])
  valid = first >= 0
  assert got["num_valid_queries"] == valid.sum() == p - 2
  np.testing.assert_allclose(got["ap"], [r[1] for r in ref], rtol=1e-12, equal_nan=True)
  assert got["mAP"] == pytest.approx(np.nanmean([r[1] for r in ref]), rel=1e-12)
  assert got["mINP"] == pytest.approx(np.nanmean([r[2] for r in ref]), rel=1e-12)
  cmc = np.array([(first[valid] <= r).mean() for r in range(g)])
  np.testing.assert_allclose(got["cmc"], cmc, rtol=1e-12)
  for topk in (3, k, 15):  # within the shortlists, and past them
    np.testing.assert_array_equal(top_k_lists(dist, topk), np.array(ranked)[:, :topk])
  keys = np.sort(dist.sort_keys(np.arange(p)), axis=1) & np.uint64(0xFFFFFFFF)
  np.testing.assert_array_equal(keys, ranked)
  # The reference really has ties to break, in the shortlist values and the global part.
  assert any(len(set(v)) < k for v in values)
  assert len(np.unique(g_desc, axis=0)) < g
  with pytest.raises(ValueError, match="no dense distance"):
    dist.dense()
