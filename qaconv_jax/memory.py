"""The class memory: the latest feature map of every training identity (docs/method.md §3).

The train state carries ``class_memory [C, h, w, d]`` and ``memory_valid [C]``. A step reads
the memory as it was before the batch, computes the loss, and only then writes the batch
in (plain replacement, no moving average).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_class_memory(
  num_classes: int, map_shape: tuple[int, int, int], all_valid: bool, dtype=jnp.float32
):
  """Zero memory ``[C, h, w, d]`` and its flags ``[C]``.

  ``all_valid=True`` is the v1.0 behaviour (every class counts in the loss from step 0);
  False is v1.1+ (a class counts once it has been written).
  """
  memory = jnp.zeros((num_classes, *map_shape), dtype)
  valid = jnp.full((num_classes,), all_valid, dtype=jnp.bool_)
  return memory, valid


def update_class_memory(
  memory: jax.Array, valid: jax.Array, features: jax.Array, labels: jax.Array
):
  """Writes ``features [b, h, w, d]`` into rows ``labels [b]`` of ``memory [C, h, w, d]``.

  With duplicate labels in a batch the LAST occurrence wins, deterministically on every
  backend (a plain scatter leaves the winner unspecified, which would break exact resume).
  Returns ``(memory, valid)``.
  """
  if features.shape[1:] != memory.shape[1:] or labels.shape != features.shape[:1]:
    raise ValueError(
      f"cannot write features {features.shape} with labels {labels.shape} "
      f"into a class memory {memory.shape}."
    )
  num_classes = memory.shape[0]
  b = labels.shape[0]
  later = jnp.arange(b)[None, :] > jnp.arange(b)[:, None]  # [b, b]: j comes after i
  overwritten = jnp.any(later & (labels[None, :] == labels[:, None]), axis=1)  # [b]
  target = jnp.where(overwritten, num_classes, labels)  # out of range -> dropped
  memory = memory.at[target].set(jax.lax.stop_gradient(features).astype(memory.dtype), mode="drop")
  valid = valid.at[target].set(True, mode="drop")
  return memory, valid
