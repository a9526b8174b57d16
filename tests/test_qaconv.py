"""The matcher and both heads against float64 loop references (docs/method.md §2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qaconv_jax.models.qaconv import (
  QAConv,
  match_maxima,
  match_maxima_with_indices,
  qaconv_distance,
  qaconv_score,
)
from tests.conftest import random_unit_maps, tolerance
from tests.reference import match_maxima_ref, scalar_bn_ref


@pytest.mark.parametrize(
  "block, impl",
  [(None, "xla"), ((1, 1), "xla"), ((2, 3), "xla"), ((4, 16), "xla"), ((64, 64), "xla")]
  + [((2, 3), "pallas"), ((64, 64), "pallas")],
)
def test_match_maxima_matches_loop_reference(rng, block, impl):
  probe = random_unit_maps(rng, 5, 3, 2, 8)
  gallery = random_unit_maps(rng, 7, 3, 2, 8)
  want, _ = match_maxima_ref(probe, gallery)
  got = jax.jit(lambda a, b: match_maxima(a, b, block=block, impl=impl))(probe, gallery)
  assert got.shape == (5, 7, 12) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=tolerance(2e-6, 1e-5))


def test_match_maxima_gallery_half_first(rng):
  # A probe whose every location equals gallery location 0: the gallery-indexed half is
  # 1 only at r = 0; the probe-indexed half is 1 everywhere.
  gallery = random_unit_maps(rng, 1, 2, 3, 16)
  probe = np.broadcast_to(gallery[:, :1, :1], gallery.shape).copy()
  got = np.asarray(match_maxima(probe, gallery))[0, 0]
  np.testing.assert_allclose(got[6:], 1.0, atol=1e-6)
  assert abs(got[0] - 1.0) < 1e-6 and np.all(got[1:6] < 0.999)


@pytest.mark.parametrize("block", [None, (2, 2)])
def test_match_maxima_indices_are_the_correspondences(rng, block):
  probe = random_unit_maps(rng, 3, 4, 2, 6)
  gallery = random_unit_maps(rng, 4, 4, 2, 6)
  want_max, want_idx = match_maxima_ref(probe, gallery)
  got_max, got_idx = match_maxima_with_indices(probe, gallery, block=block)
  assert got_idx.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got_idx), want_idx)
  np.testing.assert_allclose(np.asarray(got_max), want_max, atol=tolerance(2e-6, 1e-5))


def _maxima_grads_ref(probe, gallery, cot):
  """d(sum(cot * maxima)) w.r.t. probe and gallery, from the argmax correspondences."""
  p, h, w, d = probe.shape
  hw = h * w
  _, idx = match_maxima_ref(probe, gallery)
  pf, gf = probe.reshape(p, hw, d), gallery.reshape(-1, hw, d)
  d_p, d_g = np.zeros(pf.shape), np.zeros(gf.shape)
  for i in range(p):
    for j in range(gf.shape[0]):
      for r in range(hw):  # gallery-indexed maximum: P[i, s*] . G[j, r]
        s_star = idx[i, j, r]
        d_p[i, s_star] += cot[i, j, r] * gf[j, r]
        d_g[j, r] += cot[i, j, r] * pf[i, s_star]
      for s in range(hw):  # probe-indexed maximum: P[i, s] . G[j, r*]
        r_star = idx[i, j, hw + s]
        d_p[i, s] += cot[i, j, hw + s] * gf[j, r_star]
        d_g[j, r_star] += cot[i, j, hw + s] * pf[i, s]
  return d_p.reshape(probe.shape), d_g.reshape(gallery.shape)


@pytest.mark.parametrize(
  "block, impl",
  [(None, "xla"), ((2, 3), "xla"), ((3, 2), "xla"), ((8, 16), "xla"), ((3, 2), "pallas")],
)
def test_match_maxima_gradients_through_tiles(rng, block, impl):
  probe = random_unit_maps(rng, 4, 2, 2, 5)
  gallery = random_unit_maps(rng, 5, 2, 2, 5)
  cot = rng.normal(size=(4, 5, 8)).astype(np.float32)
  loss = lambda x, y: jnp.sum(cot * match_maxima(x, y, block=block, impl=impl))
  d_p, d_g = jax.jit(jax.grad(loss, argnums=(0, 1)))(probe, gallery)
  want_p, want_g = _maxima_grads_ref(probe, gallery, cot)
  np.testing.assert_allclose(np.asarray(d_p), want_p, atol=1e-5)
  np.testing.assert_allclose(np.asarray(d_g), want_g, atol=1e-5)
  # One side only (training differentiates the batch, never the memory): the backward
  # pass skips the other side and must still give the same numbers.
  only_p = jax.jit(jax.grad(lambda x: loss(x, jax.lax.stop_gradient(gallery))))(probe)
  only_g = jax.jit(jax.grad(loss, argnums=1))(probe, gallery)
  np.testing.assert_allclose(np.asarray(only_p), want_p, atol=1e-5)
  np.testing.assert_allclose(np.asarray(only_g), want_g, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_match_maxima_gradient_goes_to_first_argmax_on_ties(impl):
  # Two identical probe locations tie for every gallery location: like PyTorch's
  # max(dim), the whole gradient goes to the first one.
  gallery = jnp.asarray(np.eye(2, 4, dtype=np.float32).reshape(1, 1, 2, 4))
  probe = jnp.asarray(np.array([[1, 0, 0, 0], [1, 0, 0, 0]], np.float32).reshape(1, 1, 2, 4))
  grad = jax.grad(lambda x: jnp.sum(match_maxima(x, gallery, impl=impl)[..., :2]))(probe)
  np.testing.assert_allclose(np.asarray(grad).reshape(2, 4), [[1, 1, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
  "probe_shape, gallery_shape, message",
  [
    ((2, 3, 2, 8), (2, 3, 2, 4), r"share \(h, w, d\)"),
    ((2, 3, 2, 8), (2, 2, 3, 8), r"share \(h, w, d\)"),
    ((2, 6, 8), (2, 6, 8), r"\[n, h, w, d\]"),
  ],
)
def test_match_maxima_shape_errors(probe_shape, gallery_shape, message):
  with pytest.raises(ValueError, match=message):
    match_maxima(jnp.zeros(probe_shape), jnp.zeros(gallery_shape))


def _random_head_variables(rng, head, hw):
  fan_in = 2 * hw if head == "v1" else hw
  return {
    "params": {
      "bn": {"scale": np.float32(rng.uniform(0.5, 2)), "bias": np.float32(rng.normal())},
      "fc": {
        "kernel": rng.normal(size=(fan_in, 1)).astype(np.float32),
        "bias": rng.normal(size=(1,)).astype(np.float32),
      },
      "logit_bn": {"scale": np.float32(rng.uniform(0.5, 2)), "bias": np.float32(rng.normal())},
    },
    "batch_stats": {
      "bn": {"mean": np.float32(rng.normal() * 0.1), "var": np.float32(rng.uniform(0.5, 2))},
      "logit_bn": {"mean": np.float32(rng.normal()), "var": np.float32(rng.uniform(1, 3))},
    },
  }


def _head_ref(probe, gallery, variables, head, train):
  x, _ = match_maxima_ref(probe, gallery)
  hw = x.shape[-1] // 2
  par, st = variables["params"], variables["batch_stats"]
  x, bn_mean, bn_var = scalar_bn_ref(
    x, par["bn"]["scale"], par["bn"]["bias"], st["bn"]["mean"], st["bn"]["var"], train
  )
  k, b = par["fc"]["kernel"][:, 0].astype(np.float64), float(par["fc"]["bias"][0])
  logits = np.zeros(x.shape[:2])
  for i in range(x.shape[0]):
    for j in range(x.shape[1]):
      if head == "v1":
        logits[i, j] = np.dot(x[i, j], k) + b
      else:
        logits[i, j] = (np.dot(x[i, j, :hw], k) + b) + (np.dot(x[i, j, hw:], k) + b)
  y, lm, lv = scalar_bn_ref(
    logits,
    par["logit_bn"]["scale"],
    par["logit_bn"]["bias"],
    st["logit_bn"]["mean"],
    st["logit_bn"]["var"],
    train,
  )
  return y, {"bn": (bn_mean, bn_var), "logit_bn": (lm, lv)}


@pytest.mark.parametrize("head", ["v1", "v2"])
@pytest.mark.parametrize("train", [False, True])
def test_qaconv_head_matches_reference(rng, head, train):
  probe = random_unit_maps(rng, 4, 3, 2, 8)
  gallery = random_unit_maps(rng, 6, 3, 2, 8)
  module = QAConv(head=head, block=(2, 4))
  variables = _random_head_variables(rng, head, hw=6)
  want, want_stats = _head_ref(probe, gallery, variables, head, train)
  if train:
    got, updates = module.apply(variables, probe, gallery, train=True, mutable=["batch_stats"])
    for name, (mean, var) in want_stats.items():
      np.testing.assert_allclose(float(updates["batch_stats"][name]["mean"]), mean, rtol=1e-5)
      np.testing.assert_allclose(float(updates["batch_stats"][name]["var"]), var, rtol=1e-5)
  else:
    got = module.apply(variables, probe, gallery, train=False)
  assert got.shape == (4, 6)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_qaconv_init_names_and_shapes():
  module = QAConv(head="v1")
  x = jnp.zeros((2, 3, 2, 4))
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x, x, train=False))
  shapes = jax.tree.map(lambda a: a.shape, variables)
  assert shapes == {
    "params": {
      "bn": {"scale": (), "bias": ()},
      "fc": {"kernel": (12, 1), "bias": (1,)},
      "logit_bn": {"scale": (), "bias": ()},
    },
    "batch_stats": {"bn": {"mean": (), "var": ()}, "logit_bn": {"mean": (), "var": ()}},
  }


def test_v2_head_is_symmetric_in_eval(rng):
  a = random_unit_maps(rng, 3, 3, 2, 8)
  b = random_unit_maps(rng, 5, 3, 2, 8)
  module = QAConv(head="v2")
  variables = module.init(jax.random.key(0), a, b, train=False)
  ab = module.apply(variables, a, b, train=False)
  ba = module.apply(variables, b, a, train=False)
  np.testing.assert_allclose(np.asarray(ab), np.asarray(ba).T, rtol=1e-5, atol=1e-6)
  # v1 is not symmetric: its two halves have their own weights.
  v1 = QAConv(head="v1")
  v1_vars = v1.init(jax.random.key(0), a, b, train=False)
  asym = np.abs(
    np.asarray(v1.apply(v1_vars, a, b, train=False))
    - np.asarray(v1.apply(v1_vars, b, a, train=False)).T
  ).max()
  assert asym > 1e-3


def test_default_init_follows_pytorch(rng):
  x = jnp.asarray(random_unit_maps(rng, 2, 4, 2, 8))
  v1 = QAConv(head="v1").init(jax.random.key(3), x, x, train=False)["params"]["fc"]
  bound = 1 / np.sqrt(16)
  assert np.abs(np.asarray(v1["kernel"])).max() <= bound and np.std(v1["kernel"]) > bound / 4
  v2 = QAConv(head="v2").init(jax.random.key(3), x, x, train=False)["params"]["fc"]
  np.testing.assert_allclose(np.asarray(v2["kernel"]), 1 / 8)


def test_score_and_distance():
  logits = jnp.array([-20.0, 0.0, 10.0])
  np.testing.assert_allclose(
    np.asarray(qaconv_score(logits)), 1 / (1 + np.exp(-np.array([-2.0, 0.0, 1.0]))), rtol=1e-6
  )
  np.testing.assert_allclose(np.asarray(qaconv_distance(logits) + qaconv_score(logits)), 1.0)
