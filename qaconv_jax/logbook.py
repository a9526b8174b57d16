"""Training logs: a progress line, JSON lines and TensorBoard event files (no TensorFlow)."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


def parameter_overview(params) -> str:
  """Parameter counts per top-level module and in total."""
  lines, total = [], 0
  for name, sub in params.items():
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sub))
    total += n
    lines.append(f"  {name:<10} {n:>12,}")
  return "parameters:\n" + "\n".join(lines) + f"\n  {'total':<10} {total:>12,}"


def _duration(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Logbook:
  """Writes ``<workdir>/metrics.jsonl`` and TensorBoard events (process 0 only)."""

  def __init__(self, workdir: str, total_steps: int, steps_per_epoch: int, batch_size: int):
    self.total, self.per_epoch, self.batch = total_steps, steps_per_epoch, batch_size
    self.main = jax.process_index() == 0
    self.last_time, self.last_step = time.perf_counter(), None
    self.start_time = self.last_time
    self.writer = None
    if self.main:
      from tensorboardX import SummaryWriter

      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def log(self, step: int, scalars: dict, kind: str = "train") -> None:
    now = time.perf_counter()
    extra = {}
    if kind == "train" and self.last_step is not None and step > self.last_step:
      extra["img_per_s"] = (step - self.last_step) * self.batch / (now - self.last_time)
      extra["eta_s"] = (self.total - step) * (now - self.last_time) / (step - self.last_step)
    if kind == "train":
      self.last_time, self.last_step = now, step
    values = {k: float(v) for k, v in {**scalars, **extra}.items()}
    if not self.main:
      return
    self.jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
    self.jsonl.flush()
    for k, v in values.items():
      self.writer.add_scalar(f"{kind}/{k}", v, step)
    self.writer.flush()
    if kind == "train":
      epoch = step / max(1, self.per_epoch)
      speed = (
        f"  {values['img_per_s']:7.1f} img/s  ETA {_duration(values['eta_s'])}"
        if "img_per_s" in values
        else ""
      )
      print(
        f"step {step:6d}/{self.total}  epoch {epoch:6.2f}  loss {values['loss']:.4f}  "
        f"acc {values['accuracy']:.3f}  lr {values['lr']:.2e}{speed}",
        flush=True,
      )

  def restart_clock(self, step: int | None = None) -> None:
    """Leave time spent outside training (evaluation, the graph step) out of the next img/s
    and ETA; ``step``: the steps done so far, when the last log was at an earlier one."""
    self.last_time = time.perf_counter()
    if step is not None and self.last_step is not None:
      self.last_step = step

  def close(self) -> None:
    if self.main:
      self.jsonl.close()
      self.writer.close()
