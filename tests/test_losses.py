"""Losses against hand-written float64 references: the focal class-memory loss
(docs/method.md §3) and the QAConv 2.x batch losses (official reid/loss/triplet_loss.py,
pairwise_matching_loss.py, and the finite-row averaging of reid/trainers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qaconv_jax.losses import (
  finite_mean,
  focal_memory_loss,
  memory_accuracy,
  pairwise_accuracy,
  pairwise_matching_loss,
  triplet_loss,
)
from tests.reference import focal_loss_ref


def test_focal_loss_matches_reference_with_invalid_classes(rng):
  logits = rng.normal(scale=3.0, size=(6, 9)).astype(np.float32)
  labels = rng.integers(0, 9, size=6).astype(np.int32)
  valid = rng.random(9) < 0.6
  valid[labels] = True
  got = focal_memory_loss(logits, labels, valid)
  assert got.shape == (6,)
  np.testing.assert_allclose(np.asarray(got), focal_loss_ref(logits, labels, valid), rtol=1e-5)
  # Invalid classes contribute nothing whatever their logits.
  moved = logits.copy()
  moved[:, ~valid] += 100.0
  np.testing.assert_allclose(
    np.asarray(focal_memory_loss(moved, labels, valid)), np.asarray(got), rtol=1e-6
  )


def test_focal_loss_gamma_and_all_valid(rng):
  logits = rng.normal(size=(4, 5)).astype(np.float32)
  labels = np.array([0, 4, 2, 2], np.int32)
  valid = np.ones(5, bool)
  for gamma in (0.0, 1.0, 2.0):
    np.testing.assert_allclose(
      np.asarray(focal_memory_loss(logits, labels, valid, gamma)),
      focal_loss_ref(logits, labels, valid, gamma),
      rtol=1e-5,
    )


def test_focal_loss_gradient_includes_focal_weight(rng):
  # The focal weight is not stop-gradient: compare with central differences of the
  # float64 reference.
  logits = rng.normal(scale=2.0, size=(3, 4))
  labels = np.array([1, 3, 0])
  valid = np.array([True, True, False, True])
  grad = np.asarray(
    jax.grad(lambda z: focal_memory_loss(z, labels, valid).sum())(logits.astype(np.float32))
  )
  eps = 1e-5
  fd = np.zeros_like(logits)
  for i in range(3):
    for c in range(4):
      up, down = logits.copy(), logits.copy()
      up[i, c] += eps
      down[i, c] -= eps
      fd[i, c] = (
        focal_loss_ref(up, labels, valid).sum() - focal_loss_ref(down, labels, valid).sum()
      ) / (2 * eps)
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-6)


def test_focal_loss_is_stable_for_large_logits():
  logits = jnp.array([[60.0, -60.0], [-60.0, 60.0]])
  loss = focal_memory_loss(logits, jnp.array([0, 0]), jnp.array([True, True]))
  assert np.all(np.isfinite(np.asarray(loss)))
  assert float(loss[0]) < 1e-20  # confidently right
  np.testing.assert_allclose(float(loss[1]), 2 * 60.0, rtol=1e-5)  # confidently wrong twice


def test_focal_loss_shape_errors():
  with pytest.raises(ValueError, match=r"logits \[b, C\], labels \[b\], valid \[C\]"):
    focal_memory_loss(jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32), jnp.ones(5, bool))


def test_memory_accuracy():
  logits = jnp.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]])
  assert float(memory_accuracy(logits, jnp.array([1, 0, 1, 2]))) == 0.5


# Two or three images of most identities; identities 4 and 5 appear once (no positive).
BATCH_LABELS = np.array([0, 0, 1, 1, 1, 2, 2, 3, 4, 3, 5, 3], np.int32)


def _batch_scores(rng, labels, scale=10.0, boost=35.0):
  """Random ``[b, b]`` scores whose diagonal is the lowest of its row, so that a loss that
  wrongly took the diagonal as a positive would pick it."""
  b = len(labels)
  s = rng.normal(scale=scale, size=(b, b)) + boost * (labels[:, None] == labels[None, :])
  np.fill_diagonal(s, -100.0)
  return s.astype(np.float32)


def _hardest_ref(scores, labels):
  """Loop reference from the definitions: per row the lowest positive score (j != i, same
  label) and the highest negative one, with their columns (None where there is none)."""
  b = len(labels)
  out = []
  for i in range(b):
    min_pos, j_pos, max_neg, j_neg = None, None, None, None
    for j in range(b):
      v = float(scores[i, j])
      if j != i and labels[j] == labels[i] and (min_pos is None or v < min_pos):
        min_pos, j_pos = v, j
      if labels[j] != labels[i] and (max_neg is None or v > max_neg):
        max_neg, j_neg = v, j
    out.append((min_pos, j_pos, max_neg, j_neg))
  return out


def _acc_ref(min_pos, max_neg, strict):
  # The official sentinels stand in for a missing positive / negative.
  p = 1e15 if min_pos is None else min_pos
  n = -1e15 if max_neg is None else max_neg
  return float(p > n) if strict else float(p >= n)


def triplet_ref(scores, labels, margin):
  """float64 ``(loss [b], acc [b], d sum(loss) / d scores [b, b])``."""
  b = len(labels)
  loss, acc, grad = np.zeros(b), np.zeros(b), np.zeros((b, b))
  for i, (min_pos, j_pos, max_neg, j_neg) in enumerate(_hardest_ref(scores, labels)):
    acc[i] = _acc_ref(min_pos, max_neg, strict=False)
    if min_pos is None or max_neg is None:
      continue
    hinge = max_neg - min_pos + margin
    if hinge > 0:
      loss[i] = hinge
      grad[i, j_neg] += 1.0
      grad[i, j_pos] -= 1.0
  return loss, acc, grad


def pairwise_ref(scores, labels):
  """float64 ``(loss [b], strict acc [b], d sum(loss) / d scores [b, b])``."""
  b = len(labels)
  loss, grad = np.zeros(b), np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      x = float(scores[i, j])
      y = 1.0 if labels[i] == labels[j] else 0.0
      # -log sigmoid(x) = log(1 + e^-x) for a positive, -log(1 - sigmoid(x)) = log(1 + e^x)
      # for a negative.
      loss[i] += np.logaddexp(0.0, -x) if y else np.logaddexp(0.0, x)
      grad[i, j] = 1.0 / (1.0 + np.exp(-x)) - y
  acc = np.array([_acc_ref(mp, mn, strict=True) for mp, _, mn, _ in _hardest_ref(scores, labels)])
  return loss, acc, grad


@pytest.mark.parametrize("margin", [16.0, 4.0])
def test_triplet_loss_matches_reference(rng, margin):
  labels = BATCH_LABELS
  scores = _batch_scores(rng, labels)
  fn = jax.jit(lambda s: triplet_loss(s, labels, margin))
  loss, acc = fn(scores)
  ref_loss, ref_acc, ref_grad = triplet_ref(scores, labels, margin)
  assert loss.shape == acc.shape == (12,) and loss.dtype == acc.dtype == jnp.float32
  # The batch exercises active and inactive hinges, rows without a positive and both accs.
  assert (ref_loss > 0).sum() >= 2 and (ref_loss[labels < 4] == 0).sum() >= 1
  assert set(ref_acc[labels < 4]) == {0.0, 1.0}
  np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(acc), ref_acc)
  np.testing.assert_array_equal(np.asarray(loss)[labels >= 4], 0.0)  # singletons
  np.testing.assert_array_equal(np.asarray(acc)[labels >= 4], 1.0)
  grad = jax.grad(lambda s: jnp.sum(fn(s)[0]))(scores)
  np.testing.assert_array_equal(np.asarray(grad), ref_grad)


def test_triplet_loss_single_identity_has_no_negatives(rng):
  labels = np.zeros(6, np.int32)
  scores = _batch_scores(rng, labels)
  loss, acc = triplet_loss(scores, labels)
  np.testing.assert_array_equal(np.asarray(loss), 0.0)
  np.testing.assert_array_equal(np.asarray(acc), 1.0)
  grad = jax.grad(lambda s: jnp.sum(triplet_loss(s, labels)[0]))(scores)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_triplet_loss_bf16_and_ties(rng):
  labels = BATCH_LABELS
  scores = jnp.asarray(_batch_scores(rng, labels), jnp.bfloat16)
  loss, _ = triplet_loss(scores, labels)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(
    np.asarray(loss), triplet_ref(np.asarray(scores, np.float32), labels, 16.0)[0], atol=1e-5
  )
  # All scores equal: every row's hardest positive and negative tie with others, yet each
  # gets the whole gradient of one entry, as torch.min / torch.max with dim give it.
  tied = np.zeros((5, 5), np.float32)
  tied_labels = np.array([0, 0, 0, 1, 1], np.int32)
  grad = np.asarray(jax.grad(lambda s: jnp.sum(triplet_loss(s, tied_labels)[0]))(tied))
  np.testing.assert_array_equal((grad == 1.0).sum(axis=1), 1)
  np.testing.assert_array_equal((grad == -1.0).sum(axis=1), 1)
  np.testing.assert_array_equal((grad != 0.0).sum(axis=1), 2)


def test_pairwise_matching_loss_matches_reference(rng):
  labels = BATCH_LABELS
  scores = _batch_scores(rng, labels, scale=4.0, boost=10.0)
  fn = jax.jit(lambda s: pairwise_matching_loss(s, labels))
  loss = fn(scores)
  ref_loss, ref_acc, ref_grad = pairwise_ref(scores, labels)
  assert loss.shape == (12,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-5)
  grad = jax.grad(lambda s: jnp.sum(fn(s)))(scores)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, atol=1e-6)
  acc = jax.jit(pairwise_accuracy)(scores, labels)
  assert set(ref_acc[labels < 4]) == {0.0, 1.0}
  np.testing.assert_array_equal(np.asarray(acc), ref_acc)


def test_pairwise_matching_loss_is_stable_for_large_logits():
  labels = np.array([0, 0, 1], np.int32)
  scores = np.array([[200.0, 150.0, -300.0], [150.0, 200.0, 300.0], [-300.0, 300.0, 90.0]])
  loss = np.asarray(pairwise_matching_loss(jnp.asarray(scores), labels))
  np.testing.assert_allclose(loss, [0.0, 300.0, 300.0], rtol=1e-6, atol=1e-30)


def test_accuracy_strictness_on_ties():
  # min_pos == max_neg: right for the triplet loss (>=), wrong for the pairwise one (>).
  scores = jnp.array([[9.0, 2.0, 2.0], [2.0, 9.0, 1.0], [2.0, 1.0, 9.0]])
  labels = jnp.array([0, 0, 1])
  np.testing.assert_array_equal(np.asarray(triplet_loss(scores, labels)[1]), [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(np.asarray(pairwise_accuracy(scores, labels)), [0.0, 1.0, 1.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_batch_losses_drop_non_finite_rows(rng, bad):
  labels = BATCH_LABELS
  clean = _batch_scores(rng, labels)
  scores = clean.copy()
  scores[2, 7] = bad  # row 2 is broken; column 7 of the other rows is not touched
  # The references are row by row: the clean batch gives the other rows' values.
  for loss_fn, ref in [
    (lambda s: triplet_loss(s, labels)[0], triplet_ref(clean, labels, 16.0)),
    (lambda s: pairwise_matching_loss(s, labels), pairwise_ref(clean, labels)),
  ]:
    loss = np.asarray(loss_fn(scores))
    assert np.isnan(loss[2]) and np.all(np.isfinite(np.delete(loss, 2)))
    np.testing.assert_allclose(np.delete(loss, 2), np.delete(ref[0], 2), rtol=1e-5, atol=1e-5)
    grad = np.asarray(jax.grad(lambda s, f=loss_fn: finite_mean(f(s))[0])(scores))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[2], 0.0)
    np.testing.assert_allclose(np.delete(grad, 2, 0), np.delete(ref[2], 2, 0) / 11, atol=1e-6)
  assert float(triplet_loss(scores, labels)[1][2]) == 0.0  # NaN compares false
  assert float(pairwise_accuracy(scores, labels)[2]) == 0.0


def test_finite_mean():
  x = jnp.array([1.0, jnp.inf, 3.0, jnp.nan, 5.0, -jnp.inf])
  mean, count = jax.jit(finite_mean)(x)
  assert float(mean) == 3.0 and int(count) == 3
  grad = np.asarray(jax.grad(lambda v: finite_mean(v)[0])(x))
  np.testing.assert_allclose(grad, [1 / 3, 0, 1 / 3, 0, 1 / 3, 0])
  # Averaging over the rows another array keeps (the official trainer's acc).
  acc = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
  mean, count = finite_mean(acc, where=jnp.isfinite(x))
  assert float(mean) == pytest.approx(2 / 3) and int(count) == 3


def test_finite_mean_without_finite_rows_is_nan():
  x = jnp.array([jnp.nan, jnp.inf])
  mean, count = finite_mean(x)
  assert np.isnan(float(mean)) and int(count) == 0
  grad = np.asarray(jax.grad(lambda v: finite_mean(v)[0])(x))
  np.testing.assert_array_equal(grad, 0.0)


def test_batch_loss_shape_errors():
  with pytest.raises(ValueError, match=r"scores \[b, b\].*labels \[b\]"):
    triplet_loss(jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match=r"scores \[b, b\].*labels \[b\]"):
    pairwise_matching_loss(jnp.zeros((3, 3)), jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r"scores \[b, b\].*labels \[b\]"):
    pairwise_accuracy(jnp.zeros(3), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match=r"per_row \[b\]"):
    finite_mean(jnp.zeros((2, 2)))
