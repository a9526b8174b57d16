"""Ranking a feature index for query images (docs/method.md §14), the way eval.py ranks a
gallery: the query maps are stored in the index's dtype as eval stores them with
``eval.map_dtype``, scored by QAConv against every index image (or, with a shortlist, against
each query's K nearest by the global descriptor, `two_stage`), and ranked by the distance
``config.eval.distance`` names, ties going to the lower index row (`testset.top_k_lists`).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from qaconv_jax.data.filenames import describe_names
from qaconv_jax.errors import ConfigError
from qaconv_jax.evaluation.scoring import extract_maps, pairwise_distance
from qaconv_jax.evaluation.testset import top_k_lists
from qaconv_jax.evaluation.two_stage import (
  MAP_DTYPES,
  MapTable,
  ShortlistDistance,
  global_descriptors,
  lists_scorer,
  nearest,
)
from qaconv_jax.inference.feature_index import load_image
from qaconv_jax.models.qaconv import logit_distance


@dataclasses.dataclass
class Ranking:
  """Each query's ``top`` index rows, best first: ``rows [q, t]``, ``distance [q, t]``;
  ``query_maps [q, h, w, d]`` (the index's dtype); ``seconds`` per stage."""

  rows: np.ndarray
  distance: np.ndarray
  query_maps: np.ndarray
  shortlist: int
  seconds: dict
  notes: list[str]


def embed_queries(trained, paths: list[str], map_dtype: str) -> np.ndarray:
  """``[q, h, w, d]`` maps of the query images, stored in ``map_dtype`` (the index's)."""
  # A few queries are not padded to a whole evaluation batch: the next power of two (at
  # most a handful of compilations) up to eval.batch_size.
  batch = min(trained.config.eval.batch_size, 1 << max(0, len(paths) - 1).bit_length())
  return extract_maps(
    trained.embed,
    paths,  # a query that cannot be read is an error (load_image raises), not a skip
    trained.image_size,
    batch,
    label="query features",
    mesh=trained.mesh,
    dtype=MAP_DTYPES[map_dtype],
    image=lambda i: load_image(paths[i], trained.image_size),
  )


def rank_index(trained, index, query_paths: list[str], top: int, shortlist: int = 0) -> Ranking:
  """Ranks ``index`` (a `FeatureIndex` of ``trained``'s model) for each query image.

  ``shortlist`` K > 0: QAConv scores only each query's K nearest index images by the global
  descriptor (K >= the index size: every image, as without). ``top`` <= K then: only
  shortlisted images have a QAConv distance.
  """
  index.check_model(trained.fingerprint, f"the model of {trained.workdir}")
  num = len(index.maps)
  if top < 1:
    raise ConfigError(f"--top {top}: expected an integer >= 1.")
  if shortlist < 0:
    raise ConfigError(f"--shortlist {shortlist}: expected an integer >= 0 (0: every image).")
  k = min(shortlist, num) if shortlist else num
  if top > k < num:
    raise ConfigError(
      f"--top {top} exceeds --shortlist {shortlist}: only shortlisted images get a QAConv "
      "distance; ask for at most that many or a longer shortlist."
    )
  top = min(top, num)  # a small index: all of it
  notes = []
  built_under = index.info["model"].get("numerics")
  if built_under != trained.config.eval.dtype:
    notes.append(
      f"the queries are embedded under eval.dtype={trained.config.eval.dtype!r}, the index "
      f"was under {built_under!r}: distances differ from a same-numerics search in rounding."
    )
  seconds = {}
  start = time.perf_counter()
  q_maps = embed_queries(trained, query_paths, index.info["map_dtype"])
  seconds["embed queries"] = time.perf_counter() - start
  start = time.perf_counter()
  cfg = trained.config.eval
  budget = cfg.memory_budget_gb * 2**30
  if k == num:
    dist = pairwise_distance(
      trained.match,
      q_maps,
      np.asarray(index.maps),
      budget_bytes=budget,
      label="scores",
      mesh=trained.mesh,
      distance=trained.distance,
    )  # [q, N]
    rows = top_k_lists(dist, top)
    values = np.take_along_axis(dist, rows, axis=1)
  else:
    q_desc = global_descriptors(q_maps)
    cands, _, _ = nearest(q_desc, index.descriptors, k, mesh=trained.mesh)  # [q, K]
    table = MapTable(q_maps, index.maps)
    gather = cfg.get("lists_gather", "auto")  # configs written before the key: "auto"
    score = lists_scorer(trained.match_lists, table, budget, gather, trained.mesh)
    q = len(q_maps)
    logits = score(np.arange(q), q + cands, np.ones(cands.shape, bool), "shortlists")
    dist = np.asarray(logit_distance(logits, trained.distance))  # [q, K]
    rows = top_k_lists(ShortlistDistance(cands, dist, q_desc, index.descriptors), top)
    values = _values_at(cands, dist, rows)
  seconds["rank"] = time.perf_counter() - start
  return Ranking(rows, values.astype(np.float32), q_maps, k, seconds, notes)


def _values_at(cands: np.ndarray, values: np.ndarray, chosen: np.ndarray) -> np.ndarray:
  """``values [q, K]`` of the candidates ``cands [q, K]`` at the rows ``chosen [q, t]``
  (each a member of its query's candidates)."""
  order = np.argsort(cands, axis=1)
  sorted_cands = np.take_along_axis(cands, order, axis=1)
  pos = np.stack([np.searchsorted(s, c) for s, c in zip(sorted_cands, chosen)])
  return np.take_along_axis(values, np.take_along_axis(order, pos, axis=1), axis=1)


def results_json(index, query_paths: list[str], ranking: Ranking, trained) -> dict:
  """The JSON `qaconv_jax.search` writes: ``{"queries": [{"query", "pid", "camera",
  "time", "results": [{"rank", "path", "distance", "row", "pid", "camera", "time"}]}],
  ...}``, results in rank order; None where a file name says nothing."""
  queries = []
  # Market-1501 times need session offsets over all names together, as the index took them.
  names = describe_names([r["path"] for r in index.records] + list(query_paths))
  for q, (path, name) in enumerate(zip(query_paths, names[len(index.records) :])):
    results = [
      {
        "rank": r + 1,
        "path": index.records[row]["path"],
        "distance": float(ranking.distance[q, r]),
        "row": int(row),
        **{k: index.records[row][k] for k in ("pid", "camera", "time")},
      }
      for r, row in enumerate(ranking.rows[q])
    ]
    queries.append(
      {"query": path, "pid": name.pid, "camera": name.camera, "time": name.time, "results": results}
    )
  return {
    "index": index.path,
    "model": {k: trained.describe()[k] for k in ("fingerprint", "workdir", "step")},
    "distance": trained.distance,
    "map_dtype": index.info["map_dtype"],
    "shortlist": ranking.shortlist if ranking.shortlist < len(index.maps) else 0,
    "notes": ranking.notes,
    "queries": queries,
  }


def format_text(report: dict) -> str:
  """The printed top lists: rank, distance, camera, time, path."""
  lines = [f"note: {n}" for n in report["notes"]]
  for i, q in enumerate(report["queries"]):
    lines.append(f"query {i + 1}/{len(report['queries'])}: {shown(q['query'])}{_where(q)}")
    lines.append(f"  {'rank':>4}  {'distance':>10}  {'camera':>6}  {'time':>9}  path")
    for r in q["results"]:
      cam = "" if r["camera"] is None else str(r["camera"])
      t = "" if r["time"] is None else f"{r['time']:.1f}s"
      path = shown(r["path"])
      lines.append(f"  {r['rank']:>4}  {r['distance']:>10.6f}  {cam:>6}  {t:>9}  {path}")
  return "\n".join(lines)


def shown(path: str) -> str:
  """``path`` printable: bytes of a name that is not UTF-8 (kept as surrogate escapes)
  shown as U+FFFD."""
  return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _where(q: dict) -> str:
  parts = [f"camera {q['camera']}" if q["camera"] is not None else ""]
  parts.append(f"time {q['time']:.1f}s" if q["time"] is not None else "")
  parts = [p for p in parts if p]
  return f" ({', '.join(parts)})" if parts else ""
