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


# Sentinels of the official triplet / pairwise losses (github ShengcaiLiao/QAConv, v2.1
# reid/loss/triplet_loss.py): a row without a positive gets min_pos = +1e15 and one without a
# negative max_neg = -1e15, so such rows count as correct and their hinge is inactive.
_SENTINEL = 1e15


def _check_pair_inputs(name: str, scores: jax.Array, labels: jax.Array) -> None:
  if scores.ndim != 2 or scores.shape[0] != scores.shape[1] or labels.shape != scores.shape[:1]:
    raise ValueError(
      f"{name} expects scores [b, b] (a batch against itself) and labels [b]; got "
      f"{scores.shape}, {labels.shape}."
    )


def _finite_rows(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``[b, b] -> (safe scores [b, b] float32, row is all finite [b])``.

  The official masks multiply scores by 0/1, so one inf or NaN score makes its whole row NaN
  and the trainer drops it. The losses below reproduce that with `jnp.where` on their output;
  they compute on zeros in such rows so that the zero cotangent the `where` sends back is not
  multiplied by a NaN local derivative (0 * NaN = NaN in the gradient).
  """
  s = scores.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(s), axis=1)
  return jnp.where(finite[:, None], s, 0.0), finite


def _hardest_pairs(s: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``s [b, b]`` float32, ``labels [b]`` -> ``(min_pos [b], max_neg [b])``.

  min_pos: the lowest score against another image of the row's identity (the diagonal is not
  a positive here); max_neg: the highest score against another identity; the official
  sentinels where there is none. Each is gathered at its arg-min/max so that, like torch.min /
  torch.max with ``dim``, its gradient reaches one entry only, even on ties.
  """
  same = labels[:, None] == labels[None, :]
  pos = same & ~jnp.eye(s.shape[0], dtype=bool)
  pos_scores = jnp.where(pos, s, _SENTINEL)
  neg_scores = jnp.where(same, -_SENTINEL, s)
  i_pos = jnp.argmin(pos_scores, axis=1)[:, None]
  i_neg = jnp.argmax(neg_scores, axis=1)[:, None]
  min_pos = jnp.take_along_axis(pos_scores, i_pos, axis=1)[:, 0]
  max_neg = jnp.take_along_axis(neg_scores, i_neg, axis=1)[:, 0]
  return min_pos, max_neg


def pairwise_accuracy(scores: jax.Array, labels: jax.Array, strict: bool = True) -> jax.Array:
  """Whether each row's hardest positive beats its hardest negative: ``[b, b] -> [b]``.

  Args:
    scores: ``[b, b]`` logits of a batch against itself (higher = more similar).
    labels: ``[b]`` int identity of each image.
    strict: ``min_pos > max_neg`` (official pairwise matching loss) if True, else
      ``min_pos >= max_neg`` (official triplet loss).

  Returns:
    ``[b]`` float32 0/1, no gradient. Rows without a positive or a negative are 1 (the
    official sentinels); rows holding a non-finite score are 0 (NaN compares false).
  """
  _check_pair_inputs("pairwise_accuracy", scores, labels)
  s = jax.lax.stop_gradient(scores).astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(s), axis=1)
  min_pos, max_neg = _hardest_pairs(jnp.where(finite[:, None], s, 0.0), labels)
  correct = min_pos > max_neg if strict else min_pos >= max_neg
  return (correct & finite).astype(jnp.float32)


def triplet_loss(
  scores: jax.Array, labels: jax.Array, margin: float = 16.0
) -> tuple[jax.Array, jax.Array]:
  """Batch-hard triplet loss on QAConv scores (QAConv 2.1, official
  reid/loss/triplet_loss.py).

  Args:
    scores: ``[b, b]`` logits of a batch against itself (higher = more similar); any float
      dtype, computed in float32.
    labels: ``[b]`` int identity of each image.
    margin: hinge margin, in logit units.

  Returns:
    ``(loss [b], acc [b])``: ``max(0, max_neg - min_pos + margin)`` per row, where min_pos is
    the lowest score against another image of the same identity and max_neg the highest
    against another identity; ``acc = min_pos >= max_neg`` (no gradient). A row without a
    positive or a negative has loss 0 and acc 1; a row holding a non-finite score has loss
    NaN (dropped by `finite_mean`), acc 0 and a zero gradient. The gradient reaches only the
    selected min_pos / max_neg entries.
  """
  _check_pair_inputs("triplet_loss", scores, labels)
  s, finite = _finite_rows(scores)
  min_pos, max_neg = _hardest_pairs(s, labels)
  # Explicit, not left to the sentinels: with scores near 1e15 they would leak into the hinge.
  same = labels[:, None] == labels[None, :]
  has_both = (jnp.sum(same, axis=1) > 1) & ~jnp.all(same, axis=1)
  loss = jnp.where(has_both, jax.nn.relu(max_neg - min_pos + margin), 0.0)
  loss = jnp.where(finite, loss, jnp.nan)
  return loss, pairwise_accuracy(scores, labels, strict=False)


def pairwise_matching_loss(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """Pairwise matching loss (QAConv 2.0, official reid/loss/pairwise_matching_loss.py).

  Args:
    scores: ``[b, b]`` logits of a batch against itself; any float dtype, computed in float32.
    labels: ``[b]`` int identity of each image.

  Returns:
    ``[b]``: per row, the sum over the batch of the binary cross-entropy with logits of each
    score against "same identity" (the diagonal is a positive). A row holding a non-finite
    score is NaN (dropped by `finite_mean`) with a zero gradient. The official accuracy that
    goes with it is `pairwise_accuracy` (strict).
  """
  _check_pair_inputs("pairwise_matching_loss", scores, labels)
  s, finite = _finite_rows(scores)
  same = labels[:, None] == labels[None, :]
  # -log p(target): log_sigmoid of the signed logit never overflows.
  loss = -jnp.sum(jax.nn.log_sigmoid(jnp.where(same, s, -s)), axis=1)
  return jnp.where(finite, loss, jnp.nan)


def finite_mean(per_row: jax.Array, where: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean over the finite rows only, as the official trainer averages its per-row losses.

  Args:
    per_row: ``[b]`` per-row values (a loss or an accuracy).
    where: optional ``[b]`` bool, rows to consider at all; e.g. ``jnp.isfinite(loss)`` to
      average the accuracy over the rows whose loss is kept, as the official trainer does.

  Returns:
    ``(mean [], num_finite [])``: the float32 mean over the kept finite rows and their int32
    count. With no such row the mean is NaN, never 0, so that a divergence check sees it. The
    gradient is ``1 / num_finite`` on kept finite rows and exactly 0 elsewhere.
  """
  if per_row.ndim != 1 or (where is not None and where.shape != per_row.shape):
    raise ValueError(
      "finite_mean expects per_row [b] and an optional where [b]; got "
      f"{per_row.shape}, {None if where is None else where.shape}."
    )
  x = per_row.astype(jnp.float32)
  keep = jnp.isfinite(x)
  if where is not None:
    keep = keep & where.astype(bool)
  # Double where: a NaN row must not reach the sum even with a zero weight (0 * NaN = NaN in
  # the value and in the gradient).
  safe = jnp.where(keep, x, 0.0)
  count = jnp.sum(keep, dtype=jnp.int32)
  mean = jnp.sum(safe) / jnp.maximum(count, 1).astype(jnp.float32)
  return jnp.where(count > 0, mean, jnp.nan), count
