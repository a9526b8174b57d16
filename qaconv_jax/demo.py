"""The demo: train on synthetic domain a, test on synthetic domain b: QAConv trained with a
class memory, QAConv 2.1 (graph sampler + triplet loss) and the GAP baseline.

  python -m qaconv_jax.demo [--config configs/default.py] [--gs_config configs/default.py:gs]
                            [--workdir workdir/demo]

Runs ``train_and_evaluate`` three times: the paper's global-average-pooled cosine baseline
(head "gap") and QAConv (head v1), both with ``--config``'s class-memory recipe, and QAConv
2.1 with ``--gs_config`` (the same step budget). Prints rank-1 / mAP of each, plain, with
TLift, with k-reciprocal re-ranking and with both, and the minutes each run took.
"""

from __future__ import annotations

import os
import time

from absl import flags
from ml_collections import config_flags

from qaconv_jax import cli
from qaconv_jax.training import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Demo config.")
_GS_CONFIG = config_flags.DEFINE_config_file(
  "gs_config", "configs/default.py:gs", "QAConv 2.1 (graph sampling) demo config."
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "Where both runs live.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  gap = cfg.copy_and_resolve_references()
  gap.model.head = "gap"
  runs = {}
  for name, run_cfg, folder in (
    ("GAP cosine baseline", gap, "gap"),
    ("QAConv", cfg, cfg.model.head),
    ("QAConv-GS", _GS_CONFIG.value, "gs"),
  ):
    start = time.perf_counter()
    print(f"\n=== {name}: training on synthetic domain a ===", flush=True)
    out = train_and_evaluate(run_cfg, os.path.join(_WORKDIR.value, folder))
    runs[name] = (out["eval"]["testsets"], time.perf_counter() - start)

  print("\n=== cross-domain: trained on synthetic a, tested on synthetic b ===")
  print(f"{'model':<22}{'method':<18}{'rank-1':>8}{'mAP':>8}{'minutes':>9}")
  for name, (testsets, seconds) in runs.items():
    for methods in testsets.values():
      for method, r in methods.items():
        label = method.replace("QAConv", "") or "plain"
        print(
          f"{name:<22}{label.lstrip('+') or 'plain':<18}{r['rank1']:8.1f}{r['mAP']:8.1f}"
          f"{seconds / 60:9.1f}"
        )


if __name__ == "__main__":
  cli.run(main)
