"""Two-stage retrieval on a real model and test set (docs/method.md §13): for each shortlist
length K, the shortlist's recall of exact QAConv's top-10, and rank-1 / mAP (plain and
re-ranked) against exact mode, from the same extracted maps.

Defaults: the demo's QAConv model (``make demo`` trains it into workdir/demo/v1) on the
synthetic test set it is evaluated on (configs/default.py: synthetic_b).

  python bench/bench_shortlist.py [--variant ""|gs] [--workdir workdir/demo/v1]
                                  [--ks 50,100,500] [--no-rerank]

(``--variant gs`` with ``--workdir workdir/demo/gs``: the demo's QAConv-GS model.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from common import machine, table

from configs.default import get_config
from qaconv_jax import checkpoint
from qaconv_jax.config_checks import testset_names
from qaconv_jax.data.pipeline import materialize_synthetic, open_source
from qaconv_jax.evaluation.eval_lib import lists_fn, model_fns
from qaconv_jax.evaluation.scoring import extract_maps
from qaconv_jax.evaluation.testset import evaluate_maps, top_k_lists
from qaconv_jax.models.model import build_model


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="", help="configs/default.py's variant")
  parser.add_argument("--workdir", default="workdir/demo/v1")
  parser.add_argument("--ks", default="50,100,500")
  parser.add_argument("--no-rerank", action="store_true")
  args = parser.parse_args()
  config = get_config(args.variant)
  step, state = checkpoint.restore_latest(args.workdir, model_cfg=config.model.to_dict())
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  model = build_model(config.model, numerics=config.eval.dtype)
  embed, match = model_fns(model, variables)
  lists = lists_fn(model, variables)
  name = testset_names(config.eval)[0]
  src = materialize_synthetic(config.eval.sources[name], os.path.join(args.workdir, "data"))
  query, gallery = open_source(src, "query"), open_source(src, "gallery")
  size, batch = tuple(config.data.image_size), config.eval.batch_size
  q_maps = extract_maps(embed, query, size, batch, "query features")
  g_maps = extract_maps(embed, gallery, size, batch, "gallery features")

  cfg = config.eval.copy_and_resolve_references()
  cfg.update(rerank=not args.no_rerank, tlift=False)
  t = time.perf_counter()
  exact = evaluate_maps(match, q_maps, g_maps, query, gallery, cfg)
  rows = [["exact", "-", *_row(exact), exact["stats"]["qaconv_pairs"], time.perf_counter() - t]]
  top10 = top_k_lists(exact["dist"]["QAConv"], 10)
  for k in (int(x) for x in args.ks.split(",")):
    cfg.shortlist = k
    t = time.perf_counter()
    two = evaluate_maps(match, q_maps, g_maps, query, gallery, cfg, lists_fn=lists)
    seconds = time.perf_counter() - t
    short = two["dist"]["QAConv"].index
    recall = np.mean([np.isin(top10[i], short[i]).mean() for i in range(len(top10))])
    rows.append([k, f"{recall:.4f}", *_row(two), two["stats"]["qaconv_pairs"], seconds])
  print(
    f"\n{args.workdir} step {step}, test set {name}: {len(query)} queries x {len(gallery)} "
    f"gallery; {machine()}"
  )
  head = ["K", "recall of exact top-10", "rank1", "mAP", "RR rank1", "RR mAP", "QAConv pairs", "s"]
  rows = [[*r[:-1], f"{r[-1]:.1f}"] for r in rows]
  print(table(head, rows))


def _row(out: dict) -> list[str]:
  res = out["results"]
  rr = res.get("QAConv+RR", {"rank1": float("nan"), "mAP": float("nan")})
  r = res["QAConv"]
  return [f"{x:.2f}" for x in (r["rank1"], r["mAP"], rr["rank1"], rr["mAP"])]


if __name__ == "__main__":
  main()
