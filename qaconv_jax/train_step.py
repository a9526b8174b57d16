"""One training step, pure and jit-able: class memory (docs/method.md §3-§4) or QAConv 2.1's
losses on the batch's scores against itself (§12)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qaconv_jax import sharding
from qaconv_jax.errors import ConfigError, TrainingDiverged
from qaconv_jax.losses import (
  finite_mean,
  focal_memory_loss,
  memory_accuracy,
  pairwise_accuracy,
  pairwise_matching_loss,
  triplet_loss,
)
from qaconv_jax.memory import real_class_mask, update_class_memory
from qaconv_jax.models.model import build_model
from qaconv_jax.train_state import TrainState, pad_memory


def train_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  rng: jax.Array,
  *,
  gamma: float,
  num_classes: int | None = None,
  memory_axis: str | None = None,
  freeze_bn: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """Forward, focal memory loss, SGD update, BN statistics and class memory update.

  Args:
    state: the train state; ``state.apply_fn`` is ``QAConvModel.apply``.
    batch: ``{"image": [b, H, W, 3] float in [0, 1], "label": [b] int32}``; labels must lie
      in ``[0, C)`` (a traced step cannot check: the training loop does,
      `qaconv_jax.data.splits.check_labels`).
    rng: base key; the step number is folded in, so every step draws fresh randomness
      (handed to the model as its ``dropout`` stream) and a resumed run draws the same.
    gamma: focal exponent.
    num_classes: the real classes when the memory is padded (`memory.pad_class_memory`):
      rows past it are kept out of the BN statistics and the accuracy (their
      ``memory_valid`` is False, so the loss already skips them). None: nothing padded.
    memory_axis: the mesh axis the memory is split over (the model must match against it
      on that axis: ``build_model(..., memory_axis=)``), so it is written in place.
    freeze_bn: backbone and neck BN in inference mode (see `pair_train_step`).

  Returns:
    ``(new_state, metrics)`` with scalar ``loss``, ``accuracy`` (argmax over the memory ==
    label) and ``grad_norm``. Finiteness is the caller's to check (`check_finite`).
  """
  images, labels = batch["image"], batch["label"]
  step_rng = jax.random.fold_in(rng, state.step)
  # The loss sees the memory as it was BEFORE this batch; it is a constant for autodiff.
  memory = jax.lax.stop_gradient(state.class_memory)
  real = real_class_mask(memory.shape[0], num_classes or memory.shape[0])  # [C'] or None

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    (features, logits), updates = state.apply_fn(
      variables,
      images,
      memory=memory,
      memory_mask=real,
      train=True,
      embed_train=not freeze_bn,
      mutable=["batch_stats"],
      rngs={"dropout": step_rng},
    )  # features [b, h, w, d], logits [b, C]
    loss = jnp.mean(focal_memory_loss(logits, labels, state.memory_valid, gamma))
    return loss, (features, logits, updates["batch_stats"])

  (loss, (features, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  new_state = _apply_gradients(state, grads, loss, batch_stats)
  class_memory, memory_valid = update_class_memory(
    state.class_memory, state.memory_valid, features, labels, memory_axis
  )
  new_state = new_state.replace(class_memory=class_memory, memory_valid=memory_valid)
  metrics = {
    "loss": loss,
    "accuracy": memory_accuracy(logits, labels, real),
    "grad_norm": optax.tree.norm(grads),
  }
  return new_state, metrics


def _apply_gradients(state: TrainState, grads, loss: jax.Array, batch_stats) -> TrainState:
  """One optimiser update and the step's new BN statistics. The loss goes to the optimiser
  too (``value``): the plateau and adaptive schedules average it per epoch."""
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, value=loss)
  return state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
    batch_stats=batch_stats,
  )


def pair_train_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  rng: jax.Array,
  *,
  loss: str,
  margin: float,
  freeze_bn: bool,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """QAConv 2.1's step: the batch's ``[b, b]`` scores against itself (matcher in train
  mode), a per-row loss averaged over its finite rows (the authors' trainer drops the
  others), SGD update, BN statistics.

  Args:
    state, batch, rng: as `train_step` (no class memory).
    loss: "triplet" (batch-hard, ``margin``) or "pairwise_matching" (row-summed BCE).
    freeze_bn: backbone and neck BN in inference mode (statistics used, not updated), as the
      authors' ``model.eval()`` in every step; the matcher's BN trains either way.

  Returns:
    ``(new_state, metrics)``: ``loss`` (NaN when no row is finite, for the loop's check),
    ``accuracy`` (rows whose hardest positive beats their hardest negative), ``grad_norm``
    and ``finite_rows``.
  """
  images, labels = batch["image"], batch["label"]
  step_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    (_, scores), updates = state.apply_fn(
      variables,
      images,
      train=True,
      embed_train=not freeze_bn,
      mutable=["batch_stats"],
      rngs={"dropout": step_rng},
    )  # scores [b, b]
    if loss == "triplet":
      rows, acc = triplet_loss(scores, labels, margin)  # [b], [b]
    else:
      rows, acc = pairwise_matching_loss(scores, labels), pairwise_accuracy(scores, labels)
    mean, num_finite = finite_mean(rows)
    accuracy, _ = finite_mean(acc, where=jnp.isfinite(rows))
    return mean, (accuracy, num_finite, updates["batch_stats"])

  (loss_value, (accuracy, num_finite, batch_stats)), grads = jax.value_and_grad(
    loss_fn, has_aux=True
  )(state.params)
  new_state = _apply_gradients(state, grads, loss_value, batch_stats)
  # No finite row: the authors skip such a batch, an fp16 artefact of their ±1e15 sentinels
  # that cannot arise here (float32 losses), so it means the scores diverged. The weights
  # are marked NaN, so the loop's next finiteness check stops the run before any checkpoint.
  params = jax.tree.map(lambda p: jnp.where(num_finite > 0, p, jnp.nan), new_state.params)
  new_state = new_state.replace(params=params)
  metrics = {
    "loss": loss_value,
    "accuracy": accuracy,
    "grad_norm": optax.tree.norm(grads),
    "finite_rows": num_finite.astype(jnp.float32),
  }
  return new_state, metrics


def step_function(
  loss_cfg, freeze_bn: bool, num_classes: int | None = None, memory_axis: str | None = None
) -> Callable[..., Any]:
  """``config.loss`` (+ ``config.freeze_bn``) -> the unjitted ``(state, batch, rng)`` step."""
  if loss_cfg.name == "class_memory":
    return functools.partial(
      train_step,
      gamma=loss_cfg.gamma,
      num_classes=num_classes,
      memory_axis=memory_axis,
      freeze_bn=freeze_bn,
    )
  if loss_cfg.name in PAIR_LOSSES:
    return functools.partial(
      pair_train_step, loss=loss_cfg.name, margin=loss_cfg.margin, freeze_bn=freeze_bn
    )
  raise ConfigError(
    f"loss.name must be 'class_memory', {' or '.join(map(repr, PAIR_LOSSES))}; "
    f"got {loss_cfg.name!r}."
  )


PAIR_LOSSES = ("triplet", "pairwise_matching")


def make_train_step(
  loss_cfg,
  state_sharding=None,
  batch_sharding=None,
  *,
  num_classes: int | None = None,
  memory_axis: str | None = None,
  freeze_bn: bool = False,
) -> Callable[..., Any]:
  """``config.loss`` -> the jitted step (`step_function`) that donates the state (argument
  0); with shardings, the state keeps ``state_sharding`` across steps and the batch is split
  by ``batch_sharding`` (their mesh is set while the step traces, for the split memory).
  ``num_classes``/``memory_axis``: see `train_step`; ``freeze_bn``: `pair_train_step`."""
  step = step_function(loss_cfg, freeze_bn, num_classes, memory_axis)
  if state_sharding is None:
    return jax.jit(step, donate_argnums=0)
  jitted = jax.jit(
    step,
    donate_argnums=0,
    in_shardings=(state_sharding, batch_sharding, None),
    out_shardings=(state_sharding, None),
  )
  mesh = (batch_sharding or jax.tree.leaves(state_sharding)[0]).mesh

  def run(state, batch, rng):
    with jax.set_mesh(mesh):
      return jitted(state, batch, rng)

  run.lower = lambda *a: _lower_on(mesh, jitted, *a)  # for inspecting the compiled step
  return run


class MeshStep(NamedTuple):
  """`mesh_train_step`'s result."""

  place: Callable[[TrainState], TrainState]  # unpadded state -> padded, split, step's model
  state_sharding: Any
  batch_sharding: NamedSharding
  step: Callable[..., Any]  # jitted (state, batch, rng) -> (state, metrics)


def mesh_train_step(
  state: TrainState,
  model_cfg,
  loss_cfg,
  mesh,
  num_classes: int,
  memory_axis: str | None = "auto",
  freeze_bn: bool = False,
) -> MeshStep:
  """The train step on ``mesh``, the class memory split over its devices.

  ``state`` is the unpadded state (``num_classes`` memory rows: what checkpoints hold).
  ``memory_axis``: "auto" = "data" when the mesh has more than one device, else None (a
  test passes None on many devices to see what an unsplit matcher compiles to). The step's
  model is ``config.model`` built with that axis; no weight depends on it.
  """
  n = mesh.shape["data"]
  if state.class_memory is None:  # QAConv 2.1: the batch matches itself, nothing to split
    memory_axis = None
  elif memory_axis == "auto":
    memory_axis = "data" if n > 1 else None
  step_model = build_model(model_cfg, memory_axis=memory_axis)

  def padded(unpadded: TrainState) -> TrainState:
    return pad_memory(unpadded, n).replace(apply_fn=step_model.apply)

  state_sh = sharding.state_shardings(jax.eval_shape(padded, state), mesh)
  batch_sh = NamedSharding(mesh, P("data"))
  step = make_train_step(
    loss_cfg,
    state_sh,
    batch_sh,
    num_classes=num_classes,
    memory_axis=memory_axis,
    freeze_bn=freeze_bn,
  )
  return MeshStep(lambda s: jax.device_put(padded(s), state_sh), state_sh, batch_sh, step)


def _lower_on(mesh, jitted, *args):
  with jax.set_mesh(mesh):
    return jitted.lower(*args)


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
  """Raises `TrainingDiverged` (a ``FloatingPointError``) naming the step and the offending
  metrics."""
  bad = {k: float(v) for k, v in metrics.items() if not math.isfinite(float(v))}
  if bad:
    raise TrainingDiverged(
      f"non-finite training metrics at step {step}: {bad}. The state after this step is "
      "not trustworthy; lower the learning rate or check the inputs for NaN/Inf."
    )
