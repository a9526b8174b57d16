"""Graph sampler batches (QAConv 2.1, official reid/utils/data/graph_sampler.py): structure,
neighbours against a loop reference, per-class pointer semantics and input checks."""

import numpy as np
import pytest

from qaconv_jax.data.graph_sampler import class_image_lists, graph_batches, pick_representatives
from qaconv_jax.errors import ConfigError, DataError


def _dataset(sizes):
  """Per-class image lists with disjoint dataset indices, plus ``image -> class``."""
  class_images, owner, start = [], {}, 100
  for c, n in enumerate(sizes):
    images = list(range(start, start + n))
    class_images.append(images)
    owner.update(dict.fromkeys(images, c))
    start += n + 7  # gaps: an index is never mistaken for a class id or a position
  return class_images, owner


def _nearest_ref(dist, m):
  """Per class, the ``m`` other classes by (distance, class id), by a plain sort."""
  c = len(dist)
  return [
    [j for _, j in sorted((float(dist[i, j]), j) for j in range(c) if j != i)[:m]] for i in range(c)
  ]


def _split(batch, owner, k):
  """A batch -> the class of each group of ``k`` consecutive images; each group must be of a
  single class."""
  groups = [batch[g : g + k] for g in range(0, len(batch), k)]
  classes = []
  for group in groups:
    assert len({owner[x] for x in group}) == 1, group
    classes.append(owner[group[0]])
  return classes, groups


def _check_structure(batches, dist, class_images, owner, classes_per_batch, k):
  """Every batch is one anchor (last) after its nearest other classes; returns the batches
  in the order they were built (by anchor)."""
  num_classes = len(class_images)
  assert len(batches) == num_classes
  expected = _nearest_ref(dist, classes_per_batch - 1)
  by_anchor = {}
  for batch in batches:
    assert len(batch) == classes_per_batch * k and all(type(x) is int for x in batch)
    classes, _ = _split(batch, owner, k)
    anchor = classes[-1]
    assert classes[:-1] == expected[anchor]
    assert anchor not in by_anchor
    by_anchor[anchor] = batch
  assert sorted(by_anchor) == list(range(num_classes))
  return [by_anchor[i] for i in range(num_classes)]


def _line_dist(rng, num_classes):
  x = rng.uniform(0.0, 100.0, size=num_classes)
  return np.abs(x[:, None] - x[None, :])


def test_batches_are_anchor_and_nearest_classes(rng):
  sizes = rng.integers(1, 6, size=40)
  class_images, owner = _dataset(sizes)
  dist = _line_dist(rng, 40)
  batches = graph_batches(dist, class_images, 5, 2, seed=3)
  _check_structure(batches, dist, class_images, owner, 5, 2)
  anchors = [_split(b, owner, 2)[0][-1] for b in batches]
  assert anchors != list(range(40))  # the batches are shuffled as wholes


def test_ties_go_to_the_lower_class_id(rng):
  # Small integer distances: many ties, also at the boundary of the neighbour set.
  num_classes = 300
  dist = rng.integers(0, 30, size=(num_classes, num_classes)).astype(np.float32)
  dist = np.minimum(dist, dist.T)
  class_images, owner = _dataset([2] * num_classes)
  batches = graph_batches(dist, class_images, 40, 1, seed=0)
  _check_structure(batches, dist, class_images, owner, 40, 1)
  # Points 0..9 on a line: class i's nearest are i-1 and i+1 (tied), then i-2 and i+2.
  line = np.abs(np.arange(10)[:, None] - np.arange(10)[None, :]).astype(np.float64)
  class_images, owner = _dataset([1] * 10)
  batches = graph_batches(line, class_images, 4, 1, seed=0)
  by_anchor = {owner[b[-1]]: [owner[x] for x in b] for b in batches}
  assert by_anchor[5] == [4, 6, 3, 5]
  assert by_anchor[0] == [1, 2, 3, 0]


def test_deterministic_in_seed(rng):
  class_images, _ = _dataset(rng.integers(1, 6, size=30))
  dist = _line_dist(rng, 30)
  a = graph_batches(dist, class_images, 4, 2, seed=(7, 1))
  assert a == graph_batches(dist, class_images, 4, 2, seed=(7, 1))
  assert a != graph_batches(dist, class_images, 4, 2, seed=(7, 2))
  assert graph_batches(dist, class_images, 4, 2, seed=5) == graph_batches(
    dist, [np.array(c) for c in class_images], 4, 2, seed=5
  )


def _draws(built, owner, k, c):
  """Class ``c``'s images in the order the batches (in build order) read them."""
  stream = []
  for batch in built:
    classes, groups = _split(batch, owner, k)
    for cls, group in zip(classes, groups):
      if cls == c:
        stream.extend(group)
  return stream


@pytest.mark.parametrize("k", [2, 3])
def test_each_class_reads_whole_shuffled_passes(rng, k):
  # Official pointer semantics: a class's reads, in order, are back-to-back passes over its
  # list, each pass a fresh permutation (read to the end, reshuffled, read again).
  sizes = rng.integers(1, 6, size=25)
  class_images, owner = _dataset(sizes)
  dist = _line_dist(rng, 25)
  built = _check_structure(
    graph_batches(dist, class_images, 6, k, 11), dist, class_images, owner, 6, k
  )
  for c, images in enumerate(class_images):
    stream = _draws(built, owner, k, c)
    n = len(images)
    for p in range(0, len(stream) - n + 1, n):
      assert sorted(stream[p : p + n]) == images, (c, stream)
    assert set(stream[len(stream) - len(stream) % n :]) <= set(images)


def test_small_classes_repeat_and_hubs_use_all_images():
  # Class 0 is the nearest class of everyone, so all 10 batches read it.
  num_classes = 10
  x = np.arange(num_classes, dtype=np.float64) * 10.0
  dist = np.abs(x[:, None] - x[None, :])
  dist[0, 1:] = dist[1:, 0] = 0.5
  class_images, owner = _dataset([3, 1] + [4] * 8)
  built = _check_structure(
    graph_batches(dist, class_images, 3, 2, seed=2), dist, class_images, owner, 3, 2
  )
  stream = _draws(built, owner, 2, 0)
  assert len(stream) == 20
  passes = [tuple(stream[p : p + 3]) for p in range(0, 18, 3)]
  assert all(sorted(p) == class_images[0] for p in passes)  # all 3 before any repeat
  assert len(set(passes)) > 1  # reshuffled between passes
  one = class_images[1][0]
  for batch in built:
    classes, groups = _split(batch, owner, 2)
    for cls, group in zip(classes, groups):
      if cls == 1:
        assert group == [one, one]  # a single image fills k = 2


def test_graph_batches_input_errors(rng):
  class_images, _ = _dataset([2, 3, 1, 2])
  dist = _line_dist(rng, 4)
  with pytest.raises(DataError, match=r"\[C, C\] with C = 4"):
    graph_batches(dist[:, :3], class_images, 2, 2, 0)
  with pytest.raises(DataError, match=r"\[C, C\] with C = 4"):
    graph_batches(_line_dist(rng, 5), class_images, 2, 2, 0)
  with pytest.raises(ConfigError, match="at least 2 classes"):
    graph_batches(dist, class_images, 1, 2, 0)
  with pytest.raises(DataError, match="only 4 classes"):
    graph_batches(dist, class_images, 5, 2, 0)
  with pytest.raises(ConfigError, match="k=0"):
    graph_batches(dist, class_images, 2, 0, 0)
  with pytest.raises(DataError, match=r"1 classes have no image \(first: \[2\]\)"):
    graph_batches(dist, [[0], [1], [], [2]], 2, 2, 0)
  with pytest.raises(DataError, match="empty"):
    graph_batches(np.zeros((0, 0)), [], 2, 2, 0)
  bad = dist.copy()
  bad[0, 1] = np.nan
  bad[2, 3] = np.inf
  with pytest.raises(DataError, match="2 non-finite entries off the diagonal"):
    graph_batches(bad, class_images, 2, 2, 0)
  ok = dist.copy()
  np.fill_diagonal(ok, np.nan)  # the diagonal is never used
  assert len(graph_batches(ok, class_images, 4, 2, 0)) == 4
  assert isinstance(DataError("x"), ValueError) and isinstance(ConfigError("x"), ValueError)


def test_class_image_lists():
  lists = class_image_lists(np.array([2, 0, 1, 0, 2, 2]))
  assert [x.tolist() for x in lists] == [[1, 3], [2], [0, 4, 5]]
  assert all(x.dtype == np.int64 for x in lists)
  with pytest.raises(DataError, match=r"1 classes have no image \(first: \[1\]\)"):
    class_image_lists(np.array([0, 2, 2]))
  with pytest.raises(DataError, match=">= 0"):
    class_image_lists(np.array([0, -1]))
  with pytest.raises(DataError, match="integer"):
    class_image_lists(np.array([0.0, 1.0]))


def test_pick_representatives():
  class_images, owner = _dataset([1, 3, 5, 2])
  picks = pick_representatives(class_images, seed=4)
  assert picks.shape == (4,) and picks.dtype == np.int64
  assert [owner[int(p)] for p in picks] == [0, 1, 2, 3]
  np.testing.assert_array_equal(picks, pick_representatives(class_images, seed=4))
  seen = {int(p) for s in range(200) for p in pick_representatives(class_images, seed=(s, 9))}
  assert seen == set(owner)  # every image can be picked
  with pytest.raises(DataError, match="no image"):
    pick_representatives([[1], []], seed=0)
