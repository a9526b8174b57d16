"""Ranking metrics against a float64 per-query loop written from docs/method.md §5."""

import numpy as np
import pytest

from qaconv_jax.evaluation.metrics import evaluate_ranking


def metrics_ref(dist, qp, gp, qc, gc, max_rank, ap_mode):
  cmc = np.zeros(max_rank)
  aps, inps = [], []
  for q in range(dist.shape[0]):
    order = np.argsort(dist[q].astype(np.float64), kind="stable")
    keep = ~((gp[order] == qp[q]) & (gc[order] == qc[q]))
    matches = gp[order[keep]] == qp[q]
    if not matches.any():
      continue
    first = int(np.argmax(matches))
    if first < max_rank:
      cmc[first:] += 1
    hits = np.flatnonzero(matches)
    if ap_mode == "step":
      aps.append(np.mean([(i + 1) / (pos + 1) for i, pos in enumerate(hits)]))
    else:  # the Market-1501 devkit loop
      ap, old_recall, old_precision, inter = 0.0, 0.0, 1.0, 0
      for j, m in enumerate(matches):
        inter += int(m)
        recall, precision = inter / len(hits), inter / (j + 1)
        ap += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision = recall, precision
      aps.append(ap)
    inps.append(len(hits) / (hits[-1] + 1))
  n = len(aps)
  return cmc / n, float(np.mean(aps)), float(np.mean(inps)), n


@pytest.mark.parametrize("ap_mode", ["step", "trapezoid"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference_with_ties(ap_mode, seed):
  rng = np.random.default_rng(seed)
  p, g = 40, 120
  dist = (rng.integers(0, 6, (p, g)) / 5.0).astype(np.float32)  # many exact ties
  qp, gp = rng.integers(1, 9, p), rng.integers(0, 9, g)  # pid 0 = distractors
  qc, gc = rng.integers(0, 3, p), rng.integers(0, 3, g)
  qp[0], qc[0] = 50, 0  # a query whose only positive is in its own camera: skipped
  gp[5], gc[5] = 50, 0
  got = evaluate_ranking(dist, qp, gp, qc, gc, max_rank=20, ap_mode=ap_mode, chunk=7)
  cmc, m_ap, m_inp, n = metrics_ref(dist, qp, gp, qc, gc, 20, ap_mode)
  assert got["num_valid_queries"] == n < p
  assert np.isnan(got["ap"][0])
  np.testing.assert_allclose(got["cmc"], cmc, atol=1e-12)
  assert got["mAP"] == pytest.approx(m_ap, abs=1e-12)
  assert got["mINP"] == pytest.approx(m_inp, abs=1e-12)


def test_hand_made_case():
  # Query pid 1, camera 0. Gallery by distance: pid1/cam0 (removed), pid2, pid1/cam1,
  # pid3, pid1/cam2 -> kept ranking: miss, HIT, miss, HIT.
  dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]], np.float32)
  gp, gc = np.array([1, 2, 1, 3, 1]), np.array([0, 0, 1, 0, 2])
  r = evaluate_ranking(dist, np.array([1]), gp, np.array([0]), gc, max_rank=4)
  np.testing.assert_allclose(r["cmc"], [0, 1, 1, 1])
  assert r["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
  assert r["mINP"] == pytest.approx(2 / 4)
  trap = evaluate_ranking(dist, np.array([1]), gp, np.array([0]), gc, ap_mode="trapezoid")
  assert trap["mAP"] == pytest.approx(((0 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2)


def test_ties_break_by_gallery_order():
  dist = np.zeros((1, 3), np.float32)  # all tied: the earlier column ranks first
  r = evaluate_ranking(
    dist, np.array([1]), np.array([2, 1, 1]), np.array([0]), np.array([1, 1, 1]), max_rank=3
  )
  np.testing.assert_allclose(r["cmc"], [0, 1, 1])
  assert r["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)


@pytest.mark.parametrize(
  "args, message",
  [
    ((np.zeros((2, 3)), [1, 2], [1, 2], [0, 0], [1, 1, 1]), "gallery_pids must have length 3"),
    ((np.zeros((2, 3)), [1], [1, 2, 3], [0, 0], [1, 1, 1]), "query_pids must have length 2"),
    (
      (np.array([[0.0, np.nan]]), [1], [1, 2], [0], [1, 1]),
      r"NaN/Inf \(first at query 0, gallery 1\)",
    ),
    ((np.zeros((1, 0)), [1], [], [0], []), "empty query or gallery"),
    ((np.zeros((1, 2)), [1], [1, 2], [0], [0, 0]), "no query has a valid positive"),
  ],
)
def test_bad_input(args, message):
  dist, qp, gp, qc, gc = (np.asarray(a) for a in args)
  with pytest.raises(ValueError, match=message):
    evaluate_ranking(dist, qp, gp, qc, gc)
