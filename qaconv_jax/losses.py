"""Class-memory losses (docs/method.md §3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def focal_memory_loss(
  logits: jax.Array, labels: jax.Array, valid: jax.Array, gamma: float = 2.0
) -> jax.Array:
  """Focal binary cross-entropy of a batch against the class memory.

  Args:
    logits: ``[b, C]`` QAConv logits of each sample against each memory class.
    labels: ``[b]`` int class of each sample.
    valid: ``[C]`` bool/0-1; classes not yet written to memory contribute nothing.
    gamma: focal exponent (no alpha).

  Returns:
    ``[b]`` per-sample losses ``sum_c valid_c * -(1 - p_hat)^gamma * log(p_hat)`` with
    ``p_hat = sigmoid(z)`` for the sample's class and ``1 - sigmoid(z)`` otherwise. The
    focal weight is differentiated through, as in the official code.
  """
  if logits.ndim != 2 or labels.shape != (logits.shape[0],) or valid.shape != (logits.shape[1],):
    raise ValueError(
      "focal_memory_loss expects logits [b, C], labels [b], valid [C]; got "
      f"{logits.shape}, {labels.shape}, {valid.shape}."
    )
  z = logits.astype(jnp.float32)
  positive = labels[:, None] == jnp.arange(z.shape[1])[None, :]  # [b, C]
  signed = jnp.where(positive, z, -z)  # p_hat = sigmoid(signed)
  log_p_hat = jax.nn.log_sigmoid(signed)
  focal = jnp.exp(gamma * jax.nn.log_sigmoid(-signed))  # (1 - p_hat)^gamma, no underflow
  per_class = -focal * log_p_hat  # [b, C]
  return jnp.sum(per_class * valid.astype(jnp.float32)[None, :], axis=1)


def memory_accuracy(
  logits: jax.Array, labels: jax.Array, real: jax.Array | None = None
) -> jax.Array:
  """Fraction of samples whose best-matching memory class is their own: ``[b, C] -> []``.

  ``real [C]`` (bool): only these classes compete (padding rows of a split memory do not).
  """
  if real is not None:
    logits = jnp.where(real[None, :], logits, -jnp.inf)
  return jnp.mean(jnp.argmax(logits, axis=1) == labels)
