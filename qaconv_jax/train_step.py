"""One class-memory training step (docs/method.md §3-§4), pure and jit-able."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qaconv_jax.errors import TrainingDiverged
from qaconv_jax.losses import focal_memory_loss, memory_accuracy
from qaconv_jax.memory import update_class_memory
from qaconv_jax.train_state import TrainState


def train_step(
  state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *, gamma: float
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

  Returns:
    ``(new_state, metrics)`` with scalar ``loss``, ``accuracy`` (argmax over the memory ==
    label) and ``grad_norm``. Finiteness is the caller's to check (`check_finite`).
  """
  images, labels = batch["image"], batch["label"]
  step_rng = jax.random.fold_in(rng, state.step)
  # The loss sees the memory as it was BEFORE this batch; it is a constant for autodiff.
  memory = jax.lax.stop_gradient(state.class_memory)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    (features, logits), updates = state.apply_fn(
      variables,
      images,
      memory=memory,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": step_rng},
    )  # features [b, h, w, d], logits [b, C]
    loss = jnp.mean(focal_memory_loss(logits, labels, state.memory_valid, gamma))
    return loss, (features, logits, updates["batch_stats"])

  (loss, (features, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  # The loss goes to the optimiser too (`value`), for the ReduceLROnPlateau option.
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, value=loss)
  new_state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
    batch_stats=batch_stats,
  )
  class_memory, memory_valid = update_class_memory(
    state.class_memory, state.memory_valid, features, labels
  )
  new_state = new_state.replace(class_memory=class_memory, memory_valid=memory_valid)
  metrics = {
    "loss": loss,
    "accuracy": memory_accuracy(logits, labels),
    "grad_norm": optax.tree.norm(grads),
  }
  return new_state, metrics


def make_train_step(loss_cfg, state_sharding=None, batch_sharding=None) -> Callable[..., Any]:
  """``config.loss`` -> ``jit(train_step)`` that donates the state (argument 0); with
  shardings, the state keeps ``state_sharding`` across steps and the batch is split by
  ``batch_sharding``."""
  step = functools.partial(train_step, gamma=loss_cfg.gamma)
  if state_sharding is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(
    step,
    donate_argnums=0,
    in_shardings=(state_sharding, batch_sharding, None),
    out_shardings=(state_sharding, None),
  )


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
  """Raises `TrainingDiverged` (a ``FloatingPointError``) naming the step and the offending
  metrics."""
  bad = {k: float(v) for k, v in metrics.items() if not math.isfinite(float(v))}
  if bad:
    raise TrainingDiverged(
      f"non-finite training metrics at step {step}: {bad}. The state after this step is "
      "not trustworthy; lower the learning rate or check the inputs for NaN/Inf."
    )
