"""QAConv 2.1 (graph sampling): the graph step's cost per epoch, and the GS train step against
the class-memory train step.

1. The graph step at Market size (751 classes) and MSMT17-all size (4,101): (a) embedding one
   random image per class through the model in inference mode with the eval numerics
   (``extract_maps`` on an in-memory source, compiled beforehand), (b) the C x C QAConv
   distance of random unit feature maps (``pairwise_distance`` under the config's eval memory
   budget; its first call, which compiles, apart from a steady-state one), (c) the epoch's
   batches (``graph_batches``). One GS epoch is C steps of the measured GS step.
2. The GS step (the batch's [b, b] scores against itself, triplet loss) against the
   class-memory step (the batch against a 751-row memory, focal loss), same model, image size
   and batch: best of ``--steps`` calls after the compiling one. Each step keeps its recipe's
   BN mode and optimiser (GS: backbone and neck BN frozen, gradient clipping; class memory:
   BN trained, configs/default.py's or configs/market_r50.py's SGD).

``--size demo`` (default, ~1.5 minutes on 2 CPU cores): configs/default.py's ResNet-18 width
16 at 64x32, batch 32 (K=2), float32. ``--size paper``: configs/gs_market.py (ResNet-50 IBN-b,
384x128, batch 64, K=2, numerics "auto"), for an accelerator.

  python bench/bench_gs.py [--size demo|paper] [--classes 751,4101] [--steps 5] [--graph-reps 2]
                           [--dtype D]
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
from common import best_time, machine, table

from configs import default, gs_market, market_r50
from qaconv_jax import sharding
from qaconv_jax.data.graph_sampler import class_image_lists, graph_batches
from qaconv_jax.evaluation.eval_lib import jit_model_fns, model_fns
from qaconv_jax.evaluation.scoring import extract_maps, pairwise_distance
from qaconv_jax.models.model import build_model
from qaconv_jax.numerics import resolve
from qaconv_jax.optim import make_optimizer
from qaconv_jax.train_state import create_train_state
from qaconv_jax.train_step import mesh_train_step

MEMORY_CLASSES = 751  # the class-memory step's rows (Market-1501)


def configs(size: str, dtype: str | None):
  """``(gs, class_memory)`` configs sharing the model, image size and batch."""
  gs = gs_market.get_config()
  if size == "demo":
    cm = default.get_config()
    gs.model = cm.model.copy_and_resolve_references()
    gs.data.update(image_size=cm.data.image_size, batch_size=32, pk_k=2)
    gs.eval.update(batch_size=cm.eval.batch_size, memory_budget_gb=cm.eval.memory_budget_gb)
  else:
    cm = market_r50.get_config()
    cm.model = gs.model.copy_and_resolve_references()
  gs.model.dtype = dtype or ("float32" if size == "demo" else "auto")
  cm.model.dtype = gs.model.dtype
  cm.data.update(image_size=gs.data.image_size, batch_size=gs.data.batch_size, pk_k=gs.data.pk_k)
  return gs, cm


def time_step(cfg, num_classes: int, reps: int, mesh):
  """``(best s/step, first call s, last loss, final state)`` of the config's jitted train
  step on random images, P x K labels (P = batch / K distinct classes)."""
  size, b, k = tuple(cfg.data.image_size), cfg.data.batch_size, cfg.data.pk_k
  tx = make_optimizer(cfg.optim, num_classes, cfg.num_epochs)
  state = create_train_state(
    build_model(cfg.model), tx, jax.random.key(0), size, num_classes, cfg.loss
  )
  on_mesh = mesh_train_step(state, cfg.model, cfg.loss, mesh, num_classes, freeze_bn=cfg.freeze_bn)
  state = on_mesh.place(state)
  rng = np.random.default_rng(0)
  labels = np.repeat(rng.choice(num_classes, b // k, replace=False), k).astype(np.int32)
  images = rng.uniform(size=(b, *size, 3)).astype(np.float32)
  data = sharding.global_batch({"image": images, "label": labels}, mesh)
  times = []
  for _ in range(reps + 1):  # the first call compiles
    t = time.perf_counter()
    state, metrics = on_mesh.step(state, data, jax.random.key(1))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return min(times[1:]), times[0], float(metrics["loss"]), state


class RandomImages:
  """``n`` uint8 images drawn from a small pool, as a source ``extract_maps`` reads."""

  def __init__(self, n: int, image_size, pool: int = 32):
    rng = np.random.default_rng(1)
    self.n, self.pool = n, rng.integers(0, 256, (pool, *image_size, 3), np.uint8)

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    return {"image": self.pool[i % len(self.pool)], "where": f"random {i}"}


def unit_maps(n: int, shape, seed: int) -> np.ndarray:
  """``[n, h, w, d]`` float32 maps of unit length at every location."""
  x = np.random.default_rng(seed).standard_normal((n, *shape), np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def graph_step(cfg, state, num_classes: int, mesh, reps: int) -> dict:
  """Seconds of each part of one graph step over ``num_classes`` classes (embedding and
  distance: best of ``reps`` calls after compiling)."""
  size, ev = tuple(cfg.data.image_size), cfg.eval
  eval_model = build_model(cfg.model, numerics=ev.dtype)
  variables = sharding.replicate({"params": state.params, "batch_stats": state.batch_stats}, mesh)
  embed, match = model_fns(eval_model, variables, jit_model_fns(eval_model))
  t = time.perf_counter()
  warm = extract_maps(embed, RandomImages(1, size), size, ev.batch_size, "compile", mesh)
  out = {"embed_compile": time.perf_counter() - t}
  source = RandomImages(num_classes, size)
  out["embed"] = best_time(
    lambda: extract_maps(embed, source, size, ev.batch_size, f"C={num_classes} features", mesh),
    reps,
    warmup=0,
  )
  maps = unit_maps(num_classes, warm.shape[1:], seed=num_classes)
  budget = ev.memory_budget_gb * 2**30
  distance = lambda: pairwise_distance(
    match, maps, maps, budget, label=f"C={num_classes} scores", return_logits=True, mesh=mesh
  )
  t = time.perf_counter()
  _, logits = distance()  # compiles for this C
  out["distance_first"] = time.perf_counter() - t
  out["distance"] = best_time(distance, reps, warmup=0)
  # Market-like class sizes (4..40 images each; Market-1501 averages ~17, MSMT17-all ~31).
  pids = np.repeat(np.arange(num_classes), np.random.default_rng(2).integers(4, 41, num_classes))
  images = class_image_lists(pids)
  k = cfg.data.pk_k
  t = time.perf_counter()
  graph_batches(-logits, images, cfg.data.batch_size // k, k, (0, 0, 4))
  out["batches"] = time.perf_counter() - t
  out["graph"] = out["embed"] + out["distance"] + out["batches"]
  out["map_shape"] = warm.shape[1:]
  return out


def model_name(m) -> str:
  ibn = f" IBN-{m.ibn}" if m.ibn else ""
  return f"ResNet-{m.depth}{ibn} width {m.width}, neck {m.neck_dim} {m.neck_version}, head {m.head}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", choices=("demo", "paper"), default="demo")
  ap.add_argument("--classes", default="751,4101", help="class counts of the graph step")
  ap.add_argument("--steps", type=int, default=5, help="timed train steps (after 1 compiling)")
  ap.add_argument(
    "--dtype", default=None, help="training numerics (default: demo float32, paper auto)"
  )
  ap.add_argument("--graph-reps", type=int, default=2, help="timed embed/distance calls")
  args = ap.parse_args()
  start = time.perf_counter()
  gs, cm = configs(args.size, args.dtype)
  mesh = sharding.make_mesh()
  b, k, (h, w) = gs.data.batch_size, gs.data.pk_k, gs.data.image_size
  train_numerics = resolve(gs.model.dtype).name
  print(f"machine: {machine()}")
  print(
    f"setup ({args.size}): {model_name(gs.model)}, {h}x{w}, batch {b} (P={b // k} x K={k}); "
    f"training numerics {gs.model.dtype} -> {train_numerics}, graph step (eval) numerics "
    f"{gs.eval.dtype}, eval batch {gs.eval.batch_size}, memory budget "
    f"{gs.eval.memory_budget_gb} GB\n"
  )

  gs_s, gs_first, gs_loss, state = time_step(gs, MEMORY_CLASSES, args.steps, mesh)
  cm_s, cm_first, cm_loss, _ = time_step(cm, MEMORY_CLASSES, args.steps, mesh)
  bn = "BN frozen" if gs.freeze_bn else "BN trained"
  rows = [
    [f"GS: [{b}, {b}] self-scores, triplet, {bn}", gs_s, gs_first, gs_loss],
    [f"class memory: [{b}, {MEMORY_CLASSES}], focal", cm_s, cm_first, cm_loss],
  ]
  print(f"Train step, {train_numerics}, best of {args.steps} after the compiling call:")
  print(
    table(
      ["step", "ms/step", "img/s", "first call s", "loss", "ratio vs class memory"],
      [
        [n, f"{s * 1e3:.1f}", f"{b / s:.1f}", f"{f:.1f}", f"{lo:.3f}", f"{s / cm_s:.2f}"]
        for n, s, f, lo in rows
      ],
    )
  )

  graph_rows = []
  for num_classes in (int(c) for c in args.classes.split(",")):
    g = graph_step(gs, state, num_classes, mesh, args.graph_reps)
    epoch = num_classes * gs_s
    graph_rows.append(
      [
        num_classes,
        f"{g['embed']:.2f}",
        f"{g['distance_first']:.2f}",
        f"{g['distance']:.2f}",
        f"{g['batches']:.3f}",
        f"{g['graph']:.2f}",
        f"{epoch:.1f}",
        f"{g['graph'] / epoch:.3f}",
      ]
    )
  hh, ww, d = g["map_shape"]
  print(
    f"\nGraph step per epoch ({gs.eval.dtype}, maps {hh}x{ww}x{d}; embed compiled beforehand, "
    f"{g['embed_compile']:.1f}s) against one GS epoch = C steps x {gs_s * 1e3:.1f} ms:"
  )
  print(
    table(
      [
        "classes C",
        "embed C imgs s",
        "C x C dist, 1st call s",
        "C x C dist s",
        "batches s",
        "graph s",
        "epoch s",
        "graph / epoch",
      ],
      graph_rows,
    )
  )
  print(f"graph s = embed + distance (best of {args.graph_reps}, compiled) + batches")
  print(f"\nbench took {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
  main()
