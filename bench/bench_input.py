"""Training input pipeline throughput vs the backbone's training throughput.

Writes a synthetic Market-format tree, then times the grain pipeline (decode, bicubic
resize to 384x128, the chosen augmentations, batching) with its reader threads, next to
the jitted class-memory train step of the default config (ResNet-50, 751-class memory) run
in the same process. The pipeline must not be the bottleneck.

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

import jax
import jax.numpy as jnp
import numpy as np

from common import best_time, machine, table
from configs.default import get_config
from qaconv_jax.data.datasets import load_dataset
from qaconv_jax.data.pipeline import FolderSource, iterate, train_dataset
from qaconv_jax.data.synthetic import write_market_tree
from qaconv_jax.models.model import build_model
from qaconv_jax.optim import make_optimizer
from qaconv_jax.train_state import create_train_state
from qaconv_jax.train_step import make_train_step


def pipeline_rate(source, cfg, batches: int, threads: int) -> float:
  it = iterate(train_dataset(source, cfg, seed=0, num_epochs=100), num_threads=threads)
  next(it)  # start the reader threads
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * cfg.batch_size / (time.perf_counter() - t)


def train_rate(cfg, batch: int) -> float:
  model = build_model(cfg.model)
  state = create_train_state(model, make_optimizer(cfg.optim, 100), jax.random.key(0),
                             tuple(cfg.data.image_size), 751, cfg.loss)
  step = make_train_step(cfg.loss)
  rng = np.random.default_rng(0)
  b = {"image": jnp.asarray(rng.uniform(size=(batch, *cfg.data.image_size, 3)), jnp.float32),
       "label": jnp.asarray(rng.integers(0, 751, batch), jnp.int32)}
  holder = {"state": state}

  def run():
    holder["state"], m = step(holder["state"], b, jax.random.key(1))
    jax.block_until_ready(m)
  return batch / best_time(run, reps=2, warmup=1)


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
      tr = train_rate(cfg, args.train_batch)
      rows.append([f"ResNet-50 QAConv train step, batch {args.train_batch}, C=751", f"{tr:.2f}"])
      rows = [r + [f"{float(r[1]) / tr:.0f}x"] for r in rows]
      header = ["stage (384x128)", "images/s", "vs train step"]
    else:
      header = ["stage (384x128)", "images/s"]
    print(table(header, rows))


if __name__ == "__main__":
  main()
