"""Throughput of the QAConv matcher at the paper's map size (h=24, w=8, d=128).

Prints pairs/second of ``match_maxima`` for several tile sizes next to a square float32
matmul run in the same process (the machine's compute-bound rate), and the PyTorch
formulation of the official matcher (one einsum over a block, then two max reductions)
when torch is installed. Also ResNet-50 forward images/second at 384x128.

  python bench/bench_matching.py [--reps 5] [--probes 64] [--gallery 256] [--no-resnet]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
from common import best_time, machine, table

from qaconv_jax.models.qaconv import match_maxima
from qaconv_jax.models.resnet import ResNet

H, W, D = 24, 8, 128
HW = H * W
FLOP_PER_PAIR = 2 * HW * HW * D


def unit_maps(rng, n):
  x = rng.normal(size=(n, H, W, D)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def torch_official_style(probe: np.ndarray, gallery: np.ndarray, reps: int):
  """Seconds for the official matcher's formulation in PyTorch over one block, or None."""
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count())
  # The official code is channels-first: [n, d, hw].
  p = torch.from_numpy(probe.reshape(len(probe), HW, D).transpose(0, 2, 1).copy())
  g = torch.from_numpy(gallery.reshape(len(gallery), HW, D).transpose(0, 2, 1).copy())

  def run():
    with torch.no_grad():
      s = torch.einsum("pcs,gcr->pgsr", p, g)  # [p, g, hw, hw]
      return torch.cat((s.max(dim=2)[0], s.max(dim=3)[0]), dim=-1)

  want = match_maxima(probe, gallery, block=None)
  np.testing.assert_allclose(run().numpy(), np.asarray(want), atol=1e-5)
  return best_time(run, reps), torch.__version__


def memory_loss_step(batch: int, classes: int, reps: int):
  """Seconds of forward+backward of the focal class-memory loss w.r.t. the batch maps
  (QAConv v1 head, train mode, memory [C, 24, 8, 128]); and the torch formulation's."""
  from qaconv_jax.losses import focal_memory_loss
  from qaconv_jax.models.qaconv import QAConv

  rng = np.random.default_rng(1)
  probe = jnp.asarray(unit_maps(rng, batch))
  memory = jnp.asarray(unit_maps(rng, classes))
  labels = jnp.asarray(rng.integers(0, classes, batch))
  valid = jnp.ones(classes, bool)
  head = QAConv(head="v1")
  variables = head.init(jax.random.key(0), probe[:1], memory[:1], train=False)

  def loss(params, x, memory):
    logits, _ = head.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      memory,
      train=True,
      mutable=["batch_stats"],
    )
    return jnp.mean(focal_memory_loss(logits, labels, valid))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  t_jax = best_time(lambda: jax.block_until_ready(step(variables["params"], probe, memory)), reps)
  try:
    import torch
  except ImportError:
    return t_jax, None
  p = torch.from_numpy(np.asarray(probe).reshape(batch, HW, D).transpose(0, 2, 1).copy())
  g = torch.from_numpy(np.asarray(memory).reshape(classes, HW, D).transpose(0, 2, 1).copy())
  y = torch.from_numpy(np.asarray(labels).astype(np.int64))
  bn, logit_bn = torch.nn.BatchNorm1d(1), torch.nn.BatchNorm1d(1)
  fc = torch.nn.Linear(2 * HW, 1)

  def run():
    x = p.clone().requires_grad_(True)
    s = torch.einsum("pcs,gcr->pgsr", x, g)  # [b, C, hw, hw]
    m = torch.cat((s.max(dim=2)[0], s.max(dim=3)[0]), dim=-1).view(-1, 1, 2 * HW)
    z = logit_bn(fc(bn(m).view(-1, 2 * HW)).view(-1, 1)).view(batch, classes)
    target = torch.nn.functional.one_hot(y, classes).float()
    prob = torch.sigmoid(z)
    p_hat = torch.where(target > 0, prob, 1 - prob)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(z, target, reduction="none")
    ((1 - p_hat) ** 2 * ce).sum(1).mean().backward()

  return t_jax, best_time(run, reps)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--probes", type=int, default=64)
  ap.add_argument("--gallery", type=int, default=256)
  ap.add_argument("--no-resnet", action="store_true")
  ap.add_argument("--no-loss", action="store_true")
  args = ap.parse_args()
  print(f"machine: {machine()}\n")
  rng = np.random.default_rng(0)

  a = jnp.asarray(rng.normal(size=(2048, 2048)).astype(np.float32))
  mm = jax.jit(lambda x: x @ x)
  t_mm = best_time(lambda: mm(a).block_until_ready(), args.reps)
  mm_gflops = 2 * 2048**3 / t_mm / 1e9

  probe = jnp.asarray(unit_maps(rng, args.probes))
  gallery = jnp.asarray(unit_maps(rng, args.gallery))
  rows = [["square matmul 2048 (f32)", "-", "-", f"{mm_gflops:.0f}", "1.00"]]
  baseline_pps = None
  block64 = (probe[:64], gallery[:64])
  torch_res = torch_official_style(np.asarray(block64[0]), np.asarray(block64[1]), args.reps)
  if torch_res is not None:
    t, version = torch_res
    baseline_pps = 64 * 64 / t
    rows.append(
      [
        f"PyTorch {version} einsum+max, one 64x64 block",
        "-",
        f"{baseline_pps:,.0f}",
        f"{baseline_pps * FLOP_PER_PAIR / 1e9:.0f}",
        f"{baseline_pps * FLOP_PER_PAIR / 1e9 / mm_gflops:.2f}",
      ]
    )
  cases = [("one einsum, 64x64 block", None, block64)] + [
    (f"tiles {b[0]}x{b[1]}, {args.probes}x{args.gallery}", b, (probe, gallery))
    for b in [(1, 8), (2, 16), (4, 16), (4, 32), (8, 16), (16, 16)]
  ]
  for name, block, (p, g) in cases:
    fn = jax.jit(lambda x, y, block=block: match_maxima(x, y, block=block))
    t = best_time(lambda fn=fn, p=p, g=g: fn(p, g).block_until_ready(), args.reps)
    pps = p.shape[0] * g.shape[0] / t
    tile_mb = "-" if block is None else f"{block[0] * block[1] * HW * HW * 4 / 2**20:.1f}"
    vs = f" ({pps / baseline_pps:.2f}x torch)" if baseline_pps else ""
    rows.append(
      [
        name,
        tile_mb,
        f"{pps:,.0f}{vs}",
        f"{pps * FLOP_PER_PAIR / 1e9:.0f}",
        f"{pps * FLOP_PER_PAIR / 1e9 / mm_gflops:.2f}",
      ]
    )
  print(f"match_maxima at h={H}, w={W}, d={D} ({FLOP_PER_PAIR / 1e6:.1f} MFLOP per pair)")
  print(table(["case", "tile MB", "pairs/s", "GFLOP/s", "vs matmul"], rows))
  if baseline_pps is None:
    print("(torch not installed: `pip install torch` to add the PyTorch row)")

  if not args.no_loss:
    t_jax, t_torch = memory_loss_step(32, 751, max(1, args.reps - 1))
    vs = (
      "" if t_torch is None else f"; PyTorch formulation {t_torch:.2f} s ({t_torch / t_jax:.1f}x)"
    )
    print(f"\nclass-memory focal loss forward+backward, b=32, C=751, v1 head: {t_jax:.2f} s{vs}")

  if not args.no_resnet:
    model = ResNet(depth=50)
    batch = 16
    x = jnp.asarray(rng.uniform(size=(batch, 384, 128, 3)).astype(np.float32))
    variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x[:1], train=False)
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    t = best_time(lambda: fwd(variables, x).block_until_ready(), max(1, args.reps - 1))
    print(
      f"\nResNet-50 (to layer3) forward, 384x128, batch {batch}, float32: "
      f"{batch / t:.1f} images/s ({t * 1e3 / batch:.0f} ms/image)"
    )


if __name__ == "__main__":
  main()
