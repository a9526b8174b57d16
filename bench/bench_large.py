"""Large-gallery evaluation (docs/method.md §13): two-stage retrieval, QAConv re-scoring of
the shortlists, neighbour-list re-ranking and CMC/mAP over the whole gallery, at a chosen
size, on clustered random feature maps.

The maps are unit ``[24, 8, 128]`` (hw = 192, d = 128, a 384x128 image's layer3 map): an
identity is one vector per horizontal stripe (6 body parts), and each image adds
per-location noise, an image-wide and a camera-wide nuisance (so that neither the global
descriptor nor QAConv finds every match). They are stored in ``--map-dtype`` (default
bfloat16): the queries in RAM, the gallery in a memory-mapped file under ``--workdir``. The
matcher is QAConv's v2 head at its initialisation (a mean of the best local matches).

Measured: the evaluation's wall time by stage (``evaluate_maps``), the peak RSS of the
process, the pairs QAConv scored, and the shortlist's recall of exact QAConv's top-10 on
``--recall-queries`` random queries (those queries scored against the whole gallery; that
run's rate projects exact mode's time). ``--check-exact`` first runs a small set with
K >= G against exact mode and reports the largest distance difference (and that of the
lists scorer against the cross scorer on the same pairs).

  python bench/bench_large.py --queries 11659 --gallery 82161 --shortlist 100 --cameras 15 \\
      --neighbour-shortlist 50 \\
      --rerank --check-exact

The last line printed is one JSON object: wall_s, peak_rss_gb, qaconv_pairs, recall_at_k,
projected_exact_s, results, seconds by stage (and max_abs_diff_vs_exact with --check-exact).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from common import machine, table

from qaconv_jax import sharding
from qaconv_jax.evaluation.scoring import pairwise_distance
from qaconv_jax.evaluation.testset import evaluate_maps, top_k_lists
from qaconv_jax.evaluation.two_stage import MAP_DTYPES, MapTable, nearest, score_lists
from qaconv_jax.models.model import l2_normalize
from qaconv_jax.models.qaconv import QAConv

H, W, D = 24, 8, 128
STRIPES = 6  # an identity: one unit-variance vector per horizontal stripe (body part)
# Per-location noise, image-wide and camera-wide nuisance (standard deviations per component).
NOISE = (1.0, 0.3, 0.3)


class Meta:
  """What the metrics read of a set: ``pids``, ``cameras``, ``times`` (none here)."""

  def __init__(self, pids, cameras):
    self.pids, self.cameras = pids, cameras
    self.times = np.full(len(pids), np.nan)


def make_set(
  q: int,
  g: int,
  ids: int,
  cameras: int,
  seed: int,
  gallery_file: str | None,
  dtype=np.float16,
  noise=NOISE,
):
  """Query maps ``[q, H, W, D]`` float16 (RAM), gallery maps (a memmap when
  ``gallery_file``), and their `Meta`. Every identity has gallery images; queries draw
  identities at random."""
  rng = np.random.default_rng(seed)
  g_pids = rng.permutation(np.arange(g) % ids)
  q_pids = rng.integers(0, ids, q)
  q_cams, g_cams = rng.integers(0, cameras, q), rng.integers(0, cameras, g)
  key = jax.random.key(seed)
  parts = jax.random.normal(jax.random.fold_in(key, 0), (ids, STRIPES, 1, D))
  proto = jnp.repeat(parts, H // STRIPES, axis=1)  # [ids, H, 1, D]
  proto = jnp.broadcast_to(proto, (ids, H, W, D)).reshape(ids, H * W, D)
  camera_style = jax.random.normal(jax.random.fold_in(key, 1), (cameras, 1, D))

  @jax.jit
  def images(k, pids, cams):  # -> [n, H, W, D] unit maps (float32; stored in dtype)
    k1, k2 = jax.random.split(k)
    n = pids.shape[0]
    x = proto[pids] + noise[0] * jax.random.normal(k1, (n, H * W, D))
    x = x + noise[1] * jax.random.normal(k2, (n, 1, D)) + noise[2] * camera_style[cams]
    return l2_normalize(x).reshape(n, H, W, D)

  def fill(out, pids, cams, salt):
    chunk = 2048
    for lo in range(0, len(pids), chunk):
      k = jax.random.fold_in(key, salt + lo)
      maps = np.asarray(images(k, pids[lo : lo + chunk], cams[lo : lo + chunk]))
      out[lo : lo + chunk] = maps.astype(dtype)
    return out

  q_maps = fill(np.empty((q, H, W, D), dtype), q_pids, q_cams, 10**9)
  if gallery_file:
    g_maps = np.memmap(gallery_file, dtype, "w+", shape=(g, H, W, D))
  else:
    g_maps = np.empty((g, H, W, D), dtype)
  fill(g_maps, g_pids, g_cams, 2 * 10**9)
  if gallery_file:
    g_maps.flush()
    g_maps = np.memmap(gallery_file, dtype, "r", shape=(g, H, W, D))
  return q_maps, g_maps, Meta(q_pids, q_cams), Meta(g_pids, g_cams)


def matcher():
  """QAConv's v2 head at initialisation: ``(match, lists)`` jitted."""
  model = QAConv(head="v2")
  x = jnp.zeros((1, H, W, D))
  variables = model.init(jax.random.key(0), x, x, train=False)
  match = jax.jit(lambda p, g: model.apply(variables, p, g, train=False))
  lists = jax.jit(lambda a, c, aip: model.apply(variables, a, c, False, None, aip))
  return match, lists


def eval_config(shortlist: int, args) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      shortlist=shortlist,
      neighbour_shortlist=args.neighbour_shortlist,
      shortlist_far=10,
      rerank=args.rerank,
      k1=20,
      k2=6,
      lambda_value=0.3,
      tlift=False,
      ap_mode="step",
      topk=10,
      memory_budget_gb=args.budget,
      distance="sigmoid",
    )
  )


def check_exact(match, lists, args) -> dict:
  """A small set with K >= G: two-stage against exact mode, and the lists scorer against the
  cross scorer on every pair."""
  dtype = MAP_DTYPES[args.map_dtype]
  q_maps, g_maps, qm, gm = make_set(
    120, 600, 40, args.cameras, args.seed + 1, None, dtype, args.noise
  )
  exact = evaluate_maps(match, q_maps, g_maps, qm, gm, eval_config(0, args))
  full = eval_config(720, args)  # >= G and >= P + G: every list is everything
  full.neighbour_shortlist = 0
  two = evaluate_maps(match, q_maps, g_maps, qm, gm, full, lists_fn=lists)
  diff = max(float(np.abs(two["dist"][m].dense() - exact["dist"][m]).max()) for m in exact["dist"])
  p, g = len(q_maps), len(g_maps)
  index = np.broadcast_to(np.arange(g), (p, g))
  logits = score_lists(lists, MapTable(q_maps, g_maps), np.arange(p), p + index, index >= 0)
  _, cross = pairwise_distance(match, q_maps, g_maps, return_logits=True)
  return {
    "max_abs_diff_vs_exact": diff,
    "results_equal": exact["results"] == two["results"],
    "lists_vs_cross_max_abs_diff_logits": float(np.abs(logits - cross).max()),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--queries", type=int, default=2000)
  parser.add_argument("--gallery", type=int, default=10000)
  parser.add_argument("--shortlist", type=int, default=100)
  parser.add_argument("--cameras", type=int, default=6)
  parser.add_argument("--ids", type=int, default=0, help="identities (0: one per 30 images)")
  parser.add_argument("--rerank", action="store_true")
  parser.add_argument("--neighbour-shortlist", type=int, default=0, help="0: --shortlist")
  parser.add_argument("--map-dtype", default="bfloat16", choices=sorted(MAP_DTYPES))
  parser.add_argument("--check-exact", action="store_true")
  parser.add_argument("--recall-queries", type=int, default=50)
  parser.add_argument("--budget", type=float, default=1.0, help="eval memory budget (GB)")
  parser.add_argument("--workdir", default="/tmp/bench_large")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--noise",
    default=",".join(map(str, NOISE)),
    help="per-location, image-wide and camera-wide noise (std per component)",
  )
  args = parser.parse_args()
  args.noise = tuple(float(x) for x in args.noise.split(","))
  os.makedirs(args.workdir, exist_ok=True)
  print(machine(), flush=True)
  match, lists = matcher()
  extra = check_exact(match, lists, args) if args.check_exact else {}

  ids = args.ids or max(2, (args.queries + args.gallery) // 30)
  t = time.perf_counter()
  gallery_file = os.path.join(args.workdir, f"gallery_maps.{args.map_dtype}")
  q_maps, g_maps, qm, gm = make_set(
    args.queries,
    args.gallery,
    ids,
    args.cameras,
    args.seed,
    gallery_file,
    MAP_DTYPES[args.map_dtype],
  )
  generate_s = time.perf_counter() - t

  cfg = eval_config(args.shortlist, args)
  t = time.perf_counter()
  out = evaluate_maps(match, q_maps, g_maps, qm, gm, cfg, lists_fn=lists)
  wall_s = time.perf_counter() - t
  rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

  # Recall of exact QAConv's top-10: a random subset of queries against the whole gallery.
  rng = np.random.default_rng(args.seed + 2)
  sub = np.sort(rng.choice(args.queries, min(args.recall_queries, args.queries), replace=False))
  t = time.perf_counter()
  exact = pairwise_distance(
    match, q_maps[sub], g_maps, budget_bytes=args.budget * 2**30, label="exact (recall)"
  )
  recall_s = time.perf_counter() - t
  top10 = top_k_lists(exact, 10)
  short = out["dist"]["QAConv"].index[sub]
  recall = float(np.mean([np.isin(top10[i], short[i]).mean() for i in range(len(sub))]))
  rate = exact.size / recall_s  # exact pairs per second, measured in this process
  exact_pairs = args.queries * args.gallery
  if args.rerank:
    exact_pairs += args.queries**2 + args.gallery**2
  projected = exact_pairs / rate
  # The same queries' global top-10 for reference: how much QAConv changes the order.
  sub_desc = nearest(
    np.asarray(out["dist"]["QAConv"].query_desc[sub]), out["dist"]["QAConv"].gallery_desc, 10
  )[0]
  agree = float(np.mean([np.isin(top10[i], sub_desc[i]).mean() for i in range(len(sub))]))

  seconds = {"generate maps": generate_s, **out["stats"]["seconds"], "exact recall check": recall_s}
  rows = [[k, f"{v:.1f}"] for k, v in seconds.items()]
  print(
    f"\nQ={args.queries} G={args.gallery} K={args.shortlist} cameras={args.cameras} ids={ids} "
    f"neighbours={args.neighbour_shortlist or args.shortlist} rerank={args.rerank} "
    f"maps={args.map_dtype}; {machine()}; devices {sharding.make_mesh().shape['data']}"
  )
  print(table(["stage", "seconds"], rows))
  res = out["results"]
  print(
    table(
      ["method", "rank1", "mAP"],
      [[m, f"{r['rank1']:.2f}", f"{r['mAP']:.2f}"] for m, r in res.items()],
    )
  )
  print(
    f"evaluation {wall_s:.1f} s, peak RSS {rss_gb:.2f} GB, QAConv pairs "
    f"{out['stats']['qaconv_pairs']:,} ({out['stats'].get('scored_on_demand', 0):,} on demand)"
  )
  print(
    f"recall of exact top-10 in the K={args.shortlist} shortlist: {recall:.4f} "
    f"({len(sub)} queries; global top-10 alone holds {agree:.4f}); exact rate "
    f"{rate:,.0f} pairs/s -> exact mode projected {projected / 3600:.2f} h"
  )
  line = {
    "queries": args.queries,
    "gallery": args.gallery,
    "shortlist": args.shortlist,
    "rerank": args.rerank,
    "neighbour_shortlist": args.neighbour_shortlist or args.shortlist,
    "map_dtype": args.map_dtype,
    "noise": args.noise,
    "wall_s": round(wall_s, 1),
    "peak_rss_gb": round(rss_gb, 2),
    "qaconv_pairs": out["stats"]["qaconv_pairs"],
    "recall_at_k": recall,
    "recall_queries": len(sub),
    "projected_exact_s": round(projected, 1),
    "exact_pairs_per_s": round(rate, 1),
    "results": {m: {"rank1": r["rank1"], "mAP": r["mAP"]} for m, r in res.items()},
    "seconds": {k: round(v, 1) for k, v in seconds.items()},
    "machine": machine(),
    **extra,
  }
  print(json.dumps(line))


if __name__ == "__main__":
  main()
