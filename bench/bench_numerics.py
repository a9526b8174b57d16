"""Does a numerics policy change the demo's accuracy beyond run-to-run noise?

  python bench/bench_numerics.py [--seeds 0,1,2] [--policies float32,bfloat16]
                                 [--workdir /tmp/bench_numerics]

Trains the demo's QAConv (configs/default.py: ResNet-18 at 64x32 on synthetic domain a,
1,500 steps) once per (policy, seed), training AND evaluating under the policy, and tests
on synthetic domain b. Prints rank-1 / mAP per run, then per policy the mean and the
standard deviation over seeds (the noise), and each policy's difference from float32 in
units of that noise. On a CPU "bfloat16" is emulated: slow, but the same rounding.
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
from qaconv_jax.training import train_and_evaluate  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--policies", default="float32,bfloat16")
  ap.add_argument("--workdir", default="/tmp/bench_numerics")
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  policies = args.policies.split(",")
  runs = {}
  for policy in policies:
    for seed in seeds:
      cfg = get_config()
      cfg.seed = seed
      cfg.model.dtype = cfg.eval.dtype = policy
      workdir = os.path.join(args.workdir, f"{policy}_{seed}")
      start = time.perf_counter()
      out = train_and_evaluate(cfg, workdir)
      plain = out["eval"]["testsets"]["synthetic_b"]["QAConv"]
      runs[policy, seed] = (plain["rank1"], plain["mAP"], time.perf_counter() - start)

  print(f"\n{machine()}\ndemo config, QAConv plain (no RR/TLift), synthetic a -> b")
  print(
    table(
      ["policy", "seed", "rank-1", "mAP", "minutes"],
      [[p, s, f"{r:.1f}", f"{m:.1f}", f"{t / 60:.1f}"] for (p, s), (r, m, t) in runs.items()],
    )
  )
  rows, ref = [], None
  for policy in policies:
    r1 = np.array([runs[policy, s][0] for s in seeds])
    mp = np.array([runs[policy, s][1] for s in seeds])
    ref = ref or (r1, mp)
    noise = (
      (max(ref[0].std(ddof=1), 1e-9), max(ref[1].std(ddof=1), 1e-9)) if len(seeds) > 1 else None
    )
    shift = (
      [
        f"{(r1.mean() - ref[0].mean()) / noise[0]:+.2f}",
        f"{(mp.mean() - ref[1].mean()) / noise[1]:+.2f}",
      ]
      if noise
      else ["n/a", "n/a"]
    )
    rows.append(
      [
        policy,
        f"{r1.mean():.1f} ± {r1.std(ddof=1) if len(seeds) > 1 else 0:.1f}",
        f"{mp.mean():.1f} ± {mp.std(ddof=1) if len(seeds) > 1 else 0:.1f}",
        *shift,
      ]
    )
  print(
    table(
      ["policy", "rank-1 mean ± sd", "mAP mean ± sd", "Δrank-1 / sd(f32)", "ΔmAP / sd(f32)"], rows
    )
  )


if __name__ == "__main__":
  main()
