"""The training loop: ``train_and_evaluate(config, workdir)`` (what train.py runs)."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from qaconv_jax import checkpoint, sharding
from qaconv_jax.config_checks import check_config
from qaconv_jax.data.graph_sampler import class_image_lists
from qaconv_jax.data.pipeline import (
  graph_epoch_dataset,
  iterate,
  materialize_synthetic,
  open_source,
  steps_per_epoch,
  train_dataset,
)
from qaconv_jax.data.splits import check_class_ids, check_labels, train_and_validation
from qaconv_jax.errors import TrainingDiverged
from qaconv_jax.logbook import Logbook, parameter_overview
from qaconv_jax.models.model import build_model
from qaconv_jax.optim import final_epoch, learning_rate, make_optimizer
from qaconv_jax.train_state import create_train_state, unpad_memory
from qaconv_jax.train_step import check_finite, mesh_train_step

BEST_METRIC = "val_mAP"  # what <workdir>/best/ is selected by: plain QAConv on validation


def data_order(data_cfg, seed: int, num_images: int) -> dict:
  """The settings that decide which images the n-th global batch holds. A resumed run must
  read the same order (the host count is not among them: it only splits each batch)."""
  order = {
    "image_size": list(data_cfg.image_size),  # also the class memory's map shape
    "batch_size": data_cfg.batch_size,
    "sampler": data_cfg.sampler,
    "seed": seed,
    "val_ids": data_cfg.val_ids,
    "val_seed": data_cfg.val_seed,
    "train_images": num_images,
  }
  if data_cfg.sampler in ("pk", "graph"):
    order["pk_k"] = data_cfg.pk_k
  return order


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from ``workdir`` if it holds checkpoints), checkpoints, evaluates.

  Returns ``{"step": last step, "eval": results of the final test-set evaluation or {},
  "val": the last validation results or {}}``.
  """
  check_config(config, training=True)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  main_process = jax.process_index() == 0
  single_process = jax.process_count() == 1

  # ---------------------------------------------------------------- data
  # Synthetic sets are written by process 0; the other hosts wait for them.
  data_cfg = materialize_synthetic(config.data, os.path.join(workdir, "data"), write=main_process)
  source, val = train_and_validation(open_source(data_cfg, "train"), data_cfg)
  num_classes = check_class_ids(source.pids, f"{data_cfg.dataset} training set")
  per_epoch = steps_per_epoch(source, data_cfg)
  total_steps = config.num_epochs * per_epoch
  hosts = {"host": jax.process_index(), "num_hosts": jax.process_count()}
  # The graph sampler's epochs depend on the model: each is built when it starts.
  graph = data_cfg.sampler == "graph"
  if not graph:
    dataset = train_dataset(
      source, data_cfg, seed=config.seed, num_epochs=config.num_epochs, **hosts
    )

  # ---------------------------------------------------------------- model, state, shardings
  model = build_model(config.model)
  tx = make_optimizer(config.optim, per_epoch, config.num_epochs)
  mesh = sharding.make_mesh()
  eval_model = build_model(config.model, numerics=config.eval.dtype)  # validation
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = create_train_state(
    model, tx, jax.random.key(config.seed), tuple(data_cfg.image_size), num_classes, config.loss
  )
  if graph:  # the current epoch's batches, checkpointed with the state (exact resume)
    state = state.replace(epoch_batches=np.zeros((per_epoch, data_cfg.batch_size), np.int32))
  state = jax.device_put(state, replicated)  # the checkpoint layout: restore targets it
  # The class memory is split over the devices (padded to a multiple of their count); the
  # step's model matches against it where it lies. Checkpoints hold the unpadded state.
  on_mesh = mesh_train_step(
    state, config.model, config.loss, mesh, num_classes, freeze_bn=config.freeze_bn
  )
  saved_state = jax.jit(
    functools.partial(unpad_memory, num_classes=num_classes), out_shardings=replicated
  )

  meta = {
    "model": config.model.to_dict(),
    "num_classes": num_classes,
    "data_order": data_order(data_cfg, config.seed, len(source)),
    # What fixes the optimiser state's structure (a resumed run restores into it).
    "optim": {
      "schedule": config.optim.schedule,
      "lr_multipliers": config.optim.lr_multipliers,
      "clip_groups": list(config.optim.clip_groups) if config.optim.clip_norm else [],
    },
    "loss": config.loss.name,  # with or without a class memory
  }
  same_run = {k: meta[k] for k in ("num_classes", "data_order", "optim", "loss")}
  best_dir = os.path.join(workdir, "best")
  if config.checkpoint.keep_best:
    # A best/ left by another run would compete with this one's validations: refuse it.
    checkpoint.check_compatible(best_dir, meta["model"], same_run)

  # ---------------------------------------------------------------- resume or initialise
  mngr = checkpoint.manager(workdir, config.checkpoint.keep)
  start = 0
  if mngr.latest_step() is not None:
    mngr.close()  # restore through a fresh manager, then reopen for saving
    start, state, saved = checkpoint.restore_with_meta(
      workdir,
      target=state,
      model_cfg=meta["model"],
      same=same_run,
    )
    mngr = checkpoint.manager(workdir, config.checkpoint.keep)
    print(
      f"resumed from {checkpoint.checkpoint_dir(workdir)} at step {start} (written by "
      f"{saved.get('num_processes', '?')} process(es))",
      flush=True,
    )
  elif config.init_from:
    state, lines = checkpoint.init_from(
      state, config.init_from, meta["model"], with_memory=config.init_memory
    )
    # Host arrays: replicate them globally first (padding one process's copy would put it
    # on a local device, which a multi-process device_put cannot move).
    state = jax.device_put(state, replicated)
    print("\n".join(lines), flush=True)
  elif main_process:
    print(
      "no init_from: every weight starts random (published QAConv numbers start from "
      "ImageNet weights: see README, 'Pretrained weights')."
      + (
        " freeze_bn=True keeps the backbone's initial BN statistics (mean 0, variance 1)."
        if config.freeze_bn
        else ""
      ),
      flush=True,
    )
  state = on_mesh.place(state)
  # One global batch per step, whatever the number of hosts: the step IS the data position,
  # so a run resumes on any host count by starting the batch sequence there.
  batches = None if graph else iterate(dataset[start:])
  if main_process:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    print(parameter_overview(state.params), flush=True)
    print(
      f"{num_classes} classes, {per_epoch} steps/epoch, {total_steps} steps, "
      f"{jax.device_count()} device(s) on {jax.process_count()} process(es)",
      flush=True,
    )
    if val is not None:
      print(
        f"validation split: {len(val[0])} queries, {len(val[1])} gallery images of "
        f"held-out identities",
        flush=True,
      )

  # ---------------------------------------------------------------- the step
  step_fn = on_mesh.step
  rng = jax.random.key(config.seed + 1)
  last_good = start
  jitted = None  # the inference-mode model (eval.dtype) of validation and the graph

  def eval_fns():
    from qaconv_jax.evaluation.eval_lib import jit_model_fns, model_fns

    nonlocal jitted
    jitted = jitted or jit_model_fns(eval_model)
    return model_fns(eval_model, {"params": state.params, "batch_stats": state.batch_stats}, jitted)

  def finished(step: int) -> bool:
    """The last epoch has ended: all of them, or the adaptive schedule's final one."""
    if step == total_steps:
      return True
    if step % per_epoch or config.optim.schedule != "adaptive":
      return False
    return step // per_epoch == final_epoch(state.opt_state)

  # ---------------------------------------------------------------- graph sampler
  class_images = class_image_lists(source.pids) if graph else None

  def graph_epoch(done: int):
    """``(state, batches)`` for the epoch holding step ``done + 1``: a new epoch's batches
    from the current model, or the checkpointed ones when resuming inside an epoch."""
    from qaconv_jax.graph_step import epoch_graph

    epoch, offset = divmod(done, per_epoch)
    new_state = state
    if offset == 0:
      g = epoch_graph(
        *eval_fns(), source, class_images, data_cfg, config.eval, config.seed, epoch, mesh
      )
      epoch_batches = g.batches
      placed = jax.device_put(epoch_batches, on_mesh.state_sharding.epoch_batches)
      new_state = state.replace(epoch_batches=placed)
      book.log(
        done,
        {
          "graph_s": g.seconds,
          "features_s": g.embed_seconds,
          "distances_s": g.distance_seconds,
          "batches_s": g.batch_seconds,
        },
        kind="graph",
      )
      if main_process:
        print(
          f"epoch {epoch + 1}: graph of {num_classes} classes in {g.seconds:.1f}s (features "
          f"{g.embed_seconds:.1f}s, distances {g.distance_seconds:.1f}s, batches "
          f"{g.batch_seconds:.1f}s)",
          flush=True,
        )
      book.restart_clock(done)
    else:
      epoch_batches = sharding.to_host(state.epoch_batches)
    ds = graph_epoch_dataset(
      source,
      data_cfg,
      epoch_batches,
      seed=config.seed,
      first_step=epoch * per_epoch,
      **hosts,
    )
    return new_state, iterate(ds[offset:])

  # ---------------------------------------------------------------- evaluation
  # Every process validates and evaluates (on every device; the results are gathered, so
  # each computes the same numbers); process 0 alone prints and writes.
  validating = bool(config.eval_every)
  best = None
  if config.checkpoint.keep_best and validating:
    best = checkpoint.manager(best_dir, max_to_keep=1, best_metric=BEST_METRIC)
  results, val_results = {}, {}

  def validate(step: int) -> None:
    nonlocal val_results
    from qaconv_jax.evaluation.testset import evaluate_testset

    fns = eval_fns()
    val_cfg = config.eval.copy_and_resolve_references()
    # Selection by plain QAConv, exact (validation sets are small), maps in RAM.
    val_cfg.update(rerank=False, tlift=False, shortlist=0, gallery_memmap="")
    out = evaluate_testset(*fns, *val, val_cfg, tuple(data_cfg.image_size), mesh)
    val_results = out["results"]["QAConv"]
    book.log(step, {"rank1": val_results["rank1"], "mAP": val_results["mAP"]}, kind="val")
    if main_process:
      rank1, mAP = val_results["rank1"], val_results["mAP"]
      print(f"step {step}: validation rank-1 {rank1:.2f}  mAP {mAP:.2f}", flush=True)
    if best is not None and step not in best.all_steps():
      previous = checkpoint.best_value(best, BEST_METRIC)
      better = previous is None or val_results["mAP"] > previous
      if not single_process:  # Orbax saves are collective: every process decides as process 0
        better = bool(multihost_utils.broadcast_one_to_all(np.bool_(better)))
      if better:
        mAP = val_results["mAP"]
        kept = checkpoint.save(
          best, step, saved_state(state), {**meta, BEST_METRIC: mAP}, metrics={BEST_METRIC: mAP}
        )
        where = checkpoint.checkpoint_dir(best_dir)
        if main_process:
          print(
            f"step {step}: best validation mAP so far ({mAP:.2f}), kept in {where}"
            if kept
            else f"step {step}: best validation mAP so far ({mAP:.2f}) NOT kept: {where} "
            f"already holds a later step ({best.latest_step()}) from an earlier attempt of "
            "this run",
            flush=True,
          )

  def save(step: int) -> None:
    checkpoint.save(mngr, step, saved_state(state), {**meta, "num_processes": jax.process_count()})

  # ---------------------------------------------------------------- loop
  stop = total_steps if not config.max_steps else min(total_steps, config.max_steps)
  step = start
  book = Logbook(workdir, total_steps, per_epoch, data_cfg.batch_size)
  done = finished(start)  # a resumed run that had already ended only evaluates
  try:
    for step in range(start + 1, start if done else stop + 1):
      if graph and (batches is None or (step - 1) % per_epoch == 0):
        state, batches = graph_epoch(step - 1)
      local = next(batches)
      check_labels(local["label"], num_classes, step)
      if step - 1 == config.debug_nan_step:
        local = {**local, "image": np.full_like(local["image"], np.nan)}
      state, metrics = step_fn(state, sharding.global_batch(local, mesh), rng)
      done = finished(step)
      is_ckpt = step % config.checkpoint.every == 0 or step == stop or done
      # Validate the final state too, so it can be selected.
      is_val = validating and (step % config.eval_every == 0 or done)
      if step % config.log_every == 0 or is_ckpt or is_val:
        values = jax.device_get(metrics)
        try:
          check_finite(values, step)
        except TrainingDiverged as e:  # never checkpoint a broken state
          raise TrainingDiverged(
            f"{e} Stopped; the last good checkpoint (step {last_good}) in "
            f"{checkpoint.checkpoint_dir(workdir)} is intact."
          ) from None
        book.log(step, {**values, "lr": learning_rate(state.opt_state)})
      # Validation before the checkpoint: a crash in between resumes before this step and
      # validates it again, so best/ never misses a step a straight run would consider.
      if is_val:
        validate(step)
        book.restart_clock()
      if is_ckpt:
        save(step)
        last_good = step
      if done:  # the adaptive schedule's final epoch
        break
    if done and config.eval.testsets:
      # The test sets: once, on the final state, never for selection (every process).
      from qaconv_jax.evaluation.eval_lib import evaluate_variables

      results = evaluate_variables(
        config, workdir, {"params": state.params, "batch_stats": state.batch_stats}, step
      )
      for testset, methods in results["testsets"].items():
        book.log(
          step,
          {f"{testset}/{m}/{k}": r[k] for m, r in methods.items() for k in ("rank1", "mAP")},
          kind="test",
        )
  finally:
    mngr.wait_until_finished()
    mngr.close()
    if best is not None:
      best.wait_until_finished()
      best.close()
    book.close()
  return {"step": step, "eval": results, "val": val_results}
