"""Training input pipeline throughput vs the backbone's training throughput.

Writes a synthetic Market-format tree, then times the grain pipeline (decode, bicubic
resize to 384x128, the chosen augmentations, batching) with its reader threads, next to
the jitted class-memory train step of the market_r50 config (ResNet-50, 751-class memory)
run in the same process. The pipeline must not be the bottleneck.

  python bench/bench_input.py [--augment v1.2] [--batches 20] [--train-batch 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_train import step_time
from common import machine, table

from configs.market_r50 import get_config
from qaconv_jax.data.datasets import load_dataset
from qaconv_jax.data.pipeline import FolderSource, iterate, train_dataset
from qaconv_jax.data.synthetic import write_market_tree


def pipeline_rate(source, cfg, batches: int, threads: int) -> float:
  it = iterate(train_dataset(source, cfg, seed=0, num_epochs=100), num_threads=threads)
  next(it)  # start the reader threads
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * cfg.batch_size / (time.perf_counter() - t)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--augment", default="v1.2")
  ap.add_argument("--batches", type=int, default=20)
  ap.add_argument("--train-batch", type=int, default=8)
  ap.add_argument("--no-train", action="store_true")
  args = ap.parse_args()
  print(f"machine: {machine()}\n")
  cfg = get_config()
  cfg.data.update(augment=args.augment, sampler="pk")
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    write_market_tree(tmp, "a", num_ids=300, seed=0)
    source = FolderSource(load_dataset("market1501", tmp).train)
    print(f"synthetic tree: {len(source)} train images in {time.perf_counter() - t:.1f}s\n")
    rows = []
    for threads in (1, 2, 4):
      rate = pipeline_rate(source, cfg.data, args.batches, threads)
      rows.append([f"grain pipeline, {args.augment}, {threads} thread(s)", f"{rate:.0f}"])
    if not args.no_train:
      best, _, _ = step_time(batch=args.train_batch, steps=2)
      tr = args.train_batch / best
      rows.append([f"ResNet-50 QAConv train step, batch {args.train_batch}, C=751", f"{tr:.2f}"])
      rows = [r + [f"{float(r[1]) / tr:.0f}x"] for r in rows]
      header = ["stage (384x128)", "images/s", "vs train step"]
    else:
      header = ["stage (384x128)", "images/s"]
    print(table(header, rows))


if __name__ == "__main__":
  main()
