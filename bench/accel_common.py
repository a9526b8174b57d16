"""What bench_accel.py's driver and both sides of its comparison share: the matched map shape,
the devices' dense peak rates, the timing rule and each section's sizes. Neither JAX nor torch is
imported here."""

from __future__ import annotations

import time

import numpy as np

H, W, D = 24, 8, 128
HW = H * W
FLOP_PER_PAIR = 2 * HW * HW * D

# Dense (no 2:4 sparsity) peak TFLOP/s at boost clock, from NVIDIA's datasheets: "NVIDIA H100
# Tensor Core GPU" (SXM5 / PCIe / NVL columns, and the Hopper whitepaper's 494.7 / 989.4 for
# SXM5), "NVIDIA H200 Tensor Core GPU" (SXM / NVL) and "NVIDIA A100 Tensor Core GPU" (SXM4 and
# PCIe alike). The datasheets print the tensor-core figures with sparsity: these are half of
# them. float32 is the CUDA cores' FP32 rate, the one a HIGHEST-precision float32 dot runs at;
# tf32 and bfloat16 are the tensor cores'. Matched in order against JAX's device_kind (e.g.
# "NVIDIA H100 80GB HBM3" is the SXM5 part, "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA
# A100-SXM4-80GB"); the measured square-matmul row beside them is the reachable ceiling.
PEAK_TFLOPS = (
  (("h200", "nvl"), "H200 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.5}),
  (("h200",), "H200 SXM", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}),
  (("h100", "nvl"), "H100 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.5}),
  (("h100", "pcie"), "H100 PCIe", {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0}),
  (("h100",), "H100 SXM5", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}),
  (("a100",), "A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0}),
)


def peak_tflops(device_kind: str, dtype: str) -> tuple[float | None, str]:
  """``(dense peak TFLOP/s or None, part name)`` of a device kind (None: unknown, or CPU)."""
  kind = device_kind.lower()
  for keys, name, peaks in PEAK_TFLOPS:
    if all(k in kind for k in keys):
      return peaks.get(dtype), name
  return None, "n/a"


def median_time(fn, reps: int, warmup: int = 2) -> float:
  """Median wall time of ``reps`` calls after ``warmup``; ``fn`` must block on its results."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def train_sizes(args):
  """``((H, W), classes, batches, (depth, width))`` of the train section."""
  if args.small:
    return (64, 32), 7, (8,), (18, 16)
  return (384, 128), 751, tuple(int(b) for b in args.train_batches.split(",")), (50, 64)


def eval_sizes(section: str, small: bool) -> tuple[int, int, bool]:
  """``(queries, gallery, full pipeline?)``."""
  if section == "eval_market":
    return (64, 256, True) if small else (3368, 15913, True)
  return (96, 384, False) if small else (11659, 82161, False)
