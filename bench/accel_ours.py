"""Our sections of bench_accel.py, each run in a process of its own by the driver: the matcher
(``match_maxima`` beside a square matmul), the class-memory train step and the full evaluation
pipeline, with the JAX helpers they share (peak memory, XLA compile time, random unit maps)."""

from __future__ import annotations

import contextlib
import functools
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from accel_common import (
  FLOP_PER_PAIR,
  HW,
  D,
  H,
  W,
  eval_sizes,
  median_time,
  peak_tflops,
  train_sizes,
)
from common import machine


def device_peak_gb() -> float | None:
  """Peak bytes in use on the first local device so far (this process), or None (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**30


def host_peak_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class CompileClock:
  """Seconds of XLA backend compilation while it is installed (from JAX's monitoring events);
  tracing and lowering are left out, being nested and small."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **_) -> None:
    if event == self.EVENT:
      self.seconds += duration


def unit_maps_host(n: int, seed: int, shape=(H, W, D), chunk: int = 2048) -> np.ndarray:
  """``[n, *shape]`` float32 random maps of unit length at every location, drawn on the
  device in chunks (MSMT17's gallery is 8 GB: NumPy alone would take a minute)."""

  @functools.partial(jax.jit, static_argnums=1)
  def draw(key, m):
    x = jax.random.normal(key, (m, *shape), jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  out = np.empty((n, *shape), np.float32)
  key = jax.random.key(seed)
  for lo in range(0, n, chunk):
    m = min(chunk, n - lo)
    out[lo : lo + m] = np.asarray(draw(jax.random.fold_in(key, lo), m))
  return out


# ------------------------------------------------------------------------------ matcher
def matcher_section(args) -> dict:
  from qaconv_jax.models.matching import match_maxima, resolve_options
  from qaconv_jax.numerics import resolve

  p, g = (16, 32) if args.small else (args.probes, args.gallery)
  n_mm = 1024 if args.small else 8192
  probe_h, gallery_h = unit_maps_host(p, 0), unit_maps_host(g, 1)
  # A float64 reference on a corner of the pair grid: every row is checked against it.
  cp, cg = min(4, p), min(16, g)
  s = np.einsum(
    "psd,grd->pgsr",
    probe_h[:cp].reshape(cp, HW, D).astype(np.float64),
    gallery_h[:cg].reshape(cg, HW, D).astype(np.float64),
  )
  ref = np.concatenate([s.max(axis=2), s.max(axis=3)], axis=-1)
  kind = jax.devices()[0].device_kind
  rows, clock = [], CompileClock()
  rng = np.random.default_rng(2)
  for dtype_name in args.match_dtypes.split(","):
    pol = resolve(dtype_name)
    peak, _ = peak_tflops(kind, dtype_name)
    a = jnp.asarray(rng.normal(size=(n_mm, n_mm)), pol.dtype)
    b = jnp.asarray(rng.normal(size=(n_mm, n_mm)), pol.dtype)
    mm = jax.jit(
      lambda x, y, prec=pol.precision: jnp.dot(
        x, y, precision=prec, preferred_element_type=jnp.float32
      )
    )
    t = median_time(lambda mm=mm, a=a, b=b: mm(a, b).block_until_ready(), args.reps)
    mm_tflops = 2 * n_mm**3 / t / 1e12
    rows.append(
      {
        "case": f"square matmul {n_mm}",
        "dtype": dtype_name,
        "tflops": mm_tflops,
        "peak_frac": None if peak is None else mm_tflops / peak,
      }
    )
    probe = jnp.asarray(probe_h, pol.dtype)
    gallery = jnp.asarray(gallery_h, pol.dtype)
    tiles = {"xla": args.xla_tiles, "pallas": args.pallas_tiles}
    for impl in ("xla", "pallas"):
      for tile in tiles[impl].split(","):
        block = "auto" if tile == "auto" else tuple(int(v) for v in tile.split("x"))
        resolved = resolve_options(block, impl).block
        fn = jax.jit(
          functools.partial(match_maxima, block=block, impl=impl, precision=pol.precision)
        )
        t0, before = time.perf_counter(), clock.seconds
        out = fn(probe, gallery).block_until_ready()
        first = time.perf_counter() - t0
        corner = np.asarray(out[:cp, :cg], np.float64)
        err = float(np.linalg.norm(corner - ref) / np.linalg.norm(ref))
        del out
        t = median_time(lambda fn=fn, a=probe, b=gallery: fn(a, b).block_until_ready(), args.reps)
        pps = p * g / t
        tflops = pps * FLOP_PER_PAIR / 1e12
        rows.append(
          {
            "case": f"{impl} {tile} ({resolved[0]}x{resolved[1]})",
            "dtype": dtype_name,
            "pps": pps,
            "tflops": tflops,
            "peak_frac": None if peak is None else tflops / peak,
            "vs_mm": tflops / mm_tflops,
            "err": err,
            "first_s": first,
            "compile_s": clock.seconds - before,
          }
        )
  return {
    "machine": machine(),
    "kind": kind,
    "p": p,
    "g": g,
    "rows": rows,
    "peak_gb": device_peak_gb(),
  }


# ------------------------------------------------------------------------------ train
def train_section(args) -> dict:
  from configs.market_r50 import get_config
  from qaconv_jax import sharding
  from qaconv_jax.models.model import build_model
  from qaconv_jax.optim import make_optimizer
  from qaconv_jax.train_state import create_train_state
  from qaconv_jax.train_step import mesh_train_step

  size, classes, batches, (depth, width) = train_sizes(args)
  cfg = get_config()
  cfg.model.update(depth=depth, width=width)
  mesh = sharding.make_mesh()
  rows, clock = [], CompileClock()
  rng = np.random.default_rng(0)
  for dtype_name in args.train_dtypes.split(","):
    cfg.model.dtype = dtype_name
    model = build_model(cfg.model)
    state = create_train_state(
      model, make_optimizer(cfg.optim, 100), jax.random.key(0), size, classes, cfg.loss
    )
    # Never time on zeros: a memory of random unit maps (the matcher's maxima are then real).
    memory = unit_maps_host(classes, 3, state.class_memory.shape[1:])
    state = state.replace(class_memory=jnp.asarray(memory))
    on_mesh = mesh_train_step(state, cfg.model, cfg.loss, mesh, classes)  # as training.py
    state, step = on_mesh.place(state), on_mesh.step
    for b in batches:
      data = sharding.global_batch(
        {
          "image": rng.uniform(size=(b, *size, 3)).astype(np.float32),
          "label": rng.integers(0, classes, b).astype(np.int32),
        },
        mesh,
      )
      box = {"state": state}
      before = clock.seconds
      t0 = time.perf_counter()

      def run(box=box, data=data, step=step):
        box["state"], box["metrics"] = step(box["state"], data, jax.random.key(1))
        jax.block_until_ready((box["state"], box["metrics"]))

      run()
      first = time.perf_counter() - t0
      t = median_time(run, args.train_steps, warmup=1)
      state = box["state"]
      rows.append(
        {
          "case": f"ours ResNet-{depth} w{width}",
          "dtype": dtype_name,
          "batch": b,
          "s": t,
          "ips": b / t,
          "loss": float(box["metrics"]["loss"]),
          "first_s": first,
          "compile_s": clock.seconds - before,
          "peak_gb": device_peak_gb(),
        }
      )
  return {"machine": machine(), "rows": rows, "size": size, "classes": classes}


# ------------------------------------------------------------------------------ evaluation
def eval_section(args, section: str, dtype_name: str) -> dict:
  from configs.default import get_config
  from qaconv_jax.evaluation.metrics import evaluate_ranking
  from qaconv_jax.evaluation.rerank import k_reciprocal_rerank
  from qaconv_jax.evaluation.scoring import pairwise_distance
  from qaconv_jax.evaluation.testset import top_k_lists
  from qaconv_jax.evaluation.tlift import temporal_lift
  from qaconv_jax.models.model import QAConvModel, build_model

  p, g, full = eval_sizes(section, args.small)
  rng = np.random.default_rng(0)
  ids, cams = (751, 6) if full else (3060, 15)
  qp = rng.integers(1, ids, p)
  gp = np.where(rng.random(g) < 0.2, 0, rng.integers(1, ids, g))  # ~20% distractors
  qc, gc = rng.integers(0, cams, p), rng.integers(0, cams, g)
  qt, gt = rng.uniform(0, 7200, p), rng.uniform(0, 7200, g)
  q_maps, g_maps = unit_maps_host(p, 10), unit_maps_host(g, 11)

  cfg = get_config("tiny")
  cfg.model.match_impl = args.eval_impl
  model = build_model(cfg.model, numerics=dtype_name)
  # Only the head: init through `match`, so the variables are the QAConv head's alone.
  variables = jax.jit(lambda k, a, b: model.init(k, a, b, train=False, method=QAConvModel.match))(
    jax.random.key(0), q_maps[:1], g_maps[:1]
  )
  match = functools.partial(
    jax.jit(lambda v, a, b: model.apply(v, a, b, train=False, method=QAConvModel.match)),
    variables,
  )
  budget = args.eval_budget_gb * 2**30
  ev = cfg.eval
  stages, clock = [], CompileClock()

  @contextlib.contextmanager
  def stage(name: str, pairs: int = 0):
    before, t = clock.seconds, time.perf_counter()
    yield
    stages.append(
      {
        "stage": name,
        "s": time.perf_counter() - t,
        "compile_s": clock.seconds - before,
        "pairs": pairs,
        "peak_gb": device_peak_gb(),
        "host_gb": host_peak_gb(),
      }
    )

  def lift(score):
    lifted = temporal_lift(score, qc, qt, gc, gt, ev.tau, ev.sigma, ev.tlift_k, ev.alpha)
    return 1.0 - np.asarray(lifted)

  with stage("q-g distances", p * g):
    dist, logits = pairwise_distance(
      match, q_maps, g_maps, budget, label="query x gallery", return_logits=True
    )
  dists = {"QAConv": dist}
  if full:
    with stage("TLift (QAConv)"):
      dists["QAConv+TLift"] = lift(np.asarray(jax.nn.sigmoid(logits)))
    with stage("q-q distances", p * p):
      qq = pairwise_distance(match, q_maps, q_maps, budget, label="query x query")
    with stage("g-g distances", g * g):
      gg = pairwise_distance(match, g_maps, g_maps, budget, label="gallery x gallery")
    with stage("k-reciprocal re-ranking"):
      dists["QAConv+RR"] = k_reciprocal_rerank(dist, qq, gg, ev.k1, ev.k2, ev.lambda_value)
    del qq, gg
    with stage("TLift (RR)"):
      dists["QAConv+RR+TLift"] = lift(1.0 - dists["QAConv+RR"])
  maps_ = {}
  with stage(f"metrics x{len(dists)}"):
    for m, d in dists.items():
      maps_[m] = evaluate_ranking(d, qp, gp, qc, gc, ap_mode=ev.ap_mode)["mAP"]
  with stage(f"top-{ev.topk} lists x{len(dists)}"):
    for d in dists.values():
      top_k_lists(d, ev.topk)
  return {
    "machine": machine(),
    "p": p,
    "g": g,
    "stages": stages,
    "mAP": {k: float(v) for k, v in maps_.items()},
  }
