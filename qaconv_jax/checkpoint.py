"""Orbax checkpoints of the train state, with the model config beside them.

Layout: ``<workdir>/checkpoints/<step>/{state, meta}``; ``meta`` is JSON holding the model
config and the number of classes (a training run adds its data order, optimiser structure
and process count; ``best/`` its validation mAP), so a checkpoint can be restored without
building a template and a checkpoint from another model or run is refused by name. A
manager made with ``best_metric`` keeps only its best checkpoints by that metric (Orbax's own
retention).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import serialization, traverse_util

from qaconv_jax.errors import CheckpointMismatch, CheckpointNotFound
from qaconv_jax.models.model import RUNTIME_KEYS


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(
  workdir: str, max_to_keep: int | None = 3, best_metric: str | None = None
) -> ocp.CheckpointManager:
  """The checkpoints of ``workdir``: the latest ``max_to_keep``, or with ``best_metric`` the
  ``max_to_keep`` with the highest value of that metric (saved with `save`'s ``metrics``)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  if best_metric:
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      best_fn=lambda m: m[best_metric],
      best_mode="max",
      keep_checkpoints_without_metrics=False,
    )
  return ocp.CheckpointManager(
    checkpoint_dir(workdir),
    options=options,
    item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
  )


def save(
  mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, metrics: dict | None = None
) -> bool:
  """Saves ``state`` (a pytree, e.g. the TrainState) and JSON ``meta`` at ``step``; Orbax
  writes to a temporary folder and renames it, so a crash never leaves a half checkpoint.
  ``metrics`` rank the checkpoint in a ``best_metric`` manager. Returns False when Orbax
  declines (a step not after the manager's latest)."""
  return mngr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(serialization.to_state_dict(state)), meta=ocp.args.JsonSave(meta)
    ),
    metrics=metrics,
  )


def best_value(mngr: ocp.CheckpointManager, metric: str) -> float | None:
  """The ``metric`` of the best checkpoint a ``best_metric`` manager holds (None if none),
  read from Orbax's step metadata: no state is restored."""
  mngr.wait_until_finished()  # the metrics are read from disk, where an async save ends
  step = mngr.best_step()
  return None if step is None else float(mngr.metrics(step)[metric])


def restore_latest(
  workdir: str, step: int | None = None, target: Any = None, model_cfg: dict | None = None
) -> tuple[int, Any]:
  """``(step, state)`` of the latest (or the given) checkpoint under ``workdir``.

  See `restore_with_meta` for the arguments.
  """
  step, state, _ = restore_with_meta(workdir, step, target, model_cfg)
  return step, state


def restore_with_meta(
  workdir: str,
  step: int | None = None,
  target: Any = None,
  model_cfg: dict | None = None,
  same: dict | None = None,
) -> tuple[int, Any, dict]:
  """``(step, state, meta)`` of the latest (or the given) checkpoint under ``workdir``.

  Without ``target`` the state comes back as nested dicts of arrays (enough to evaluate);
  with a TrainState ``target`` it is restored into that structure and its shardings.
  With ``model_cfg`` the saved model config is checked first, and every ``same`` entry must
  equal the saved meta's (a resumed run's class count and data order): `CheckpointMismatch`.
  """
  mngr = manager(workdir, max_to_keep=None)
  try:
    return _restore(mngr, workdir, step, target, model_cfg, same or {})
  finally:
    mngr.close()


def restore_variables(config, workdir: str, step: int | None = None):
  """``(step, {"params", "batch_stats"})`` of ``workdir``'s checkpoint for ``config.model``,
  refused (`CheckpointMismatch`) when written for another model or lacking the matcher."""
  step, state = restore_latest(workdir, step, model_cfg=config.model.to_dict())
  absent = {"neck", "qaconv"} - set(state["params"])
  if absent:
    raise CheckpointMismatch(
      f"{workdir} holds no {' or '.join(sorted(absent))} weights (a converted ImageNet "
      "backbone?): train from it with config.init_from, then use the training workdir."
    )
  return step, {"params": state["params"], "batch_stats": state["batch_stats"]}


def _restore(mngr, workdir, step, target, model_cfg, same):
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointNotFound(f"no checkpoint under {checkpoint_dir(workdir)}.")
  if step is None:
    step = mngr.latest_step()
  elif step not in steps:
    raise CheckpointNotFound(
      f"no checkpoint for step {step} under {checkpoint_dir(workdir)}; available: {sorted(steps)}."
    )
  meta = _read_meta(mngr, step)
  if model_cfg is not None:
    check_model_config(meta, model_cfg)
  _check_same_run(meta, same, workdir)
  if target is None:
    # Onto this process's first device, whatever topology wrote it (a pod checkpoint
    # evaluated on one accelerator).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tree = mngr.item_metadata(step)["state"]
    abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      tree,
      is_leaf=lambda m: hasattr(m, "shape"),
    )
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return step, restored["state"], meta
  template = serialization.to_state_dict(target)
  # Fields the target leaves empty (None) that an older checkpoint never wrote (e.g.
  # `TrainState.epoch_batches`, added later) are not asked of it; they stay None.
  saved = set(mngr.item_metadata(step)["state"])
  absent = {k: None for k, v in template.items() if v is None and k not in saved}
  template = {k: v for k, v in template.items() if k not in absent}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return step, serialization.from_state_dict(target, {**restored["state"], **absent}), meta


def _read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def check_compatible(workdir: str, model_cfg: dict, same: dict) -> None:
  """Raises `CheckpointMismatch` if ``workdir``'s latest checkpoint (if any) was written for
  another model or run (see `restore_with_meta`); reads its meta only."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return
  mngr = manager(workdir, max_to_keep=None)
  try:
    step = mngr.latest_step()
    if step is None:
      return
    meta = _read_meta(mngr, step)
  finally:
    mngr.close()
  check_model_config(meta, model_cfg)
  _check_same_run(meta, same, workdir)


def check_model_config(meta: dict, model_cfg: dict) -> None:
  """Raises ``CheckpointMismatch`` naming every model setting that differs.

  Only the settings the checkpoint records are compared: a training checkpoint records all
  of ``config.model``, a converted PyTorch file only what its weights determine (depth,
  width, ibn, and for a QAConv checkpoint neck_dim, neck_version, head). Runtime knobs
  (`RUNTIME_KEYS`: numerics, matcher tiles and kernel) are never compared.
  """
  saved = dict(meta.get("model", {}))
  if "neck_dim" in saved:  # a whole model written before final_stage existed: layer3
    saved.setdefault("final_stage", "layer3")
  keys = sorted(k for k in saved if k not in RUNTIME_KEYS)
  diff = [
    f"{k}: checkpoint {saved[k]!r} vs config {model_cfg.get(k)!r}"
    for k in keys
    if _plain(saved[k]) != _plain(model_cfg.get(k))
  ]
  if diff:
    raise CheckpointMismatch("the checkpoint was written for a different model: " + "; ".join(diff))


def _check_same_run(meta: dict, same: dict, workdir: str) -> None:
  """Raises `CheckpointMismatch` naming each ``same`` setting the checkpoint recorded
  differently (settings it did not record are not compared)."""
  diff = []
  for key, want in same.items():
    saved = meta.get(key)
    if isinstance(want, dict) and isinstance(saved, dict):
      diff += [
        f"{key}.{k}: checkpoint {saved[k]!r} vs this run {v!r}"
        for k, v in want.items()
        if k in saved and _plain(saved[k]) != _plain(v)
      ]
    elif key in meta and _plain(saved) != _plain(want):
      diff.append(f"{key}: checkpoint {saved!r} vs this run {want!r}")
  if diff:
    raise CheckpointMismatch(
      f"{checkpoint_dir(workdir)} belongs to a run with other settings, so resuming it here "
      "would not continue that run: " + "; ".join(diff) + ". Use the original settings or "
      "another workdir."
    )


def _plain(v):
  """``v`` as its JSON round trip gives it back (tuples, nested too, become lists)."""
  return json.loads(json.dumps(v))


def init_from(state: Any, source_dir: str, model_cfg: dict, with_memory: bool = False):
  """``state`` with the weights of ``source_dir``'s latest checkpoint put in.

  The source may hold the whole model (a training workdir, a converted QAConv checkpoint)
  or only some of its top-level modules (a converted ImageNet backbone): each module it
  holds replaces the fresh one and must match it variable for variable; the others keep
  their initialisation. ``with_memory`` also takes the class memory and its valid flags,
  which must have the same number of classes and map shape.

  Returns ``(state, lines)``, ``lines`` saying which modules came from where.
  """
  _, saved, meta = restore_with_meta(source_dir, model_cfg=model_cfg)
  params, stats = dict(state.params), dict(state.batch_stats)
  saved_stats = saved.get("batch_stats", {})
  taken = []
  for name in saved["params"]:
    if name not in params:
      raise CheckpointMismatch(
        f"{source_dir} holds a module '{name}' this model lacks; the model has {sorted(params)}."
      )
    _check_same(f"params/{name}", saved["params"][name], params[name])
    params[name] = saved["params"][name]
    if name in stats or name in saved_stats:
      _check_same(f"batch_stats/{name}", saved_stats.get(name, {}), stats.get(name, {}))
      stats[name] = saved_stats[name]
    taken.append(name)
  lines = [f"initialised {', '.join(taken)} from {source_dir}"]
  kept = sorted(set(params) - set(taken))
  if kept:
    lines.append(f"freshly initialised: {', '.join(kept)}")
  state = state.replace(params=params, batch_stats=stats)
  if with_memory:
    if "class_memory" not in saved:
      raise CheckpointMismatch(f"init_memory is set but {source_dir} holds no class memory.")
    memory, valid = saved["class_memory"], saved["memory_valid"]
    if memory.shape != state.class_memory.shape:
      raise CheckpointMismatch(
        f"the class memory of {source_dir} is {list(memory.shape)} "
        f"but this run needs {list(state.class_memory.shape)} "
        "(classes, h, w, d)."
      )
    state = state.replace(class_memory=memory, memory_valid=valid.astype(bool))
    lines.append(f"class memory from {source_dir}: {int(valid.sum())}/{len(valid)} valid")
  return state, lines


def _check_same(where: str, saved: Any, fresh: Any) -> None:
  """Raises ``CheckpointMismatch`` naming every variable missing, extra or mis-shaped."""
  flat_saved = traverse_util.flatten_dict(saved, sep="/")
  flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
  problems = [f"missing {k}" for k in sorted(set(flat_fresh) - set(flat_saved))]
  problems += [f"unexpected {k}" for k in sorted(set(flat_saved) - set(flat_fresh))]
  problems += [
    f"{k}: checkpoint {list(flat_saved[k].shape)} vs model {list(flat_fresh[k].shape)}"
    for k in sorted(set(flat_saved) & set(flat_fresh))
    if tuple(flat_saved[k].shape) != tuple(flat_fresh[k].shape)
  ]
  if problems:
    raise CheckpointMismatch(f"{where} does not fit the model: " + "; ".join(problems))
