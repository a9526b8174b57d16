"""Independent float64 NumPy references written from docs/method.md, deliberately loop-based."""

import numpy as np


def match_maxima_ref(probe, gallery):
  """docs/method.md §2: ``[p, h, w, d] x [g, h, w, d]`` -> ``[p, g, 2hw]`` maxima and their
  argmax indices ``[p, g, 2hw]``."""
  p, h, w, d = probe.shape
  g = gallery.shape[0]
  hw = h * w
  out = np.zeros((p, g, 2 * hw))
  idx = np.zeros((p, g, 2 * hw), np.int64)
  for i in range(p):
    pi = probe[i].reshape(hw, d).astype(np.float64)
    for j in range(g):
      gj = gallery[j].reshape(hw, d).astype(np.float64)
      s = np.zeros((hw, hw))
      for a in range(hw):
        for b in range(hw):
          s[a, b] = np.dot(pi[a], gj[b])
      out[i, j, :hw] = s.max(axis=0)  # best probe location for each gallery location
      idx[i, j, :hw] = s.argmax(axis=0)
      out[i, j, hw:] = s.max(axis=1)  # best gallery location for each probe location
      idx[i, j, hw:] = s.argmax(axis=1)
  return out, idx


def scalar_bn_ref(x, scale, bias, mean, var, train, momentum=0.1, eps=1e-5):
  """PyTorch BatchNorm1d(1) over every value. Returns (y, new_mean, new_var)."""
  x = np.asarray(x, np.float64)
  if train:
    m = x.sum() / x.size
    v = ((x - m) ** 2).sum() / x.size
    new_mean = (1 - momentum) * mean + momentum * m
    new_var = (1 - momentum) * var + momentum * v * x.size / (x.size - 1)
  else:
    m, v, new_mean, new_var = mean, var, mean, var
  return (x - m) / np.sqrt(v + eps) * scale + bias, new_mean, new_var


def focal_loss_ref(logits, labels, valid, gamma=2.0):
  b, c = logits.shape
  out = np.zeros(b)
  for i in range(b):
    for k in range(c):
      p = 1.0 / (1.0 + np.exp(-float(logits[i, k])))
      p_hat = p if k == labels[i] else 1.0 - p
      out[i] += float(valid[k]) * -((1.0 - p_hat) ** gamma) * np.log(p_hat)
  return out


def reciprocal_v_ref(dp, fwd, k1, k2):
  """Re-ranking's V (docs/method.md §6) as float64 loops: ``dp [N, N]`` = D' and ``fwd[i]``
  each row's neighbours, nearest first (at least k1 + 1). k-reciprocal sets, expansion at
  round(k1 / 2), softmax(-D') over the union, then query expansion over k2."""
  n = len(dp)

  def krecip(i, k):
    return np.array([j for j in fwd[i][: k + 1] if i in fwd[j][: k + 1]])

  v = np.zeros((n, n))
  for i in range(n):
    r = krecip(i, k1)
    expansion = list(r)
    for j in r:
      c = krecip(j, int(np.around(k1 / 2)))
      if len(np.intersect1d(c, r)) > 2 / 3 * len(c):
        expansion.extend(c)
    expansion = np.unique(expansion)
    w = np.exp(-dp[i, expansion])
    v[i, expansion] = w / w.sum()
  if k2 > 1:
    v = np.stack([v[list(fwd[i][:k2])].mean(axis=0) for i in range(n)])
  return v
