"""The synthetic persons exercise local matching: look-alike groups, sloppy target detector."""

import dataclasses
import os

import numpy as np

from qaconv_jax.data.synthetic import DOMAINS, make_identity_set, write_market_tree
from qaconv_jax.data.synthetic_persons import random_person, random_uniform, render_person

SIZE = (128, 64)


def _render(person, seed, misalign=0.0, occlude=0.0):
  """A float image on the plain grey background, brightness gain divided out (the corner
  is background in every view: it shows the gain)."""
  rng = np.random.default_rng(seed)
  img = render_person(person, rng, SIZE, misalign=misalign, occlude=occlude, noise=0.0) / 255.0
  return img * 0.35 / img[0, 0]


def _colour_histogram(img):
  q = np.minimum((img * 4).astype(int), 3)
  h = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64)
  return h / h.sum()


def _local_distance(a, b):
  """Mean colour difference of 16 x 8 cells, the better of b and its mirror image (a back
  view mirrors the figure)."""
  cells = lambda x: x.reshape(16, 8, 8, 8, 3).mean(axis=(1, 3))
  return min(np.abs(cells(a) - cells(b)).mean(), np.abs(cells(a) - cells(b[:, ::-1])).mean())


def test_group_members_share_colours_and_differ_in_their_parts():
  rng = np.random.default_rng(0)
  uniforms = [random_uniform(rng) for _ in range(6)]
  groups = [[random_person(rng, u, g) for _ in range(4)] for g, u in enumerate(uniforms)]
  hist_group, hist_other, local_self, local_group = [], [], [], []
  for g, members in enumerate(groups):
    for i, person in enumerate(members):
      img = _render(person, 1)
      local_self.append(_local_distance(img, _render(person, 2)))
      for other in members[i + 1 :]:
        img2 = _render(other, 3)
        hist_group.append(np.abs(_colour_histogram(img) - _colour_histogram(img2)).sum())
        local_group.append(_local_distance(img, img2))
      stranger = _render(groups[(g + 1) % len(groups)][i], 3)
      hist_other.append(np.abs(_colour_histogram(img) - _colour_histogram(stranger)).sum())
  # Global colour statistics barely tell group members apart (measured ~0.20 vs ~0.71)...
  assert np.mean(hist_group) < 0.4 * np.mean(hist_other), (hist_group, hist_other)
  # ... but their parts, region by region, do (measured ~0.059 vs ~0.021 for two views of
  # one person).
  assert np.mean(local_group) > 2.0 * np.mean(local_self), (local_group, local_self)


def test_group_members_differ_in_several_parts():
  rng = np.random.default_rng(1)
  uniform = random_uniform(rng)
  people = [random_person(rng, uniform) for _ in range(40)]
  parts = lambda p: (p.pattern, p.chest[0], p.knees[0], p.bag_side, p.long_hair, p.hat is None)
  assert all(len({part[i] for part in map(parts, people)}) > 1 for i in range(6))
  assert len(set(map(parts, people))) >= 30
  # Every part is coloured from the group's accents: no colour a stranger could not share.
  accents = {tuple(c) for c in uniform.accents}
  for p in people:
    assert {tuple(p.chest[1]), tuple(p.knees[1]), tuple(p.bag), tuple(p.shoes)} <= accents


def _silhouette(img):
  """Rows and columns of the pixels that are not the (flat) background."""
  ys, xs = np.nonzero(np.abs(img - img[0, 0]).sum(-1) > 1e-3)
  return ys.min(), ys.max(), xs.mean()


def test_target_domain_shifts_scales_and_occludes_more():
  a, b = DOMAINS["a"], DOMAINS["b"]
  assert b.misalign > 1.3 * a.misalign and b.occlude > 1.5 * a.occlude
  person = random_person(np.random.default_rng(2), random_uniform(np.random.default_rng(3)))
  stats = {}
  for name, dom in (("a", a), ("b", b)):
    clear = [_render(person, s, dom.misalign) for s in range(150)]
    boxes = np.array([_silhouette(img) for img in clear])
    hidden = []
    for s, img in enumerate(clear):
      body = np.abs(img - img[0, 0]).sum(-1) > 1e-3
      seen = _render(person, s, dom.misalign, dom.occlude)  # same seed: same figure and view
      hidden.append((np.abs(seen - img).sum(-1) > 1e-3)[body].mean())
    hidden = np.array(hidden)
    stats[name] = dict(
      shift=boxes[:, 2].std(),  # horizontal position of the figure
      height=(boxes[:, 1] - boxes[:, 0]).std(),  # visible height: scale changes and crops
      occluded=(hidden > 0.05).mean(),  # images with a part of the body hidden
      part=hidden[hidden > 0.05].mean(),  # how much of the body then
    )
  # The renders follow the knobs: the detector jitter scales with misalign...
  for key in ("shift", "height"):
    ratio = stats["b"][key] / stats["a"][key]
    assert 0.8 < ratio / (b.misalign / a.misalign) < 1.25, stats
  # ... occluders come at the domain's rate and hide a real part of the body, never all.
  for name, dom in (("a", a), ("b", b)):
    assert abs(stats[name]["occluded"] - dom.occlude) < 0.08, stats
    assert 0.1 < stats[name]["part"] < 0.6, stats


def test_identity_set_is_deterministic_and_grouped_on_request():
  images, labels = make_identity_set(6, 3, seed=5, size=(64, 32))
  again, _ = make_identity_set(6, 3, seed=5, size=(64, 32))
  assert images.shape == (18, 64, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(6), 3))
  # group_size=2: identities 2k and 2k+1 wear one uniform, so their colours are closer
  # (measured 0.40 vs 0.71; about equal without groups).
  images, labels = make_identity_set(8, 6, seed=0, group_size=2)
  hists = np.stack([_colour_histogram(img / 255.0) for img in images])
  mean = np.stack([hists[labels == i].mean(0) for i in range(8)])
  dist = np.abs(mean[:, None] - mean[None]).sum(-1)
  mates = [dist[i, i ^ 1] for i in range(8)]
  strangers = [dist[i, j] for i in range(8) for j in range(8) if j // 2 != i // 2]
  assert np.mean(mates) < 0.7 * np.mean(strangers), (mates, strangers)


def test_the_chest_and_knee_patches_are_drawn_where_they_belong():
  """Two members alike but for the chest patch differ on the chest only; alike but for the
  knees, on the legs only (a renderer that dropped the patches would make them equal)."""
  rng = np.random.default_rng(4)
  uniform = random_uniform(rng)
  base = random_person(rng, uniform)
  other = lambda part: tuple(
    c for c in uniform.accents if not np.array_equal(c, getattr(base, part)[1])
  )[0]
  chest = dataclasses.replace(base, chest=(base.chest[0], other("chest")))  # colour only
  knees = dataclasses.replace(base, knees=(base.knees[0], other("knees")))
  img = _render(base, 7)
  rows = lambda a, b: np.abs(a - b).sum(-1).mean(axis=1)  # [H] difference per image row
  d_chest, d_knees = rows(img, _render(chest, 7)), rows(img, _render(knees, 7))
  top, bottom = slice(0, SIZE[0] // 2), slice(SIZE[0] // 2, SIZE[0])
  assert d_chest[top].sum() > 0.05 and d_chest[bottom].sum() < 0.2 * d_chest[top].sum()
  assert d_knees[bottom].sum() > 0.05 and d_knees[top].sum() < 0.2 * d_knees[bottom].sum()


def test_a_written_tree_keeps_groups_whole_on_each_side(tmp_path):
  from qaconv_jax.data.datasets import load_dataset

  write_market_tree(str(tmp_path), "a", 60, seed=0)
  ds = load_dataset("market1501", str(tmp_path))
  size = DOMAINS["a"].group_size
  raw = lambda records: {int(os.path.basename(r.path).split("_")[0]) for r in records}
  train = raw(ds.train)
  test = {p for p in raw(ds.query + ds.gallery) if p > 0}  # 0: distractors
  groups = lambda pids: {(p - DOMAINS["a"].pid_base - 1) // size for p in pids}
  assert len(groups(train) & groups(test)) <= 1  # only the group the half-way cut falls in
  assert len(train) == 30 and len(groups(train)) >= 30 // size
