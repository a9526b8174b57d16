"""Data parallelism on a ``("data",)`` mesh over every device of every host (jit + shardings).

Parameters, optimiser state and BN statistics are replicated; the batch is split over
"data"; the class memory is split over "data" on its class axis (padded to a multiple of
the device count: `qaconv_jax.memory.pad_class_memory`), so memory for many identities
grows with the device count, and each device matches the batch against its own rows
(`match_maxima(..., gallery_axis="data")`). Under jit, XLA inserts the other collectives;
BN statistics and the loss are over the global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A ``("data",)`` mesh over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: [b, C] matrices built from a batch-sharded tensor need no explicit reshards.
  return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def state_shardings(state, mesh):
  """Replicated everywhere except the class memory and its flags (class axis on "data";
  the memory must be padded to a multiple of the device count first)."""
  n = mesh.shape["data"]
  replicated = NamedSharding(mesh, P())
  if state.class_memory is None:  # QAConv 2.1: no memory
    return jax.tree.map(lambda _: replicated, state)
  if state.class_memory.shape[0] % n:
    raise ValueError(
      f"a class memory of {state.class_memory.shape[0]} rows does not split over {n} "
      "devices: pad it first (qaconv_jax.memory.pad_class_memory)."
    )
  return jax.tree.map(lambda _: replicated, state).replace(
    class_memory=NamedSharding(mesh, P("data")), memory_valid=NamedSharding(mesh, P("data"))
  )


def global_batch(local: dict, mesh) -> dict:
  """This host's rows -> global arrays split over "data" (rows of all hosts, in host order)."""
  sharding = NamedSharding(mesh, P("data"))
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
  }


def replicate(tree, mesh):
  """``tree``'s arrays on every device of ``mesh`` (no copy for arrays already there). A host
  array must be the same on every process."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def local_rows(n: int, mesh) -> np.ndarray:
  """Sorted positions in ``[0, n)`` of the rows of an ``[n, ...]`` array split over "data"
  that this process's devices hold (its rows of a global batch)."""
  index_map = NamedSharding(mesh, P("data")).addressable_devices_indices_map((n,))
  rows = {i for idx in index_map.values() for i in range(*idx[0].indices(n))}
  return np.array(sorted(rows), np.int64)


def rows_to_global(local: np.ndarray, rows: np.ndarray, n: int, mesh) -> jax.Array:
  """This process's rows ``local [len(rows), ...]`` (at positions ``rows``, from
  `local_rows`) -> the global ``[n, ...]`` array split over "data"."""
  sharding = NamedSharding(mesh, P("data"))
  return jax.make_array_from_callback(
    (n, *local.shape[1:]),
    sharding,
    lambda idx: local[np.searchsorted(rows, np.arange(n)[idx[0]])],
  )


def put_global(host: np.ndarray, mesh, spec: P) -> jax.Array:
  """A host array that every process holds whole -> a global array laid out by ``spec`` (each
  device receives only its part)."""
  return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec), lambda i: host[i])


def to_host(tree):
  """The whole of every array of ``tree`` as NumPy, on every process (gathered across
  processes when they hold parts of it)."""
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)

  return jax.tree.map(one, tree)
