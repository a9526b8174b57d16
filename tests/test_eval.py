"""Scoring blocks, a fake model with a known answer, and eval.py end to end."""

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from qaconv_jax import checkpoint
from qaconv_jax.evaluation.scoring import block_shape, pairwise_distance
from qaconv_jax.evaluation.testset import evaluate_testset
from qaconv_jax.models.model import QAConvModel, build_model
from tests.runs import run_python, save_untrained_checkpoint


def test_block_shape_respects_budget():
  bp, bg = block_shape(3368, 15913, 192, 2 * 2**30)
  assert bp * bg * 4 * 2 * 192 * 4 <= 2 * 2**30 and bp * bg > 100_000
  assert block_shape(3, 5, 192, 2 * 2**30) == (3, 5)


def test_block_sizes_never_change_the_numbers(tiny_config, rng):
  model = build_model(tiny_config.model)
  x = jnp.asarray(rng.uniform(size=(2, *tiny_config.data.image_size, 3)), jnp.float32)
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
  # Non-trivial BN statistics, so eval-mode BN is not the identity.
  variables = jax.tree.map(
    lambda a: a + 0.1 * jnp.abs(jnp.asarray(rng.normal(size=a.shape), a.dtype)), variables
  )
  match = jax.jit(lambda p, g: model.apply(variables, p, g, train=False, method=QAConvModel.match))
  maps = rng.normal(size=(23, 4, 2, 32)).astype(np.float32)
  maps /= np.linalg.norm(maps, axis=-1, keepdims=True)
  whole = pairwise_distance(match, maps[:9], maps, block=(9, 23))
  for block in [(1, 1), (4, 7), (9, 5)]:
    np.testing.assert_allclose(
      pairwise_distance(match, maps[:9], maps, block=block), whole, rtol=1e-6, atol=1e-7
    )
  assert whole.shape == (9, 23) and 0 < whole.min() and whole.max() < 1


class FakeSource:
  """Images whose first pixel encodes a feature id; pids/cameras/times as given."""

  def __init__(self, feature_ids, pids, cameras, times):
    self.feature_ids = np.asarray(feature_ids)
    self.pids, self.cameras = np.asarray(pids), np.asarray(cameras)
    self.times = np.asarray(times, np.float64)
    self.names = [f"img{i}" for i in range(len(pids))]

  def __len__(self):
    return len(self.pids)

  def __getitem__(self, i):
    img = np.full((8, 4, 3), self.feature_ids[i], np.uint8)
    return {
      "image": img,
      "pid": int(self.pids[i]),
      "camera": int(self.cameras[i]),
      "time": float(self.times[i]),
      "where": self.names[i],
    }


def test_fake_model_gives_the_known_map():
  # 4 ids; gallery: each id in cameras 1 and 2; queries in camera 0; query 0 looks like
  # id 1. Its ranking: id1, id1, then the rest tied in gallery order: id0, id0, ... so its
  # positives sit at ranks 3 and 4: AP = (1/3 + 2/4) / 2 = 5/12; the others have AP 1.
  gallery = FakeSource(
    np.repeat(np.arange(4), 2), np.repeat(np.arange(4), 2), np.tile([1, 2], 4), np.zeros(8)
  )
  query = FakeSource([1, 1, 2, 3], np.arange(4), np.zeros(4), np.zeros(4))
  embed = jax.jit(
    lambda x: jax.nn.one_hot(jnp.round(x[:, 0, 0, 0] * 255).astype(jnp.int32), 8)[:, None, None, :]
  )
  match = jax.jit(lambda p, g: 100.0 * jnp.einsum("pd,gd->pg", p[:, 0, 0], g[:, 0, 0]) - 50.0)
  cfg = ml_collections.ConfigDict(
    dict(batch_size=3, memory_budget_gb=1e-4, rerank=False, tlift=False, ap_mode="step", topk=3)
  )
  out = evaluate_testset(embed, match, query, gallery, cfg, (8, 4))
  r = out["results"]["QAConv"]
  assert r["mAP"] == pytest.approx(100 * (3 + 5 / 12) / 4)
  assert r["rank1"] == pytest.approx(75.0) and r["rank5"] == pytest.approx(100.0)
  np.testing.assert_array_equal(out["topk"]["QAConv"][0], [2, 3, 0])
  assert set(out["results"]) == {"QAConv"}


def test_tlift_without_reranking_is_its_own_row(rng):
  from qaconv_jax.evaluation.tlift import temporal_lift

  times_q = rng.uniform(0, 300, 6)
  times_g = rng.uniform(0, 300, 12)
  gallery = FakeSource(np.arange(12), np.arange(12) % 4, np.arange(12) % 3, times_g)
  query = FakeSource(np.arange(6), np.arange(6) % 4, (np.arange(6) + 1) % 3, times_q)
  # Feature = image index (one-hot over 18); the matcher reads the indices back, so its
  # logits are a known table whatever the block order.
  table = rng.normal(0, 8, size=(18, 18)).astype(np.float32)
  embed = jax.jit(
    lambda x: jax.nn.one_hot(jnp.round(x[:, 0, 0, 0] * 255).astype(jnp.int32), 18)[:, None, None, :]
  )

  def match(p, g):
    return jnp.asarray(table)[jnp.argmax(p[:, 0, 0], 1)[:, None], jnp.argmax(g[:, 0, 0], 1)]

  gallery.feature_ids = np.arange(12) + 6  # query images are ids 0..5, gallery 6..17
  cfg = ml_collections.ConfigDict(
    dict(
      batch_size=4,
      memory_budget_gb=1e-4,
      rerank=False,
      tlift=True,
      tau=100.0,
      sigma=200.0,
      tlift_k=3,
      alpha=0.2,
      ap_mode="step",
      topk=3,
    )
  )
  out = evaluate_testset(embed, jax.jit(match), query, gallery, cfg, (8, 4))
  assert list(out["results"]) == ["QAConv", "QAConv+TLift"] and out["notes"] == []
  logits = table[:6, 6:]
  np.testing.assert_allclose(
    out["dist"]["QAConv"], 1 - 1 / (1 + np.exp(-logits / 10)), rtol=1e-6, atol=1e-6
  )
  # TLift lifts sigmoid(logit) (the authors' advice for QAConv scores), not sigmoid(logit/10).
  want = 1 - np.asarray(
    temporal_lift(
      1 / (1 + np.exp(-logits)),
      query.cameras,
      times_q,
      gallery.cameras,
      times_g,
      100.0,
      200.0,
      3,
      0.2,
    )
  )
  np.testing.assert_allclose(out["dist"]["QAConv+TLift"], want, rtol=1e-5, atol=1e-6)

  query.times = np.full(6, np.nan)  # a set without time stamps: said, not silently skipped
  out = evaluate_testset(embed, jax.jit(match), query, gallery, cfg, (8, 4))
  assert list(out["results"]) == ["QAConv"]
  assert out["notes"] == ["TLift not applied: this set lacks a time stamp for some images."]


def test_eval_py_end_to_end(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  save_untrained_checkpoint(tiny_config, workdir)
  proc = run_python(
    "eval.py", "--config", "configs/default.py:tiny", "--workdir", workdir, "--visualize", "1"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "QAConv+RR+TLift" in proc.stdout
  assert not re.search(r"^I\d{4} ", proc.stderr, re.M), proc.stderr[-2000:]  # no INFO logs
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    results = json.load(f)
  assert results["step"] == 7 and results["distance"] == "sigmoid"
  assert "step 7, eval.distance=sigmoid" in proc.stdout
  methods = results["testsets"]["synthetic_b"]
  assert list(methods) == ["QAConv", "QAConv+TLift", "QAConv+RR", "QAConv+RR+TLift"]
  for r in methods.values():
    assert 0 <= r["rank1"] <= r["rank5"] <= r["rank10"] <= r["rank20"] <= 100
    assert 0 < r["mAP"] <= 100 and r["num_valid_queries"] > 0
  with open(os.path.join(workdir, "eval", "synthetic_b_top10.json")) as f:
    lists = json.load(f)
  assert len(lists[0]["QAConv"]) == 10 and lists[0]["query"].endswith(".jpg")
  pictures = sorted(os.listdir(os.path.join(workdir, "eval", "pictures")))
  assert pictures == ["synthetic_b_q0000_matches.png", "synthetic_b_q0000_top10.png"]


def test_eval_py_two_stage_with_half_maps_on_disk(tiny_config, tmp_path):
  # eval.py in two-stage mode (docs/method.md §13): float16 maps, the gallery's in a file.
  workdir, maps = str(tmp_path / "run"), str(tmp_path / "maps")
  save_untrained_checkpoint(tiny_config, workdir)
  flags = [
    "--config.eval.testsets=synthetic_b,synthetic_a",  # two sets: nothing carries over
    "--config.eval.sources.synthetic_a.synthetic_ids=12",
    "--config.eval.shortlist=30",
    "--config.eval.shortlist_far=0",
    "--config.eval.map_dtype=float16",
    f"--config.eval.gallery_memmap={maps}",
    "--visualize",
    "1",
  ]
  proc = run_python("eval.py", "--config", "configs/default.py:tiny", "--workdir", workdir, *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 7, eval.distance=sigmoid, two-stage, eval.shortlist=30" in proc.stdout
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    results = json.load(f)
  assert results["shortlist"] == 30
  for testset in ("synthetic_b", "synthetic_a"):
    methods = results["testsets"][testset]
    assert list(methods) == ["QAConv", "QAConv+TLift", "QAConv+RR", "QAConv+RR+TLift"]
    for r in methods.values():
      assert 0 < r["mAP"] <= 100 and r["num_valid_queries"] > 0
  assert os.listdir(maps) == []  # the scratch gallery files are removed after each set
  assert len(os.listdir(os.path.join(workdir, "eval", "pictures"))) == 4


def test_checkpoint_from_another_model_is_refused(tiny_config, tmp_path):
  from qaconv_jax.evaluation.eval_lib import evaluate_checkpoint

  workdir = str(tmp_path / "run")
  save_untrained_checkpoint(tiny_config, workdir, model_overrides={"depth": 34, "neck_dim": 64})
  with pytest.raises(
    checkpoint.CheckpointMismatch,
    match=r"depth: checkpoint 34 vs config 18; neck_dim: checkpoint 64",
  ):
    evaluate_checkpoint(tiny_config, workdir)
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 99"):
    evaluate_checkpoint(tiny_config, workdir, step=99)
