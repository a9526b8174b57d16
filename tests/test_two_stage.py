"""Two-stage retrieval (docs/method.md §13) against loop references and exact mode."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.default import get_config
from qaconv_jax.config_checks import eval_problems
from qaconv_jax.evaluation import eval_lib
from qaconv_jax.evaluation.metrics import evaluate_ranking
from qaconv_jax.evaluation.rerank import _Distances
from qaconv_jax.evaluation.rerank_lists import shortlist_rerank
from qaconv_jax.evaluation.testset import evaluate_testset, top_k_lists
from qaconv_jax.evaluation.tlift_lists import temporal_lift_lists
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
from qaconv_jax.models.qaconv import logit_distance
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


# ---------------------------------------------------------------- evaluate_testset end to end


class FakeSource:
  """Images whose pixels hold an image id; the fake embed returns that id's stored map."""

  def __init__(self, ids, pids, cameras, times):
    self.ids, self.pids, self.cameras = np.asarray(ids), np.asarray(pids), np.asarray(cameras)
    self.times = np.asarray(times, np.float64)
    self.names = [f"img{i}" for i in self.ids]

  def __len__(self):
    return len(self.pids)

  def __getitem__(self, i):
    return {
      "image": np.full((8, 4, 3), self.ids[i], np.uint8),
      "pid": int(self.pids[i]),
      "camera": int(self.cameras[i]),
      "time": float(self.times[i]),
      "where": self.names[i],
    }


def _embed(maps):
  table = jnp.asarray(maps)
  return jax.jit(lambda x: table[jnp.round(x[:, 0, 0, 0] * 255).astype(jnp.int32)])


def _cfg(**kw):
  cfg = dict(
    batch_size=5,
    memory_budget_gb=1e-4,  # several probe and gallery blocks
    rerank=False,
    k1=6,
    k2=3,
    lambda_value=0.3,
    tlift=False,
    tau=100.0,
    sigma=200.0,
    tlift_k=3,
    alpha=0.2,
    ap_mode="step",
    topk=4,
    distance="sigmoid",
    shortlist=0,
    shortlist_far=4,
    map_dtype="float32",
  )
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


P_, G_ = 8, 14
N_ = P_ + G_
MAP_SHAPE = (6, 4, 16)


@pytest.fixture(scope="module")
def problem():
  """Clustered maps of P_ queries and G_ gallery images and a perturbed v1 QAConv whose
  logits are mostly negative (so -logit columns have positive maxima: no re-ranking notes)."""
  rng = np.random.default_rng(21)
  pid = rng.integers(0, 5, N_)
  centre = rng.normal(size=(5, 1, 1, MAP_SHAPE[-1]))
  maps = _unit(centre[pid] + 1.5 * rng.normal(size=(N_, *MAP_SHAPE)))
  model, variables, match, _ = _head("v1", *MAP_SHAPE, seed=2)
  logits = np.asarray(match(maps, maps))
  variables = jax.tree.map(lambda a: a, variables)
  bias = variables["params"]["qaconv"]["logit_bn"]["bias"]
  variables["params"]["qaconv"]["logit_bn"]["bias"] = bias - (logits.mean() + 1.0)
  _, match = eval_lib.model_fns(model, variables)
  t = rng.uniform(0, 300, N_)
  query = FakeSource(np.arange(P_), pid[:P_], rng.integers(0, 3, P_), t[:P_])
  gallery = FakeSource(P_ + np.arange(G_), pid[P_:], rng.integers(0, 3, G_), t[P_:])
  return dict(
    embed=_embed(maps),
    match=match,
    lists=eval_lib.lists_fn(model, variables),
    query=query,
    gallery=gallery,
    maps=maps,
    runs={},
  )


def _evaluate(pb, cfg, **kw):
  return evaluate_testset(pb["embed"], pb["match"], pb["query"], pb["gallery"], cfg, (8, 4), **kw)


FULL_SHORTLISTS = [  # (distance, rerank, tlift, shortlist >= G; >= N for re-ranking)
  ("sigmoid", False, True, G_),
  ("sigmoid", True, True, N_ + 5),
  ("neg_logit", True, True, N_),
  ("neg_logit", False, False, G_ + 1),
  ("sigmoid", True, False, G_),  # K = G < N: re-ranking reads every pair too
]


def _exact_and_full(pb, distance, rerank, tlift, shortlist):
  """Exact mode and two-stage mode with a full shortlist (cached per module)."""
  key = (distance, rerank, tlift, shortlist)
  if key not in pb["runs"]:
    kw = dict(distance=distance, rerank=rerank, tlift=tlift)
    exact = _evaluate(pb, _cfg(**kw))
    two = _evaluate(pb, _cfg(shortlist=shortlist, **kw), lists_fn=pb["lists"])
    pb["runs"][key] = exact, two
  return pb["runs"][key]


@pytest.mark.parametrize("distance, rerank, tlift, shortlist", FULL_SHORTLISTS)
def test_a_shortlist_as_long_as_the_gallery_is_exact_mode(
  problem, distance, rerank, tlift, shortlist
):
  exact, two = _exact_and_full(problem, distance, rerank, tlift, shortlist)
  methods = (
    ["QAConv"]
    + ["QAConv+TLift"] * tlift
    + ["QAConv+RR", "QAConv+RR+TLift"][: rerank + rerank * tlift]
  )
  assert list(exact["dist"]) == list(two["dist"]) == methods
  assert exact["notes"] == two["notes"] == []
  for m in methods:
    assert isinstance(two["dist"][m], ShortlistDistance)
    np.testing.assert_array_equal(two["dist"][m].dense(), exact["dist"][m], err_msg=m)
    np.testing.assert_array_equal(two["topk"][m], exact["topk"][m], err_msg=m)
  assert two["results"] == exact["results"]
  assert two["stats"]["qaconv_pairs"] == exact["stats"]["qaconv_pairs"]
  if rerank:
    assert two["stats"]["scored_on_demand"] == 0 and two["stats"]["known_pairs"] == N_ * N_


def test_storage_float16_and_memory_mapped_gallery(problem, tmp_path):
  f32 = _evaluate(problem, _cfg())
  f16 = _evaluate(problem, _cfg(map_dtype="float16"))
  assert f16["query_maps"].dtype == f16["gallery_maps"].dtype == np.float16
  np.testing.assert_array_equal(f16["gallery_maps"], problem["maps"][P_:].astype(np.float16))
  np.testing.assert_allclose(f16["dist"]["QAConv"], f32["dist"]["QAConv"], rtol=0, atol=1e-3)

  cfg = _cfg(shortlist=7, rerank=True, tlift=True)  # partial shortlists: MapTable reads rows
  ram = _evaluate(problem, cfg, lists_fn=problem["lists"])
  path = str(tmp_path / "gallery.bin")
  mapped = _evaluate(problem, cfg, lists_fn=problem["lists"], gallery_file=path)
  assert isinstance(mapped["gallery_maps"], np.memmap) and not isinstance(
    ram["gallery_maps"], np.memmap
  )
  assert os.path.getsize(path) == G_ * np.prod(MAP_SHAPE) * 4
  np.testing.assert_array_equal(mapped["gallery_maps"], problem["maps"][P_:])
  assert (
    list(mapped["dist"])
    == list(ram["dist"])
    == list(f32["dist"])[:1]
    + [
      "QAConv+TLift",
      "QAConv+RR",
      "QAConv+RR+TLift",
    ]
  )
  for m, d in ram["dist"].items():
    np.testing.assert_array_equal(mapped["dist"][m].index, d.index)
    np.testing.assert_array_equal(mapped["dist"][m].values, d.values)
    np.testing.assert_array_equal(mapped["topk"][m], ram["topk"][m])
  assert mapped["results"] == ram["results"]
  drop_time = lambda stats: {k: v for k, v in stats.items() if k != "seconds"}
  assert drop_time(mapped["stats"]) == drop_time(ram["stats"])
  # The shortlists are re-scored with the exact matcher's numbers.
  index = ram["dist"]["QAConv"].index
  exact_at = np.take_along_axis(f32["dist"]["QAConv"], index, axis=1)
  np.testing.assert_allclose(ram["dist"]["QAConv"].values, exact_at, rtol=0, atol=1e-6)


def test_partial_two_stage_wiring_against_shortlist_rerank():
  """A matcher that reads each map's id and returns an asymmetric logit table: the lists
  are scored without rounding, so evaluate_testset must give exactly what shortlist_rerank
  gives when fed from the dense table with the roles of docs/method.md §13."""
  rng = np.random.default_rng(2)  # a draw whose expansions need 5 unlisted pairs
  p, g, k, far, k1 = 6, 18, 8, 3, 6  # k1 >= 6: expansions can reach unlisted pairs
  n = p + g
  pid = np.arange(n) % 4
  x = rng.normal(size=(4, 8))[pid] + 0.5 * rng.normal(size=(n, 8))  # people cluster ...
  maps = _unit(x[:, None, None, :] + rng.normal(size=(n, 3, 2, 8)))  # ... noisily in maps
  dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
  table = (4.0 - 3.0 * dist + rng.normal(0, 1, (n, n))).astype(np.float32)  # [probe, gallery]
  flat, tab = jnp.asarray(maps.reshape(n, -1)), jnp.asarray(table)

  def ids(x):
    return jnp.argmax(jnp.dot(x.reshape(len(x), -1), flat.T, precision="highest"), axis=1)

  match = jax.jit(lambda a, b: tab[ids(a)[:, None], ids(b)[None, :]])
  t = rng.uniform(0, 300, n)
  query = FakeSource(np.arange(p), pid[:p], np.arange(p) % 2, t[:p])
  gallery = FakeSource(p + np.arange(g), pid[p:], np.arange(g) % 3, t[p:])
  cfg = _cfg(shortlist=k, shortlist_far=far, rerank=True, k1=k1, k2=3, tlift=True, tlift_k=2)
  out = evaluate_testset(_embed(maps), match, query, gallery, cfg, (8, 4))  # generic lists

  q_desc, g_desc = global_descriptors(maps[:p]), global_descriptors(maps[p:])
  index, _, _ = nearest(q_desc, g_desc, k)
  all_desc = np.concatenate([q_desc, g_desc])
  near, _, far_idx = nearest(all_desc, all_desc, k, far)
  dist_of = lambda x: np.asarray(logit_distance(jnp.asarray(x)))
  blocks = _Distances(dist_of(table[:p, p:]), dist_of(table[:p, :p]), dist_of(table[p:, p:]))
  rows = np.arange(n)[:, None]
  qg = np.take_along_axis(blocks.qg, index, axis=1)
  want, info = shortlist_rerank(
    lambda i, j: blocks.raw(i, j),
    index,
    qg,
    near,
    blocks.raw(np.broadcast_to(rows, near.shape), near),
    far_idx,
    blocks.raw(np.broadcast_to(rows, far_idx.shape), far_idx),
    k1,
    3,
    0.3,
  )
  assert info["scored_on_demand"] > 0  # the on-demand path is part of what is compared
  got = out["dist"]
  np.testing.assert_array_equal(got["QAConv"].index, index)
  np.testing.assert_allclose(got["QAConv"].values, qg, rtol=0, atol=1e-6)
  np.testing.assert_allclose(got["QAConv+RR"].values, want, rtol=1e-5, atol=1e-6)
  sig = 1.0 / (1.0 + np.exp(-np.take_along_axis(table[:p, p:], index, axis=1)))
  times = (query.cameras, query.times, gallery.cameras, gallery.times, 100.0, 200.0, 2, 0.2)
  lifted = 1.0 - temporal_lift_lists(sig, index, *times)
  np.testing.assert_allclose(got["QAConv+TLift"].values, lifted, rtol=0, atol=1e-5)
  stats = out["stats"]
  assert stats["scored_on_demand"] == info["scored_on_demand"]
  assert stats["qaconv_pairs"] == p * k + n * k + n * far + info["scored_on_demand"]


# ---------------------------------------------------------------- config checks


def test_a_shortlist_shorter_than_k1_plus_1_is_refused_with_rerank():
  cfg = get_config("tiny").eval
  cfg.update(rerank=True, k1=20, k2=6, shortlist=5)
  problems = [s for s in eval_problems(cfg) if "shortlist" in s]
  assert len(problems) == 1 and problems[0].startswith("eval.shortlist=5 with eval.rerank")
  assert "k1 + 1 = 21" in problems[0] and "eval.shortlist >= 21" in problems[0]
  for ok in (dict(shortlist=21), dict(shortlist=0), dict(shortlist=5, rerank=False)):
    cfg.update(ok)
    assert not [s for s in eval_problems(cfg) if "shortlist" in s], ok


def test_neighbour_shortlist_and_two_stage_settings_are_checked():
  cfg = get_config("tiny").eval
  cfg.update(rerank=True, k1=20, k2=6, shortlist=100, neighbour_shortlist=10)
  problems = [s for s in eval_problems(cfg) if "shortlist" in s]
  assert problems == [
    "eval.neighbour_shortlist=10 with eval.rerank: each image's re-scored shortlist must "
    "hold its k1 + 1 = 21 neighbours; use eval.neighbour_shortlist >= 21"
  ]
  cfg.neighbour_shortlist = 21
  assert not [s for s in eval_problems(cfg) if "shortlist" in s]
  cfg.update(neighbour_shortlist=-1, lists_gather="gpu", map_dtype="int8", shortlist_far=-1)
  problems = eval_problems(cfg)
  bad = ("neighbour_shortlist=-1", "lists_gather='gpu'", "map_dtype='int8'", "shortlist_far=-1")
  for key in bad:
    assert any(s.startswith(f"eval.{key}: expected") for s in problems), (key, problems)
