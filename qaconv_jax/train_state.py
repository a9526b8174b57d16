"""The train state: parameters, optimiser, BN statistics and the class memory together."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from flax.training import train_state

from qaconv_jax.memory import init_class_memory, pad_class_memory
from qaconv_jax.models.model import QAConvModel


class TrainState(train_state.TrainState):
  """``flax`` TrainState plus ``batch_stats``, ``class_memory [C, h, w, d]`` and
  ``memory_valid [C]`` (None when the loss needs no memory: QAConv 2.1), and
  ``epoch_batches [steps_per_epoch, batch]`` int32: the graph sampler's batches of the
  current epoch (None for the other samplers), checkpointed so that a run resumed mid-epoch
  reads the batches the interrupted one would have."""

  batch_stats: Any = None
  class_memory: jax.Array = None
  memory_valid: jax.Array = None
  epoch_batches: jax.Array = None


def create_train_state(
  model: QAConvModel,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  image_shape: tuple[int, int],
  num_classes: int,
  cfg: ml_collections.ConfigDict,
) -> TrainState:
  """Initialises parameters from ``rng`` and an empty class memory sized from the model's
  output map at ``image_shape`` (H, W). ``cfg`` is ``config.loss``: a loss other than
  "class_memory" gets no memory."""
  dummy = jax.numpy.zeros((1, *image_shape, 3), jax.numpy.float32)
  variables = jax.jit(model.init, static_argnames="train")(rng, dummy, train=False)
  if cfg.name != "class_memory":
    return TrainState.create(
      apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
    )
  map_shape = jax.eval_shape(
    lambda v: model.apply(v, dummy, train=False, method=QAConvModel.embed), variables
  ).shape
  memory, valid = init_class_memory(num_classes, map_shape[1:], all_valid=cfg.all_valid)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    tx=tx,
    batch_stats=variables["batch_stats"],
    class_memory=memory,
    memory_valid=valid,
  )


def pad_memory(state: TrainState, multiple: int) -> TrainState:
  """The memory padded to a multiple of ``multiple`` rows (the device count) so it splits
  over the devices (`qaconv_jax.memory.pad_class_memory`)."""
  if state.class_memory is None:
    return state
  memory, valid = pad_class_memory(state.class_memory, state.memory_valid, multiple)
  return state.replace(class_memory=memory, memory_valid=valid)


def unpad_memory(state: TrainState, num_classes: int) -> TrainState:
  """The first ``num_classes`` memory rows only: what checkpoints hold, whatever the
  device count of the run that wrote them."""
  if state.class_memory is None:
    return state
  return state.replace(
    class_memory=state.class_memory[:num_classes], memory_valid=state.memory_valid[:num_classes]
  )
