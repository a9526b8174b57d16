"""One test set, end to end: maps -> QAConv distances -> metrics, with the post-processing
rows +TLift, +RR and +RR+TLift (docs/method.md §5-§7)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np

from qaconv_jax import sharding
from qaconv_jax.evaluation.metrics import evaluate_ranking, sort_keys
from qaconv_jax.evaluation.rerank import column_maxima, k_reciprocal_rerank
from qaconv_jax.evaluation.scoring import extract_maps, pairwise_distance
from qaconv_jax.evaluation.tlift import temporal_lift
from qaconv_jax.models.qaconv import check_eval_distance

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
  out = np.empty((dist.shape[0], k), np.int64)
  for lo in range(0, dist.shape[0], chunk):
    keys = np.partition(sort_keys(dist[lo : lo + chunk]), k - 1, axis=1)[:, :k]
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
) -> dict:
  """Evaluates one test set on every device of ``mesh`` (None: `sharding.make_mesh`).

  Every process of a multi-process run calls it and gets the same result: the maps and
  distances are gathered, and what follows them runs on those host arrays, identically.

  Args:
    embed_fn, match_fn: jitted ``images -> maps`` and ``(probe, gallery) -> logits``.
    query, gallery: random-access sources (``pids``, ``cameras``, ``times`` arrays).
    cfg: ``config.eval`` (batch_size, memory_budget_gb, rerank, k1, k2, lambda_value,
      tlift, tau, sigma, tlift_k, alpha, ap_mode, topk; distance, "sigmoid" when absent).

  Returns:
    ``{"results": {method: {...}}, "topk": {method: [P, k]}, "dist": {method: [P, G]},
    "query_maps", "gallery_maps", "notes": [str]}`` with methods ``QAConv``, then with
    ``cfg.tlift`` ``QAConv+TLift``, with ``cfg.rerank`` ``QAConv+RR``, and with both
    ``QAConv+RR+TLift`` (the authors' protocol: TLift on ``1 - re-ranked distance``).
    ``QAConv+TLift`` lifts ``sigmoid(logit)``, the score the authors' ``reid/tlift.py``
    asks for when TLift is applied to QAConv directly (its alpha suits scores averaging
    ~0.01-0.1; ``sigmoid(logit / 10)`` is far above that), and ranks by ``1 - lifted``. A
    set without a time stamp on every image gets no TLift row; ``notes`` says so.

    ``cfg.distance`` is the distance every row starts from (`logit_distance`): "sigmoid"
    (``1 - sigmoid(logit / 10)``, the authors' v1.x and v2.1 tag) or "neg_logit"
    (``-logit``, their master). ``QAConv`` ranks alike under both, and ``QAConv+TLift`` is
    the same (it lifts ``sigmoid(logit)`` either way); ``QAConv+RR`` re-ranks the chosen
    distance's q-g, q-q and g-g blocks exactly as the authors' ``reranking`` does, column
    maxima included: under "neg_logit" a column whose logits are all positive has a
    negative maximum, which reverses its order (kept, and said in ``notes``); a zero
    maximum, a division by zero there, leaves the RR rows out, also said in ``notes``.
    ``QAConv+RR+TLift`` lifts ``1 - re-ranked distance`` under both.
  """
  mesh = mesh or sharding.make_mesh()
  budget = cfg.memory_budget_gb * 2**30
  extract = functools.partial(extract_maps, embed_fn, image_size=image_size, mesh=mesh)
  q_maps = extract(query, batch_size=cfg.batch_size, label="query features")
  g_maps = extract(gallery, batch_size=cfg.batch_size, label="gallery features")
  ids = (query.pids, gallery.pids, query.cameras, gallery.cameras)
  distance = cfg.get("distance", "sigmoid")
  check_eval_distance(distance)
  score = functools.partial(
    pairwise_distance, match_fn, budget_bytes=budget, mesh=mesh, distance=distance
  )
  dist, logits = score(q_maps, g_maps, label="query x gallery", return_logits=True)
  dists = {"QAConv": dist}
  notes = []
  tlift = bool(cfg.tlift)
  if tlift and not np.isfinite(np.concatenate([query.times, gallery.times])).all():
    notes.append("TLift not applied: this set lacks a time stamp for some images.")
    tlift = False

  def lift(score: np.ndarray) -> np.ndarray:  # similarity -> lifted distance
    lifted = temporal_lift(
      score,
      query.cameras,
      query.times,
      gallery.cameras,
      gallery.times,
      cfg.tau,
      cfg.sigma,
      cfg.tlift_k,
      cfg.alpha,
    )
    return 1.0 - np.asarray(lifted)

  if tlift:
    dists["QAConv+TLift"] = lift(np.asarray(jax.nn.sigmoid(logits)))
  if cfg.rerank:
    qq = score(q_maps, q_maps, label="query x query")
    gg = score(g_maps, g_maps, label="gallery x gallery")
    colmax = column_maxima(dists["QAConv"], qq, gg)
    if (colmax == 0).any():  # -logit only: a column of 1 - sigmoid has entries far from 0
      notes.append(
        f"re-ranking not applied: {int((colmax == 0).sum())} column(s) of the "
        f"eval.distance={distance!r} distance have the maximum 0, which re-ranking divides by."
      )
    else:
      if (colmax < 0).any():
        notes.append(
          f"re-ranking: {int((colmax < 0).sum())} of {len(colmax)} images have only positive "
          "logits in their column, whose negative maximum reverses their neighbour order "
          "(as the authors' reranking computes it from -logit distances)."
        )
      with np.errstate(over="ignore", invalid="ignore"):
        reranked = k_reciprocal_rerank(dists["QAConv"], qq, gg, cfg.k1, cfg.k2, cfg.lambda_value)
      bad = int((~np.isfinite(reranked)).any(axis=1).sum())
      if bad:  # -logit only: a small positive column maximum overflows exp(-D') (as HEAD's)
        notes.append(
          f"re-ranking not applied: it overflowed for {bad} queries (exp of a distance over a "
          f"column maximum near 0 under eval.distance={distance!r})."
        )
      else:
        dists["QAConv+RR"] = reranked
        if tlift:
          dists["QAConv+RR+TLift"] = lift(1.0 - dists["QAConv+RR"])
  results = {m: summarize(evaluate_ranking(d, *ids, ap_mode=cfg.ap_mode)) for m, d in dists.items()}
  return {
    "results": results,
    "topk": {m: top_k_lists(d, cfg.topk) for m, d in dists.items()},
    "dist": dists,
    "query_maps": q_maps,
    "gallery_maps": g_maps,
    "notes": notes,
  }
