"""Numerics policies: the compute dtype and matmul/conv precision of a run (docs/method.md §11).

One name (``config.model.dtype`` for training, ``config.eval.dtype`` for evaluation) picks
both, for the backbone, the neck, the matcher and its head alike (TLift's small weight sums
always run at HIGHEST: `temporal_lift`):

==========  ==============  ==========================  =====================================
name        compute dtype   dot/conv precision          use
==========  ==============  ==========================  =====================================
float32     float32         HIGHEST (true float32)      evaluation: the paper's numbers
tf32        float32         HIGH (TF32 on NVIDIA GPUs,  faster float32 on Ampere and later
                            bf16x3 on TPU)
bfloat16    bfloat16        DEFAULT, float32            mixed-precision training, as the
                            accumulation                authors' HEAD (torch autocast)
auto        bfloat16 on GPU/TPU, float32 on CPU (the training default)
==========  ==============  ==========================  =====================================

Parameters, BN statistics, the class memory, the losses and the matcher's maxima stay
float32 in every policy. Without an explicit precision JAX's float32 dot is TF32 on NVIDIA
GPUs and one bf16 pass on TPU, so "float32" pins HIGHEST everywhere a dot or conv is
written. A policy changes speed and rounding, never a weight: it is a runtime knob, not
part of a checkpoint's identity.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from qaconv_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Numerics:
  name: str
  dtype: Any  # activations and dot/conv operands
  precision: jax.lax.Precision


POLICIES = {
  "float32": Numerics("float32", jnp.float32, jax.lax.Precision.HIGHEST),
  "tf32": Numerics("tf32", jnp.float32, jax.lax.Precision.HIGH),
  "bfloat16": Numerics("bfloat16", jnp.bfloat16, jax.lax.Precision.DEFAULT),
}
NAMES = (*POLICIES, "auto")


def resolve(name: str, backend: str | None = None) -> Numerics:
  """A policy name (or "auto", resolved for ``backend``, default JAX's) -> `Numerics`."""
  if name == "auto":
    backend = backend or jax.default_backend()
    name = "float32" if backend == "cpu" else "bfloat16"
  if name not in POLICIES:
    raise ConfigError(f"dtype must be one of {list(NAMES)}, got {name!r}.")
  return POLICIES[name]
