"""Evaluation speed and memory at Market-1501 shape: metrics, re-ranking, TLift.

Each (stage, implementation) runs in its own subprocess, so its peak RSS is its own; the
inputs (3368 queries x 15913 gallery, 751 ids + distractors, 6 cameras, times over two
hours, distances from a clustered embedding) are rebuilt identically in each. Baselines
are straightforward per-query implementations, the way the reference code does it.

  python bench/bench_eval.py [--stages metrics,rerank,tlift] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from common import machine, table


def make_inputs(p: int, g: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = 751
  qp = rng.integers(1, ids, p)
  gp = np.where(rng.random(g) < 0.2, 0, rng.integers(1, ids, g))  # ~20% distractors
  qc, gc = rng.integers(0, 6, p), rng.integers(0, 6, g)
  qt, gt = rng.uniform(0, 7200, p), rng.uniform(0, 7200, g)
  centre = rng.normal(size=(ids, 16)).astype(np.float32)
  xq = centre[qp] + 0.9 * rng.normal(size=(p, 16)).astype(np.float32)
  xg = centre[gp] + 0.9 * rng.normal(size=(g, 16)).astype(np.float32)

  def dist(a, b):  # float32, in row chunks: the inputs' peak is their own size
    out = np.empty((len(a), len(b)), np.float32)
    bb = (b * b).sum(1)[None, :]
    for lo in range(0, len(a), 1024):
      x = a[lo : lo + 1024]
      d = (x * x).sum(1)[:, None] + bb - 2 * x @ b.T
      out[lo : lo + 1024] = np.sqrt(np.maximum(d, 0)) / 8.0
    return out

  return dict(
    qp=qp, gp=gp, qc=qc, gc=gc, qt=qt, gt=gt, qg=dist(xq, xg), qq=dist(xq, xq), gg=dist(xg, xg)
  )


# --- straightforward per-query baselines --------------------------------------------------
def metrics_loop(x):
  cmc, aps = np.zeros(100), []
  for q in range(len(x["qp"])):
    order = np.argsort(x["qg"][q], kind="stable")
    keep = ~((x["gp"][order] == x["qp"][q]) & (x["gc"][order] == x["qc"][q]))
    match = x["gp"][order[keep]] == x["qp"][q]
    if match.any():
      hits = np.flatnonzero(match)
      cmc[hits[0] :] += hits[0] < 100
      aps.append(np.mean(np.arange(1, len(hits) + 1) / (hits + 1)))
  return np.mean(aps)


def rerank_dense(x, k1=20, k2=6, lam=0.3):
  p = len(x["qp"])
  d = np.block([[x["qq"], x["qg"]], [x["qg"].T, x["gg"]]]).astype(np.float32)
  d = (d / d.max(axis=0)).T
  n = len(d)
  rank = np.argsort(d, axis=1).astype(np.int32)
  v = np.zeros((n, n), np.float32)

  def krecip(i, k):
    fwd = rank[i, : k + 1]
    return fwd[np.where(rank[fwd, : k + 1] == i)[0]]

  for i in range(n):
    r = krecip(i, k1)
    exp = r
    for j in r:
      c = krecip(j, int(np.around(k1 / 2)))
      if len(np.intersect1d(c, r)) > 2 / 3 * len(c):
        exp = np.append(exp, c)
    exp = np.unique(exp)
    w = np.exp(-d[i, exp])
    v[i, exp] = w / w.sum()
  v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
  inv = [np.where(v[:, j] != 0)[0] for j in range(n)]
  out = np.zeros((p, n - p), np.float32)
  for i in range(p):
    tmp = np.zeros(n, np.float32)
    nz = np.where(v[i] != 0)[0]
    for j in nz:
      tmp[inv[j]] += np.minimum(v[i, j], v[inv[j], j])
    out[i] = (1 - tmp / (2 - tmp))[p:]
  return (1 - lam) * out + lam * d[:p, p:]


def tlift_loop(x, tau=100.0, sigma=200.0, k=10, alpha=0.2):
  s = 1.0 - x["qg"]
  out = np.zeros_like(s)
  for i in range(len(s)):
    rows = np.flatnonzero((x["qc"] == x["qc"][i]) & (np.abs(x["qt"] - x["qt"][i]) < tau))
    for cam in np.unique(x["gc"]):
      cols = np.flatnonzero(x["gc"] == cam)
      block = s[np.ix_(rows, cols)]
      thr = np.sort(block.ravel())[-k] if block.size > k else -np.inf
      piv = x["gt"][cols[np.nonzero(block >= thr)[1]]]
      w = np.exp(-((piv[:, None] - x["gt"][cols][None]) ** 2) / sigma**2).mean(0)
      out[i, cols] = (w + alpha) * s[i, cols]
  return out


def run_stage(stage: str, impl: str, small: bool) -> dict:
  p, g = (400, 1800) if small else (3368, 15913)
  x = make_inputs(p, g)
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  t = time.perf_counter()
  if stage == "metrics":
    from qaconv_jax.evaluation.metrics import evaluate_ranking

    if impl == "ours":
      evaluate_ranking(x["qg"], x["qp"], x["gp"], x["qc"], x["gc"])
    else:
      metrics_loop(x)
  elif stage == "rerank":
    from qaconv_jax.evaluation.rerank import k_reciprocal_rerank

    k_reciprocal_rerank(x["qg"], x["qq"], x["gg"]) if impl == "ours" else rerank_dense(x)
  else:
    if impl == "ours":
      from qaconv_jax.evaluation.tlift import temporal_lift

      args = (1.0 - x["qg"], x["qc"], x["qt"], x["gc"], x["gt"])
      temporal_lift(*args).block_until_ready()  # compile
      t = time.perf_counter()
      temporal_lift(*args).block_until_ready()
    else:
      tlift_loop(x)
  seconds = time.perf_counter() - t
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return {"seconds": seconds, "peak_gb": peak, "inputs_gb": base}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--stages", default="metrics,rerank,tlift")
  ap.add_argument("--small", action="store_true", help="a 400 x 1800 problem (quick check)")
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    stage, impl = args.child.split(":")
    print(json.dumps(run_stage(stage, impl, args.small)))
    return
  print(f"machine: {machine()}\n")
  rows = []
  for stage in args.stages.split(","):
    res = {}
    for impl in ("ours", "baseline"):
      cmd = [sys.executable, __file__, "--child", f"{stage}:{impl}"]
      cmd += ["--small"] if args.small else []
      out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
      res[impl] = json.loads(out.strip().splitlines()[-1])
    o, b = res["ours"], res["baseline"]
    rows.append(
      [
        stage,
        f"{o['seconds']:.2f}",
        f"{b['seconds']:.2f}",
        f"{b['seconds'] / o['seconds']:.1f}x",
        f"{o['peak_gb']:.2f}",
        f"{b['peak_gb']:.2f}",
        f"{o['inputs_gb']:.2f}",
      ]
    )
  print(
    table(
      [
        "stage",
        "ours s",
        "per-query s",
        "speed-up",
        "ours peak GB",
        "per-query peak GB",
        "inputs GB",
      ],
      rows,
    )
  )


if __name__ == "__main__":
  main()
