"""The class memory: the latest feature map of every training identity (docs/method.md §3).

The train state carries ``class_memory [C, h, w, d]`` and ``memory_valid [C]``. A step reads
the memory as it was before the batch, computes the loss, and only then writes the batch
in (plain replacement, no moving average).

Data-parallel training splits the memory over the devices on its class axis. Any class
count splits: the memory is padded to a multiple of the device count with rows that are
never valid, never written, and kept out of the loss, the accuracy and the matcher's BN
statistics (`pad_class_memory`); checkpoints hold the unpadded ``C`` rows, so a run
resumes on any device count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


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


def pad_class_memory(memory: jax.Array, valid: jax.Array, multiple: int):
  """``[C, h, w, d]``, ``[C]`` -> ``[C', h, w, d]``, ``[C']`` with ``C'`` the next multiple
  of ``multiple``; the padding rows are zero and never valid."""
  extra = -memory.shape[0] % multiple
  if not extra:
    return memory, valid
  memory = jnp.concatenate([memory, jnp.zeros((extra, *memory.shape[1:]), memory.dtype)])
  return memory, jnp.concatenate([valid, jnp.zeros((extra,), valid.dtype)])


def real_class_mask(padded_classes: int, num_classes: int) -> jax.Array | None:
  """``[C']`` bool, True on the ``num_classes`` real rows; None when nothing is padded."""
  if padded_classes == num_classes:
    return None
  return jnp.arange(padded_classes) < num_classes


def update_class_memory(
  memory: jax.Array,
  valid: jax.Array,
  features: jax.Array,
  labels: jax.Array,
  axis: str | None = None,
):
  """Writes ``features [b, h, w, d]`` into rows ``labels [b]`` of ``memory [C, h, w, d]``.

  With duplicate labels in a batch the LAST occurrence wins, deterministically on every
  backend (a plain scatter leaves the winner unspecified, which would break exact resume).
  ``axis``: the mesh axis (``jax.set_mesh``) the memory is split over on its rows; each
  device then writes its own rows, and the memory never moves. Returns ``(memory, valid)``.
  """
  if features.shape[1:] != memory.shape[1:] or labels.shape != features.shape[:1]:
    raise ValueError(
      f"cannot write features {features.shape} with labels {labels.shape} "
      f"into a class memory {memory.shape}."
    )
  features = jax.lax.stop_gradient(features).astype(memory.dtype)
  if axis is None:
    return _write(memory, valid, features, labels, 0)

  def local(m, v, f, lab):  # this device's rows [C'/n, h, w, d]; the whole batch
    return _write(m, v, f, lab, jax.lax.axis_index(axis) * m.shape[0])

  return jax.shard_map(
    local, in_specs=(P(axis), P(axis), P(), P()), out_specs=(P(axis), P(axis)), check_vma=False
  )(memory, valid, features, labels)


def _write(memory, valid, features, labels, first_row):
  """Scatter into rows ``[first_row, first_row + len(memory))``; other labels are dropped."""
  rows = memory.shape[0]
  b = labels.shape[0]
  later = jnp.arange(b)[None, :] > jnp.arange(b)[:, None]  # [b, b]: j comes after i
  overwritten = jnp.any(later & (labels[None, :] == labels[:, None]), axis=1)  # [b]
  local = labels - first_row
  keep = ~overwritten & (local >= 0) & (local < rows)
  target = jnp.where(keep, local, rows)  # out of range -> dropped (never negative: no wrap)
  memory = memory.at[target].set(features, mode="drop")
  valid = valid.at[target].set(True, mode="drop")
  return memory, valid
