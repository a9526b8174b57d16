"""The training loop: ``train_and_evaluate(config, workdir)`` (what train.py runs)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from qaconv_jax import checkpoint, sharding
from qaconv_jax.data.pipeline import (iterate, materialize_synthetic, open_source,
                                      steps_per_epoch, train_dataset)
from qaconv_jax.logbook import Logbook, parameter_overview
from qaconv_jax.models.model import build_model
from qaconv_jax.optim import current_lr, make_optimizer
from qaconv_jax.train_state import create_train_state
from qaconv_jax.train_step import check_finite, make_train_step


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from ``workdir`` if it holds checkpoints), checkpoints, evaluates.

  Returns ``{"step": last step, "eval": results of the final evaluation or {}}``.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  main_process = jax.process_index() == 0

  # ---------------------------------------------------------------- data
  # Synthetic sets are written by process 0; the other hosts wait for them.
  data_cfg = materialize_synthetic(config.data, os.path.join(workdir, "data"),
                                   write=main_process)
  source = open_source(data_cfg, "train")
  num_classes = int(len(np.unique(source.pids)))
  per_epoch = steps_per_epoch(source, data_cfg)
  total_steps = config.num_epochs * per_epoch
  dataset = train_dataset(source, data_cfg, seed=config.seed, num_epochs=config.num_epochs,
                          host=jax.process_index(), num_hosts=jax.process_count())
  batches = iterate(dataset)

  # ---------------------------------------------------------------- model, state, shardings
  model = build_model(config.model)
  tx = make_optimizer(config.optim, per_epoch)
  mesh = sharding.make_mesh()
  state = create_train_state(model, tx, jax.random.key(config.seed),
                             tuple(data_cfg.image_size), num_classes, config.loss)
  state_sh = sharding.state_shardings(state, mesh)
  state = jax.device_put(state, state_sh)
  meta = {"model": config.model.to_dict(), "num_classes": num_classes}

  # ---------------------------------------------------------------- resume or initialise
  mngr = checkpoint.manager(workdir, config.checkpoint.keep)
  start = 0
  if mngr.latest_step() is not None:
    mngr.close()  # restore through a fresh manager, then reopen for saving
    start, state, saved = checkpoint.restore_with_meta(workdir, target=state,
                                                    model_cfg=meta["model"])
    mngr = checkpoint.manager(workdir, config.checkpoint.keep)
    batches.set_state(saved["data_iterator"][jax.process_index()])
    state = jax.device_put(state, state_sh)
    print(f"resumed from {checkpoint.checkpoint_dir(workdir)} at step {start}", flush=True)
  elif config.init_from:
    state, lines = checkpoint.init_from(state, config.init_from, meta["model"],
                                        with_memory=config.init_memory)
    state = jax.device_put(state, state_sh)
    print("\n".join(lines), flush=True)
  elif main_process:
    print("no init_from: every weight starts random (published QAConv numbers start from "
          "ImageNet weights: see README, 'Pretrained weights').", flush=True)
  if main_process:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    print(parameter_overview(state.params), flush=True)
    print(f"{num_classes} classes, {per_epoch} steps/epoch, {total_steps} steps, "
          f"{jax.device_count()} device(s) on {jax.process_count()} process(es)", flush=True)

  # ---------------------------------------------------------------- the step
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  step_fn = make_train_step(config.loss, state_sh, batch_sh)
  rng = jax.random.key(config.seed + 1)
  book = Logbook(workdir, total_steps, per_epoch, data_cfg.batch_size)
  last_good = start

  can_eval = bool(config.eval.testsets) and jax.process_count() == 1
  best_dir = os.path.join(workdir, "best")
  best_map = (checkpoint.restore_with_meta(best_dir)[2].get("mAP", -1.0)
              if os.path.isdir(checkpoint.checkpoint_dir(best_dir)) else -1.0)
  results = {}

  def evaluate(step: int) -> None:
    nonlocal best_map, results
    from qaconv_jax.evaluation.evaluate import evaluate_variables
    results = evaluate_variables(config, workdir, {"params": state.params,
                                                   "batch_stats": state.batch_stats}, step)
    first = next(iter(results["testsets"].values()))["QAConv"]  # model selection: plain QAConv
    book.log(step, {"rank1": first["rank1"], "mAP": first["mAP"]}, kind="eval")
    if first["mAP"] > best_map:
      best_map = first["mAP"]
      best = checkpoint.manager(best_dir, max_to_keep=1)
      checkpoint.save(best, step, state, {**meta, "mAP": best_map})
      best.wait_until_finished()
      best.close()

  def save(step: int) -> None:
    positions = [batches.get_state()]
    if jax.process_count() > 1:  # every host's iterator position, gathered into one list
      positions = _allgather_json(positions[0])
    checkpoint.save(mngr, step, state, {**meta, "data_iterator": positions})

  # ---------------------------------------------------------------- loop
  stop = total_steps if not config.max_steps else min(total_steps, config.max_steps)
  step = start
  try:
    for step in range(start + 1, stop + 1):
      local = next(batches)
      if step - 1 == config.debug_nan_step:
        local = {**local, "image": np.full_like(local["image"], np.nan)}
      state, metrics = step_fn(state, sharding.global_batch(local, mesh), rng)
      is_ckpt = step % config.checkpoint.every == 0 or step == stop
      if step % config.log_every == 0 or is_ckpt:
        values = jax.device_get(metrics)
        try:
          check_finite(values, step)
        except FloatingPointError as e:  # never checkpoint a broken state
          raise FloatingPointError(
              f"{e} Stopped; the last good checkpoint (step {last_good}) in "
              f"{checkpoint.checkpoint_dir(workdir)} is intact.") from None
        book.log(step, {**values, "lr": current_lr(config.optim, per_epoch, step - 1,
                                                   state.opt_state)})
      if is_ckpt:
        save(step)
        last_good = step
      if can_eval and ((config.eval_every and step % config.eval_every == 0)
                       or step == total_steps):
        evaluate(step)
        book.restart_clock()
  finally:
    mngr.wait_until_finished()
    mngr.close()
    book.close()

  if step == total_steps and config.eval.testsets and not can_eval:
    print("multi-process run: evaluate with eval.py on one host.", flush=True)
  return {"step": step, "eval": results}


def _allgather_json(obj) -> list:
  """Every process's JSON-able ``obj``, in process order, on every process."""
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  size = int(multihost_utils.process_allgather(np.array([raw.size])).max())
  padded = np.zeros(size, np.uint8)
  padded[:raw.size] = raw
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(r[r != 0]).decode())  # JSON text holds no zero bytes
          for r in rows.reshape(jax.process_count(), size)]


