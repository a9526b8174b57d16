"""One test set, end to end: maps -> QAConv distances -> metrics, with the post-processing
rows +TLift, +RR and +RR+TLift (docs/method.md §5-§7), exact or two-stage (§13)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import numpy as np

from qaconv_jax import sharding
from qaconv_jax.evaluation.metrics import evaluate_ranking, ranking_keys
from qaconv_jax.evaluation.rerank import column_maxima, k_reciprocal_rerank
from qaconv_jax.evaluation.rerank_lists import shortlist_rerank
from qaconv_jax.evaluation.scoring import extract_maps, pairwise_distance
from qaconv_jax.evaluation.tlift import temporal_lift
from qaconv_jax.evaluation.tlift_lists import temporal_lift_lists
from qaconv_jax.evaluation.two_stage import (
  MAP_DTYPES,
  MapTable,
  ShortlistDistance,
  generic_lists_fn,
  global_descriptors,
  lists_scorer,
  nearest,
)
from qaconv_jax.models.qaconv import check_eval_distance, logit_distance

RANKS = (1, 5, 10, 20)


def summarize(result: dict) -> dict:
  """Metrics dict -> the numbers we print and save (percent)."""
  out = {f"rank{r}": 100.0 * float(result["cmc"][r - 1]) for r in RANKS}
  out.update(
    mAP=100.0 * result["mAP"],
    mINP=100.0 * result["mINP"],
    num_valid_queries=result["num_valid_queries"],
  )
  return out


def top_k_lists(dist: np.ndarray, k: int, chunk: int = 512) -> np.ndarray:
  """``[P, k]`` gallery indices of each query's k nearest, ties by gallery order (the
  metrics' order: unique (distance, index) keys, partitioned then sorted)."""
  k = min(k, dist.shape[1])
  if isinstance(dist, ShortlistDistance) and k <= dist.index.shape[1]:
    return dist.ordered()[:, :k]
  out = np.empty((dist.shape[0], k), np.int64)
  for lo in range(0, dist.shape[0], chunk):
    rows = np.arange(lo, min(lo + chunk, dist.shape[0]))
    keys = np.partition(ranking_keys(dist, rows), k - 1, axis=1)[:, :k]
    out[lo : lo + chunk] = (np.sort(keys, axis=1) & np.uint64(0xFFFFFFFF)).astype(np.int64)
  return out


def evaluate_testset(
  embed_fn: Callable,
  match_fn: Callable,
  query,
  gallery,
  cfg,
  image_size: tuple[int, int],
  mesh=None,
  lists_fn: Callable | None = None,
  gallery_file: str | None = None,
) -> dict:
  """Evaluates one test set on every device of ``mesh`` (None: `sharding.make_mesh`).

  Every process of a multi-process run calls it and gets the same result: the maps and
  distances are gathered, and what follows them runs on those host arrays, identically.

  Args:
    embed_fn, match_fn: jitted ``images -> maps`` and ``(probe, gallery) -> logits``.
    query, gallery: random-access sources (``pids``, ``cameras``, ``times`` arrays).
    cfg: ``config.eval`` (batch_size, memory_budget_gb, rerank, k1, k2, lambda_value,
      tlift, tau, sigma, tlift_k, alpha, ap_mode, topk; distance, "sigmoid" when absent;
      shortlist, shortlist_far and map_dtype, 0 / 10 / "float32" when absent).
    lists_fn: ``(anchor, cands, anchor_is_probe) -> logits [B, K]`` for two-stage mode
      (`eval_lib.lists_fn`); None: `two_stage.generic_lists_fn` of ``match_fn`` (slower).
    gallery_file: where to keep the gallery maps as a memory-mapped file (written during
      extraction, read back on demand) instead of in RAM; None: RAM.

  Returns:
    ``{"results": {method: {...}}, "topk": {method: [P, k]}, "dist": {method: [P, G]},
    "query_maps", "gallery_maps", "notes": [str], "stats": {...}}`` with methods
    ``QAConv``, then with ``cfg.tlift`` ``QAConv+TLift``, with ``cfg.rerank`` ``QAConv+RR``,
    and with both ``QAConv+RR+TLift`` (the authors' protocol: TLift on ``1 - re-ranked
    distance``). ``QAConv+TLift`` lifts ``sigmoid(logit)``, the score the authors'
    ``reid/tlift.py`` asks for when TLift is applied to QAConv directly (its alpha suits
    scores averaging ~0.01-0.1; ``sigmoid(logit / 10)`` is far above that), and ranks by
    ``1 - lifted``. A set without a time stamp on every image gets no TLift row; ``notes``
    says so.

    ``cfg.distance`` is the distance every row starts from (`logit_distance`): "sigmoid"
    (``1 - sigmoid(logit / 10)``, the authors' v1.x and v2.1 tag) or "neg_logit"
    (``-logit``, their master). ``QAConv`` ranks alike under both, and ``QAConv+TLift`` is
    the same (it lifts ``sigmoid(logit)`` either way); ``QAConv+RR`` re-ranks the chosen
    distance's q-g, q-q and g-g blocks exactly as the authors' ``reranking`` does, column
    maxima included: under "neg_logit" a column whose logits are all positive has a
    negative maximum, which reverses its order (kept, and said in ``notes``); a zero
    maximum, a division by zero there, leaves the RR rows out, also said in ``notes``.
    ``QAConv+RR+TLift`` lifts ``1 - re-ranked distance`` under both.

    ``cfg.shortlist = K > 0``: two-stage retrieval (docs/method.md §13). Each ``dist`` is
    then a `ShortlistDistance` (each query's K shortlisted gallery items ordered by the
    method, the rest by the global descriptor), re-ranking reads only shortlists
    re-scored by QAConv, and ``stats`` counts the pairs QAConv scored.
  """
  mesh = mesh or sharding.make_mesh()
  dtype = MAP_DTYPES[cfg.get("map_dtype", "float32")]
  extract = functools.partial(
    extract_maps, embed_fn, image_size=image_size, mesh=mesh, batch_size=cfg.batch_size, dtype=dtype
  )
  q_maps = extract(query, label="query features")
  store = None
  if gallery_file:
    store = np.memmap(gallery_file, dtype, "w+", shape=(len(gallery), *q_maps.shape[1:]))
  g_maps = extract(gallery, label="gallery features", out=store)
  if store is not None:
    store.flush()
    g_maps = np.memmap(gallery_file, dtype, "r", shape=store.shape)
  return evaluate_maps(match_fn, q_maps, g_maps, query, gallery, cfg, mesh, lists_fn)


def evaluate_maps(
  match_fn: Callable, q_maps, g_maps, query, gallery, cfg, mesh=None, lists_fn=None
) -> dict:
  """`evaluate_testset` from extracted maps ``[P, h, w, d]``, ``[G, h, w, d]`` (any stored
  dtype; the gallery may be memory-mapped); ``query``, ``gallery``: anything with ``pids``,
  ``cameras`` and ``times`` arrays. ``stats["seconds"]`` times each stage."""
  mesh = mesh or sharding.make_mesh()
  distance = cfg.get("distance", "sigmoid")
  check_eval_distance(distance)
  notes = []
  tlift = bool(cfg.tlift)
  if tlift and not np.isfinite(np.concatenate([query.times, gallery.times])).all():
    notes.append("TLift not applied: this set lacks a time stamp for some images.")
    tlift = False
  tlift_args = tlift and (
    *(query.cameras, query.times, gallery.cameras, gallery.times),
    *(cfg.tau, cfg.sigma, cfg.tlift_k, cfg.alpha),
  )
  clock = Stopwatch()
  if cfg.get("shortlist", 0):
    lists_fn = lists_fn or generic_lists_fn(match_fn)
    dists, stats = _two_stage(
      match_fn, lists_fn, q_maps, g_maps, cfg, mesh, distance, tlift_args, notes, clock
    )
  else:
    dists, stats = _exact(match_fn, q_maps, g_maps, cfg, mesh, distance, tlift_args, notes)
    clock.lap("scoring and post-processing")
  ids = (query.pids, gallery.pids, query.cameras, gallery.cameras)
  results = {m: summarize(evaluate_ranking(d, *ids, ap_mode=cfg.ap_mode)) for m, d in dists.items()}
  topk = {m: top_k_lists(d, cfg.topk) for m, d in dists.items()}
  clock.lap("metrics")
  stats["seconds"] = clock.laps
  return {
    "results": results,
    "topk": topk,
    "dist": dists,
    "query_maps": q_maps,
    "gallery_maps": g_maps,
    "notes": notes,
    "stats": stats,
  }


class Stopwatch:
  """Seconds of consecutive stages: ``lap(name)`` closes the stage running since the last."""

  def __init__(self):
    self.laps, self._last = {}, time.perf_counter()

  def lap(self, name: str) -> None:
    now = time.perf_counter()
    self.laps[name] = self.laps.get(name, 0.0) + now - self._last
    self._last = now


def _rerank_blocked(colmax: np.ndarray, distance: str, notes: list) -> bool:
  """Notes what the column maxima do to re-ranking; True when it cannot run."""
  if (colmax == 0).any():  # -logit only: a column of 1 - sigmoid has entries far from 0
    notes.append(
      f"re-ranking not applied: {int((colmax == 0).sum())} column(s) of the "
      f"eval.distance={distance!r} distance have the maximum 0, which re-ranking divides by."
    )
    return True
  if (colmax < 0).any():
    notes.append(
      f"re-ranking: {int((colmax < 0).sum())} of {len(colmax)} images have only positive "
      "logits in their column, whose negative maximum reverses their neighbour order "
      "(as the authors' reranking computes it from -logit distances)."
    )
  return False


def _overflowed(reranked: np.ndarray, distance: str, notes: list) -> bool:
  bad = int((~np.isfinite(reranked)).any(axis=1).sum())
  if bad:  # -logit only: a small positive column maximum overflows exp(-D') (as HEAD's)
    notes.append(
      f"re-ranking not applied: it overflowed for {bad} queries (exp of a distance over a "
      f"column maximum near 0 under eval.distance={distance!r})."
    )
  return bool(bad)


def _exact(match_fn, q_maps, g_maps, cfg, mesh, distance, tlift_args, notes):
  """Every query against every gallery image: dense ``[P, G]`` distances."""
  score = functools.partial(
    pairwise_distance,
    match_fn,
    budget_bytes=cfg.memory_budget_gb * 2**30,
    mesh=mesh,
    distance=distance,
  )
  dist, logits = score(q_maps, g_maps, label="query x gallery", return_logits=True)
  dists = {"QAConv": dist}
  lift = lambda s: 1.0 - np.asarray(temporal_lift(s, *tlift_args))  # similarity -> distance
  if tlift_args:
    dists["QAConv+TLift"] = lift(np.asarray(jax.nn.sigmoid(logits)))
  pairs = dist.size
  if cfg.rerank:
    qq = score(q_maps, q_maps, label="query x query")
    gg = score(g_maps, g_maps, label="gallery x gallery")
    pairs += qq.size + gg.size
    if not _rerank_blocked(column_maxima(dist, qq, gg), distance, notes):
      with np.errstate(over="ignore", invalid="ignore"):
        reranked = k_reciprocal_rerank(dist, qq, gg, cfg.k1, cfg.k2, cfg.lambda_value)
      if not _overflowed(reranked, distance, notes):
        dists["QAConv+RR"] = reranked
        if tlift_args:
          dists["QAConv+RR+TLift"] = lift(1.0 - reranked)
  return dists, {"qaconv_pairs": pairs}


def _two_stage(match_fn, lists_fn, q_maps, g_maps, cfg, mesh, distance, tlift_args, notes, clock):
  """Shortlists by the global descriptor, re-scored by QAConv (docs/method.md §13).

  K >= G lists every pair: that is exact mode itself (`_exact`, re-ranking and TLift
  included), its rows read at each query's shortlist, so the distances are exact mode's bit
  for bit.
  """
  p, g = len(q_maps), len(g_maps)
  n = p + g
  table = MapTable(q_maps, g_maps)
  q_desc, g_desc = global_descriptors(q_maps), global_descriptors(g_maps)
  budget = cfg.memory_budget_gb * 2**30
  k = min(int(cfg.shortlist), g)
  index, _, _ = nearest(q_desc, g_desc, k, mesh=mesh)  # [P, K]
  clock.lap("global shortlists")
  if k == g:
    dense, stats = _exact(match_fn, q_maps, g_maps, cfg, mesh, distance, tlift_args, notes)
    clock.lap("QAConv re-scoring")
    dists = {
      m: ShortlistDistance(index, np.take_along_axis(d, index, axis=1), q_desc, g_desc)
      for m, d in dense.items()
    }
    stats["shortlist"] = k
    if cfg.rerank:  # every pair was scored: none on demand
      stats.update(known_pairs=n * n, scored_on_demand=0)
    return dists, stats

  scorer = lists_scorer(lists_fn, table, budget, cfg.get("lists_gather", "auto"), mesh)

  def score(anchors, cands, anchor_is_probe, label):  # -> (logits, distances) [n, L]
    logits = scorer(anchors, cands, anchor_is_probe, label)
    return logits, np.asarray(logit_distance(logits, distance))

  logits, dist = score(np.arange(p), p + index, np.ones(index.shape, bool), "query shortlists")
  pairs = index.size
  clock.lap("QAConv re-scoring")
  base = ShortlistDistance(index, dist, q_desc, g_desc)
  dists = {"QAConv": base}

  def lift(similarity):  # [P, K] -> distances [P, K]
    return 1.0 - temporal_lift_lists(similarity, index, *tlift_args)

  if tlift_args:
    dists["QAConv+TLift"] = base.with_values(lift(np.asarray(jax.nn.sigmoid(logits))))
    clock.lap("TLift")
  stats = {"shortlist": k}
  if cfg.rerank:
    all_desc = np.concatenate([q_desc, g_desc])
    far = min(int(cfg.get("shortlist_far", 10)), n)
    num_near = min(int(cfg.get("neighbour_shortlist", 0) or cfg.shortlist), n)
    near, _, far_idx = nearest(all_desc, all_desc, num_near, far, mesh=mesh)
    clock.lap("global shortlists")
    rows = np.arange(n)[:, None]
    _, d_near = score(rows[:, 0], near, (rows < p) & (near >= p), "neighbour shortlists")
    d_far = np.zeros(far_idx.shape, np.float32)
    if far:
      _, d_far = score(rows[:, 0], far_idx, (rows < p) & (far_idx >= p), "farthest images")
    pairs += near.size + far_idx.size
    clock.lap("QAConv re-scoring")

    def score_pairs(i, j, group=16):  # D[j, i] of pairs no list holds, grouped by anchor
      anchors, cands, slot_row, slot = _group_pairs(i, j, group)
      _, d = score(anchors, cands, (anchors[:, None] < p) & (cands >= p), "more pairs")
      return d[slot_row, slot]

    with np.errstate(over="ignore", invalid="ignore"):
      reranked, info = shortlist_rerank(
        score_pairs, index, dist, near, d_near, far_idx, d_far, cfg.k1, cfg.k2, cfg.lambda_value
      )
    clock.lap("re-ranking")
    colmax = info.pop("column_maxima")  # of the known entries: they decide the same notes
    pairs += info["scored_on_demand"]
    stats.update(info)
    if not _rerank_blocked(colmax, distance, notes) and not _overflowed(reranked, distance, notes):
      dists["QAConv+RR"] = base.with_values(reranked)
      if tlift_args:
        dists["QAConv+RR+TLift"] = base.with_values(lift(1.0 - reranked))
  stats["qaconv_pairs"] = pairs
  if tlift_args and cfg.rerank:
    clock.lap("TLift")
  return dists, stats


def _group_pairs(i: np.ndarray, j: np.ndarray, group: int):
  """Pairs (i, j) -> rows of one anchor and up to ``group`` candidates (padded with the
  last candidate): ``(anchors [R], cands [R, group], row [M], slot [M])`` where pair m sits
  at ``cands[row[m], slot[m]]``."""
  order = np.lexsort((j, i))
  i_s, j_s = i[order], j[order]
  new_anchor = np.r_[True, i_s[1:] != i_s[:-1]]
  run_start = np.maximum.accumulate(np.where(new_anchor, np.arange(len(i_s)), 0))
  slot_s = (np.arange(len(i_s)) - run_start) % group
  row_s = np.cumsum(new_anchor | (slot_s == 0)) - 1
  cands = np.empty((row_s[-1] + 1, group), np.int64)
  cands[row_s] = j_s[:, None]  # fills every slot; the real ones overwrite below
  cands[row_s, slot_s] = j_s
  anchors = np.empty(len(cands), np.int64)
  anchors[row_s] = i_s
  row, slot = np.empty_like(row_s), np.empty_like(slot_s)
  row[order], slot[order] = row_s, slot_s
  return anchors, cands, row, slot
