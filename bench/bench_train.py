"""Training throughput: the full jitted class-memory step of the paper's setup.

ResNet-50 at 384x128, batch 32, a 751-class memory (Market-1501), v1 head, SGD; random
images. Reports seconds per step and images per second on whatever machine runs it (all
local devices on a ("data",) mesh), plus the compile time.

  python bench/bench_train.py [--batch 32] [--steps 3] [--depth 50] [--classes 751]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from common import machine, table

from configs.market_r50 import get_config
from qaconv_jax import sharding
from qaconv_jax.models.model import build_model
from qaconv_jax.optim import make_optimizer
from qaconv_jax.train_state import create_train_state
from qaconv_jax.train_step import mesh_train_step


def step_time(
  batch: int = 32, classes: int = 751, depth: int = 50, dtype: str = "float32", steps: int = 3
) -> tuple[float, float, float]:
  """``(best seconds per step, first call seconds, last loss)`` of the jitted train step of
  the market_r50 config (ResNet-``depth``, 384x128) on all local devices."""
  cfg = get_config()
  cfg.model.update(depth=depth, dtype=dtype)
  model = build_model(cfg.model)
  mesh = sharding.make_mesh()
  state = create_train_state(
    model,
    make_optimizer(cfg.optim, 100),
    jax.random.key(0),
    tuple(cfg.data.image_size),
    classes,
    cfg.loss,
  )
  on_mesh = mesh_train_step(state, cfg.model, cfg.loss, mesh, classes)  # as training.py
  state = on_mesh.place(state)
  rng = np.random.default_rng(0)
  data = sharding.global_batch(
    {
      "image": rng.uniform(size=(batch, *cfg.data.image_size, 3)).astype(np.float32),
      "label": rng.integers(0, classes, batch).astype(np.int32),
    },
    mesh,
  )
  step = on_mesh.step
  times = []
  for _ in range(steps + 1):  # the first call compiles
    t = time.perf_counter()
    state, m = step(state, data, jax.random.key(1))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return min(times[1:]), times[0], float(m["loss"])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--depth", type=int, default=50)
  ap.add_argument("--classes", type=int, default=751)
  ap.add_argument("--dtype", default="float32")
  args = ap.parse_args()
  print(f"machine: {machine()}\n")
  best, first, loss = step_time(args.batch, args.classes, args.depth, args.dtype, args.steps)
  print(
    table(
      ["setup", "s/step (best)", "img/s", "first call (compile+run) s"],
      [
        [
          f"ResNet-{args.depth} QAConv step, 384x128, batch {args.batch}, "
          f"C={args.classes}, {args.dtype}",
          f"{best:.2f}",
          f"{args.batch / best:.2f}",
          f"{first:.1f}",
        ]
      ],
    )
  )
  print(f"loss {loss:.4f} (finite: {bool(np.isfinite(loss))})")


if __name__ == "__main__":
  main()
