"""Data parallelism on a ``("data",)`` mesh over every device of every host (jit + shardings).

Parameters, optimiser state and BN statistics are replicated; the batch is split over
"data"; the class memory is split over "data" on its class axis (when the class count
divides evenly), so memory for many identities grows with the device count. Under jit,
XLA inserts the collectives; BN statistics and the loss are over the global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> jax.sharding.Mesh:
  # Auto axes: [b, C] matrices built from a batch-sharded tensor need no explicit reshards.
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def state_shardings(state, mesh):
  """Replicated everywhere except the class memory and its flags (class axis on "data")."""
  n = mesh.shape["data"]
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: replicated, state)
  if state.class_memory.shape[0] % n == 0:
    shardings = shardings.replace(
      class_memory=NamedSharding(mesh, P("data")), memory_valid=NamedSharding(mesh, P("data"))
    )
  return shardings


def global_batch(local: dict, mesh) -> dict:
  """This host's rows -> global arrays split over "data" (rows of all hosts, in host order)."""
  sharding = NamedSharding(mesh, P("data"))
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
  }
