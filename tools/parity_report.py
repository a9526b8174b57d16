"""Prints how far our converted models are from PyTorch on the parity fixtures (no torch needed).

    python tools/parity_report.py

One row per fixture output (see tests/parity.py): max |ours - torch| and that error relative
to the tensor's largest magnitude, on whatever backend JAX runs (CPU, or a GPU where one is).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import numpy as np  # noqa: E402
from common import machine  # noqa: E402  (bench/common.py)

from tests import parity  # noqa: E402


def main() -> None:
  print(f"machine: {machine()}")
  print(f"{'fixture':<24} {'output':<34} {'max abs err':>12} {'relative':>10}")
  worst = 0.0
  for case in parity.BACKBONES + parity.OFFICIAL:
    _, _, rows = parity.outputs(case)
    stats = [r for r in rows if r[0].startswith("after/")]
    for name, ours, ref in [r for r in rows if not r[0].startswith("after/")]:
      rel = parity.relative_error(ours, ref)
      worst = max(worst, rel)
      print(f"{case:<24} {name:<34} {np.abs(ours - ref).max():>12.2e} {rel:>10.2e}")
    if stats:  # running statistics after one train-mode pass: one summary row
      rel = max(parity.relative_error(o, r) for _, o, r in stats)
      worst = max(worst, rel)
      err = max(np.abs(o - r).max() for _, o, r in stats)
      print(f"{case:<24} {f'running stats ({len(stats)} tensors)':<34} {err:>12.2e} {rel:>10.2e}")
  print(f"worst relative error {worst:.2e} (the tests require <= 1e-4)")


if __name__ == "__main__":
  main()
