"""Two-stage evaluation end to end (docs/method.md §13): `evaluate_testset` against exact
mode and against `shortlist_rerank` fed from dense tables; storage options; config checks.
Building blocks (descriptors, nearest, score_lists, rankings): tests/test_two_stage.py."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.default import get_config
from qaconv_jax.config_checks import eval_problems
from qaconv_jax.evaluation import eval_lib
from qaconv_jax.evaluation.rerank import _Distances
from qaconv_jax.evaluation.rerank_lists import shortlist_rerank
from qaconv_jax.evaluation.testset import evaluate_testset
from qaconv_jax.evaluation.tlift_lists import temporal_lift_lists
from qaconv_jax.evaluation.two_stage import (
  ShortlistDistance,
  global_descriptors,
  nearest,
)
from qaconv_jax.models.qaconv import logit_distance
from tests.test_two_stage import _head, _unit

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
