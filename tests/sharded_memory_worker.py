"""Subprocess side of test_sharded_memory (needs 4 simulated CPU devices from XLA_FLAGS).

  python tests/sharded_memory_worker.py OUT.json

Trains a tiny model with 7 classes for 2 steps on 1 device and on 4 (memory padded to 8
rows, split 2 per device), and inspects the compiled 4-device step for all-gathers of the
class memory. Writes the comparison and what was found to OUT.json.
"""

import json
import re
import sys

import jax
import numpy as np

from configs.default import get_config
from qaconv_jax import sharding
from qaconv_jax.data.synthetic import make_identity_set
from qaconv_jax.models.model import build_model
from qaconv_jax.optim import make_optimizer
from qaconv_jax.train_state import create_train_state, unpad_memory
from qaconv_jax.train_step import mesh_train_step

NUM_CLASSES, BATCH = 7, 12  # 7 rows do not split over 4 devices; 12 images do


def setup(num_devices: int, memory_axis):
  cfg = get_config("tiny")
  cfg.model.dtype = "float32"
  mesh = sharding.make_mesh(jax.devices()[:num_devices])
  model = build_model(cfg.model)
  tx = make_optimizer(cfg.optim, steps_per_epoch=10)
  state = create_train_state(
    model, tx, jax.random.key(0), tuple(cfg.data.image_size), NUM_CLASSES, cfg.loss
  )
  on_mesh = mesh_train_step(state, cfg.model, cfg.loss, mesh, NUM_CLASSES, memory_axis)
  return on_mesh.place(state), on_mesh.step, on_mesh.batch_sharding, cfg


def batches(cfg):
  images, labels = make_identity_set(NUM_CLASSES, 4, seed=0, size=tuple(cfg.data.image_size))
  order = np.random.default_rng(0).permutation(len(labels))
  for i in range(2):
    rows = order[i * BATCH : (i + 1) * BATCH]
    yield {"image": images[rows].astype(np.float32) / 255.0, "label": labels[rows]}


def train(num_devices: int, memory_axis):
  state, step, batch_sh, cfg = setup(num_devices, memory_axis)
  metrics = []
  for batch in batches(cfg):
    state, m = step(state, jax.device_put(batch, batch_sh), jax.random.key(1))
    metrics.append({k: float(v) for k, v in m.items()})
  return unpad_memory(state, NUM_CLASSES), metrics


def flat(state) -> np.ndarray:
  leaves = jax.tree.leaves(
    (state.params, state.batch_stats, state.opt_state, state.class_memory, state.memory_valid)
  )
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def memory_gathers(num_devices: int, memory_axis) -> list[str]:
  """All-gathers in the compiled step whose result is the whole padded memory."""
  state, step, batch_sh, cfg = setup(num_devices, memory_axis)
  batch = jax.device_put(next(batches(cfg)), batch_sh)
  hlo = step.lower(state, batch, jax.random.key(1)).compile().as_text()
  rows, *rest = state.class_memory.shape  # [8, h, w, d]
  hw, d = rest[0] * rest[1], rest[2]
  whole = {(rows, *rest), (rows, hw, d), (rows * hw, d)}
  found = []
  for line in hlo.splitlines():
    m = re.search(r"= \w+\[([\d,]*)\][^=]*? all-gather(-start)?\(", line)
    if m:
      shape = tuple(int(x) for x in m.group(1).split(",") if x)
      if shape in whole:
        found.append(line.strip()[:160])
  return found


def main(out_path):
  one, m1 = train(1, None)
  four, m4 = train(4, "data")
  a, b = flat(one), flat(four)
  rel = float(np.linalg.norm(a - b) / np.linalg.norm(a))
  result = {
    "devices": jax.device_count(),
    "relative_l2": rel,
    "metrics_1": m1,
    "metrics_4": m4,
    "memory_rows": [int(one.class_memory.shape[0]), int(four.class_memory.shape[0])],
    "gathers_split": memory_gathers(4, "data"),
    # The same step with the matcher unaware of the split: the check must see the gather.
    "gathers_naive": memory_gathers(4, None),
  }
  with open(out_path, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv[1])
