"""The fused Pallas matcher (interpret mode) against the XLA tiles and a float64 loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from qaconv_jax.models import matching
from qaconv_jax.models import matching_pallas as mp
from tests.conftest import random_unit_maps


def _flat_maps(rng, n, h, w, d):
  """``[n, h*w, d]`` unit maps."""
  return random_unit_maps(rng, n, h, w, d).reshape(n, h * w, d)


def _xla(probe, gallery, block=(4, 4)):
  return matching._tiled(
    matching._maxima_and_indices_tile, jnp.asarray(probe), jnp.asarray(gallery), block
  )


def _assert_same(got, want):
  (m, i), (rm, ri) = got, want
  assert m.dtype == jnp.float32 and i.dtype == jnp.int32 and m.shape == rm.shape
  np.testing.assert_allclose(np.asarray(m), np.asarray(rm), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))


@pytest.mark.parametrize(
  "h, w, d, p, g",
  [
    (4, 2, 32, 5, 7),  # hw 8 -> padded to 16: masked locations; ragged p and g
    (24, 8, 32, 5, 7),  # hw 192: 3 x 3 chunks of 64 folded together
    (24, 8, 128, 3, 2),
  ],
)
def test_matches_xla_path(rng, h, w, d, p, g):
  probe, gallery = _flat_maps(rng, p, h, w, d), _flat_maps(rng, g, h, w, d)
  got = mp.pallas_maxima(probe, gallery, block=(4, 4), with_indices=True, interpret=True)
  _assert_same(got, _xla(probe, gallery))


def test_bfloat16_matches_xla_path_on_same_inputs(rng):
  probe = jnp.asarray(_flat_maps(rng, 3, 24, 8, 32), jnp.bfloat16)
  gallery = jnp.asarray(_flat_maps(rng, 5, 24, 8, 32), jnp.bfloat16)
  got = mp.pallas_maxima(probe, gallery, block=(2, 4), with_indices=True, interpret=True)
  _assert_same(got, _xla(probe, gallery))


def test_maxima_alone(rng):
  probe, gallery = _flat_maps(rng, 5, 4, 2, 32), _flat_maps(rng, 7, 4, 2, 32)
  got = mp.pallas_maxima(probe, gallery, block=(4, 4), with_indices=False, interpret=True)
  assert isinstance(got, jnp.ndarray) and got.shape == (5, 7, 16)
  np.testing.assert_allclose(got, _xla(probe, gallery)[0], rtol=1e-6, atol=1e-6)


def test_exact_ties_take_the_first_location(rng):
  hw = 192  # chunks [0, 64), [64, 128), [128, 192): ties within and across chunks
  probe, gallery = _flat_maps(rng, 2, 24, 8, 32), _flat_maps(rng, 3, 24, 8, 32)
  probe[:, 12] = probe[:, 150] = probe[:, 10]
  gallery[:, 7] = probe[0, 10]  # gallery r = 7 matches s in {10, 12, 150} exactly
  gallery[:, 100] = gallery[:, 3]
  probe[0, 20] = gallery[0, 3]  # probe s = 20 of pair (0, 0) matches r in {3, 100}
  got = mp.pallas_maxima(probe, gallery, block=(1, 2), with_indices=True, interpret=True)
  _assert_same(got, _xla(probe, gallery))
  maxima, idx = map(np.asarray, got)
  assert np.all(idx[0, :, 7] == 10) and np.all(maxima[0, :, 7] == maxima[0, 0, 7])
  assert idx[0, 0, hw + 20] == 3
  assert not np.isin(idx[..., :hw], [12, 150]).any() and not (idx[..., hw:] == 100).any()


def test_nan_maps_to_the_last_location_like_xla(rng):
  probe, gallery = _flat_maps(rng, 1, 4, 2, 32), _flat_maps(rng, 2, 4, 2, 32)
  probe[0, 3, 0] = np.nan
  got = mp.pallas_maxima(probe, gallery, with_indices=True, interpret=True)
  (m, i), (rm, ri) = got, _xla(probe, gallery)
  np.testing.assert_allclose(np.asarray(m), np.asarray(rm), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))
  assert np.all(np.asarray(i)[0, :, :8] == 7)


def test_float64_loop_reference(rng):
  p, g, hw = 2, 3, 8
  probe, gallery = _flat_maps(rng, p, 4, 2, 32), _flat_maps(rng, g, 4, 2, 32)
  want_m, want_i = np.zeros((p, g, 2 * hw)), np.zeros((p, g, 2 * hw), np.int64)
  for i in range(p):
    for j in range(g):
      s = probe[i].astype(np.float64) @ gallery[j].astype(np.float64).T  # [hw(s), hw(r)]
      for r in range(hw):  # gallery-indexed: best probe location, first on ties
        best = 0
        for k in range(1, hw):
          best = k if s[k, r] > s[best, r] else best
        want_m[i, j, r], want_i[i, j, r] = s[best, r], best
      for k in range(hw):  # probe-indexed: best gallery location
        best = 0
        for r in range(1, hw):
          best = r if s[k, r] > s[k, best] else best
        want_m[i, j, hw + k], want_i[i, j, hw + k] = s[k, best], best
  m, idx = mp.pallas_maxima(probe, gallery, block=(2, 2), with_indices=True, interpret=True)
  np.testing.assert_allclose(np.asarray(m), want_m, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(idx), want_i)


@pytest.mark.parametrize(
  "backend, hw, d, want",
  [
    ("cpu", 8, 32, (16, 32, 16)),
    ("gpu", 128, 32, (128, 32, 64)),
    ("gpu", 192, 128, (192, 128, 64)),
    ("gpu", 40, 20, (48, 32, 16)),
    ("tpu", 8, 32, (128, 128, 128)),
    ("tpu", 192, 128, (256, 128, 256)),
  ],
)
def test_padding_plan(backend, hw, d, want):
  tp, tg, p_pad, g_pad, hw_pad, d_pad, chunk = mp._plan(5, 7, hw, d, (4, 4), backend)
  assert (hw_pad, d_pad, chunk) == want
  assert (tp, p_pad) == (4, 8)
  assert (tg, g_pad) == ((7, 7) if backend == "tpu" else (4, 8))  # Mosaic: 8k or the full dim


def test_tpu_layout_in_interpret_mode(rng, monkeypatch):
  plan = mp._plan
  monkeypatch.setattr(mp, "_plan", lambda *a: plan(*a[:-1], "tpu"))
  probe, gallery = _flat_maps(rng, 3, 4, 2, 32), _flat_maps(rng, 10, 4, 2, 32)
  got = mp._pallas_maxima(
    probe,
    gallery,
    block=(2, 4),
    with_indices=True,
    interpret=True,
    precision=None,
    backend="tpu-in-interpret-mode",  # a fresh jit cache key for the patched plan
  )
  _assert_same(got, _xla(probe, gallery))


def test_evaluation_scores_through_the_kernel(rng):
  """`pairwise_distance` runs the match function under shard_map: the kernel works there."""
  import jax

  from qaconv_jax.evaluation.scoring import pairwise_distance
  from qaconv_jax.models.matching import match_maxima

  probe, gallery = random_unit_maps(rng, 5, 4, 2, 16), random_unit_maps(rng, 9, 4, 2, 16)
  dist = {
    impl: pairwise_distance(
      jax.jit(lambda p, g, impl=impl: match_maxima(p, g, impl=impl, block=(4, 4)).mean(-1)),
      probe,
      gallery,
      block=(3, 4),
    )
    for impl in ("xla", "pallas")
  }
  np.testing.assert_allclose(dist["pallas"], dist["xla"], rtol=0, atol=1e-7)
