"""The demo's table over seeds: GAP-cosine baseline, QAConv (class memory), QAConv 2.1.

  python bench/bench_synthetic.py [--seeds 0,1,2] [--models gap,qaconv,gs] [--data DIR]
                                  [--workdir /tmp/bench_synthetic]

Trains the demo's three models (configs/default.py: ResNet-18 width 16 at 64x32 on synthetic
domain a; "gap" = head "gap", "qaconv" = the config's QAConv, "gs" = ``get_config("gs")``,
graph sampler + triplet loss) once per training seed and tests them on synthetic domain b,
like ``make demo``. The synthetic trees are written once (seed 0, as
pipeline.materialize_synthetic does) under ``--data`` and shared by every run, so the seed
only varies the model init and the data order; pointing ``--data`` at trees written by
another version of the generator compares designs. Prints plain rank-1 / mAP (no RR/TLift)
per run, then per model the mean ± standard deviation over seeds and the minutes per run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine, table  # noqa: E402
from configs.default import get_config  # noqa: E402
from qaconv_jax.data.pipeline import materialize_synthetic  # noqa: E402
from qaconv_jax.training import train_and_evaluate  # noqa: E402


def _mean_sd(x: np.ndarray) -> str:
  return f"{x.mean():.1f} ± {x.std(ddof=1) if len(x) > 1 else 0.0:.1f}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--models", default="gap,qaconv,gs", help="'gap' is the baseline")
  ap.add_argument("--data", default="", help="synthetic trees (default: <workdir>/data)")
  ap.add_argument("--workdir", default="/tmp/bench_synthetic")
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  models = args.models.split(",")
  data = args.data or os.path.join(args.workdir, "data")
  configs = {"gap": get_config(), "qaconv": get_config(), "gs": get_config("gs")}
  configs["gap"].model.head = "gap"
  for cfg in configs.values():
    # Written once, not per run: every run then sees the very same images.
    cfg.data = materialize_synthetic(cfg.data, data)
    for name in cfg.eval.testsets.split(","):
      cfg.eval.sources[name] = materialize_synthetic(cfg.eval.sources[name], data)

  runs = {}
  for model in models:
    for seed in seeds:
      cfg = configs[model].copy_and_resolve_references()
      cfg.seed = seed
      start = time.perf_counter()
      out = train_and_evaluate(cfg, os.path.join(args.workdir, f"{model}_{seed}"))
      plain = out["eval"]["testsets"]["synthetic_b"]["QAConv"]
      runs[model, seed] = (plain["rank1"], plain["mAP"], time.perf_counter() - start, out["step"])
      print(f"{model} seed {seed}: rank-1 {plain['rank1']:.1f} mAP {plain['mAP']:.1f}")

  print(f"\n{machine()}\ndemo config, plain (no RR/TLift), synthetic a -> b, data {data}")
  names = {"gap": "GAP cosine", "qaconv": "QAConv (class memory)", "gs": "QAConv-GS (2.1)"}
  rows = []
  base = np.array([runs["gap", s][:2] for s in seeds]) if "gap" in models else None
  for model in models:
    r1, mp, sec, steps = (np.array([runs[model, s][i] for s in seeds]) for i in range(4))
    delta = (
      "" if base is None else f"{(r1 - base[:, 0]).mean():+.1f} / {(mp - base[:, 1]).mean():+.1f}"
    )
    rows.append(
      [
        names[model],
        _mean_sd(r1),
        _mean_sd(mp),
        delta,
        " ".join(f"{x:.1f}" for x in r1),
        " ".join(f"{x:.1f}" for x in mp),
        f"{steps.mean():.0f}",
        f"{sec.mean() / 60:.1f}",
      ]
    )
  header = ["model", "rank-1 mean ± sd", "mAP mean ± sd", "vs GAP (paired)", "rank-1 per seed"]
  print(table([*header, "mAP per seed", "steps", "min/run"], rows))


if __name__ == "__main__":
  main()
