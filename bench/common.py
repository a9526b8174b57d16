"""Timing helpers shared by the bench scripts."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import jax


def machine() -> str:
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  dev = jax.devices()[0]
  return (
    f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on "
    f"{dev.platform} ({dev.device_kind}) x{jax.device_count()}"
  )


def best_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
  """Best wall time of ``reps`` calls (after ``warmup``) in seconds; ``fn`` must block."""
  for _ in range(warmup):
    fn()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def table(header: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  fmt = lambda r: "| " + " | ".join(str(x).rjust(w) for x, w in zip(r, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([fmt(header), sep, *map(fmt, rows)])
