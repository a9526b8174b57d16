"""QAConv 2.1 training (docs/method.md §12): the pair-loss step, frozen BN, the graph step
with a fake model whose answer is known, a tiny run, exact resume mid-epoch, the adaptive
stop."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from configs.gs_market import get_config
from qaconv_jax import checkpoint
from qaconv_jax.data.graph_sampler import class_image_lists
from qaconv_jax.graph_step import epoch_graph
from qaconv_jax.losses import finite_mean, pairwise_matching_loss, triplet_loss
from qaconv_jax.models.model import build_model
from qaconv_jax.optim import make_optimizer
from qaconv_jax.train_state import create_train_state
from qaconv_jax.train_step import make_train_step
from qaconv_jax.training import train_and_evaluate
from tests.runs import checkpoint_leaves, tiny_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**overrides):
  return tiny_run_config(get_config, **overrides)


_leaves = checkpoint_leaves


def _fresh_state(cfg, num_classes=8):
  model = build_model(cfg.model)
  tx = make_optimizer(cfg.optim, 10, cfg.num_epochs)
  shape = tuple(cfg.data.image_size)
  return model, create_train_state(model, tx, jax.random.key(0), shape, num_classes, cfg.loss)


@pytest.mark.parametrize(
  "freeze_bn, loss", [(True, "triplet"), (False, "triplet"), (True, "pairwise_matching")]
)
def test_pair_step_loss_and_which_bn_statistics_move(freeze_bn, loss, tiny_data):
  cfg = _cfg(freeze_bn=freeze_bn, **{"loss.name": loss})
  model, state = _fresh_state(cfg)
  assert state.class_memory is None  # no memory for a pair loss
  images, labels = tiny_data
  pick = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(8)])  # 8 x K=2
  batch = {"image": jnp.asarray(images[pick]), "label": jnp.asarray(labels[pick])}
  step = make_train_step(cfg.loss, freeze_bn=freeze_bn)
  rng = jax.random.key(1)
  before = jax.tree.map(np.asarray, state.batch_stats)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  (_, scores), _ = model.apply(
    variables,
    batch["image"],
    train=True,
    embed_train=not freeze_bn,
    mutable=["batch_stats"],
    rngs={"dropout": jax.random.fold_in(rng, 0)},
  )
  if loss == "triplet":
    rows = triplet_loss(scores, batch["label"], cfg.loss.margin)[0]
  else:
    rows = pairwise_matching_loss(scores, batch["label"])
  want = float(finite_mean(rows)[0])
  new, metrics = step(state, batch, rng)
  assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
  assert float(metrics["finite_rows"]) == 16
  after = jax.tree.map(np.asarray, new.batch_stats)
  moved = lambda name: any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name]))
  )
  assert moved("qaconv")  # the matcher's BN always trains
  assert moved("backbone") != freeze_bn  # frozen: the running statistics stay as they were
  assert int(new.step) == 1


def test_graph_step_pairs_each_class_with_its_nearest_under_the_model():
  """A fake model whose distances are known: image i of class c embeds to the constant map
  ``x_c`` and matching scores ``-|x_p - x_g|``; classes sit on a line, so each class's
  nearest classes are its neighbours on it."""
  num_classes, per_class = 12, 3
  positions = np.random.default_rng(0).permutation(num_classes) * 1.0  # class -> place on line
  pids = np.repeat(np.arange(num_classes), per_class)

  class Source:
    def __len__(self):
      return len(pids)

    def __getitem__(self, i):
      return {"image": np.full((8, 4, 3), positions[pids[i]], np.uint8), "where": str(i)}

  source = Source()  # with the sources' per-image arrays
  source.pids, source.cameras, source.times = pids, np.zeros_like(pids), np.zeros(len(pids))
  source.names = [str(i) for i in range(len(pids))]

  import qaconv_jax.evaluation.scoring as scoring

  def embed(images):  # [B, H, W, 3] in [0, 1] -> [B, 2, 1, 1], the class position
    return images[:, :2, :1, :1] * 255.0

  def match(probe, gallery):
    return -jnp.abs(probe[:, None, 0, 0, 0] - gallery[None, :, 0, 0, 0])  # [p, g]

  cfg = _cfg()
  cfg.data.update(image_size=(8, 4), batch_size=8, pk_k=2)  # 4 classes per batch
  original = scoring.eval_image
  scoring.eval_image = lambda src, i, size: src[int(i)]["image"]  # no decoding: raw maps
  try:
    g = epoch_graph(
      jax.jit(embed), jax.jit(match), source, class_image_lists(pids), cfg.data, cfg.eval, 0, 0
    )
  finally:
    scoring.eval_image = original
  assert g.batches.shape == (num_classes, 8)
  anchors = []
  for batch in g.batches:
    classes = pids[batch].reshape(4, 2)
    assert (classes[:, 0] == classes[:, 1]).all()  # K=2 images of each class
    anchor, neighbours = classes[-1, 0], classes[:-1, 0]
    anchors.append(anchor)
    others = np.delete(np.arange(num_classes), anchor)
    d = np.abs(positions[others] - positions[anchor])
    nearest = others[np.argsort(d, kind="stable")[:3]]
    assert set(neighbours) == set(nearest), (anchor, neighbours, nearest)
  assert sorted(anchors) == list(range(num_classes))  # every class anchors one batch


@pytest.fixture(scope="module")
def straight_gs_run(tmp_path_factory):
  """20 steps in one go: three graph steps (epochs of 8 steps)."""
  workdir = str(tmp_path_factory.mktemp("gs_straight"))
  out = train_and_evaluate(_cfg(max_steps=20), workdir)
  return workdir, out


def test_gs_run_trains_and_logs_its_graph_step(straight_gs_run):
  workdir, out = straight_gs_run
  assert out["step"] == 20
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  graphs = [r for r in rows if r["kind"] == "graph"]
  assert [r["step"] for r in graphs] == [0, 8, 16]  # at the start of every epoch
  assert all(r["graph_s"] > 0 for r in graphs)
  train = [r for r in rows if r["kind"] == "train"]
  assert len(train) == 20 and all(np.isfinite(r["loss"]) for r in train)
  _, leaves = _leaves(workdir)
  assert not any("class_memory" in k for k in leaves)
  assert leaves["['epoch_batches']"].shape == (8, 16)


@pytest.mark.parametrize("stop", [12, 16])  # inside an epoch; on its last step
def test_gs_run_stopped_and_resumed_equals_straight_run(straight_gs_run, stop, tmp_path):
  workdir = str(tmp_path)
  train_and_evaluate(_cfg(max_steps=stop), workdir)
  train_and_evaluate(_cfg(max_steps=20), workdir)
  step, want = _leaves(straight_gs_run[0])
  step_b, got = _leaves(workdir)
  assert step == step_b == 20
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_adaptive_schedule_ends_training_early(tmp_path):
  # step_factor 10: any 3rd epoch "falls below" 10 x the 2nd's mean, so the schedule steps
  # after epoch 3 and ends after min(6, 3 + 3 // 2) = 4 epochs of 8 steps.
  cfg = _cfg(**{"optim.step_factor": 10.0, "num_epochs": 6})
  out = train_and_evaluate(cfg, str(tmp_path))
  assert out["step"] == 32
  with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
    lrs = [r["lr"] for r in map(json.loads, f) if r["kind"] == "train"]
  assert lrs[:23] == [pytest.approx(0.05)] * 23 and lrs[23:] == [pytest.approx(0.005)] * 9
  assert checkpoint.restore_latest(str(tmp_path))[0] == 32
  # Resuming a finished run trains no further.
  assert train_and_evaluate(cfg, str(tmp_path))["step"] == 32


def test_a_checkpoint_written_before_epoch_batches_existed_still_restores(tmp_path):
  """Checkpoints of earlier versions hold no ``epoch_batches``: a class-memory run resumes."""
  cfg = get_config("tiny")
  cfg.loss.name = "class_memory"
  _, state = _fresh_state(cfg)
  old = dict(serialization.to_state_dict(state))
  del old["epoch_batches"]
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 3, old, {"model": cfg.model.to_dict()})
  mngr.wait_until_finished()
  mngr.close()
  step, restored, _ = checkpoint.restore_with_meta(str(tmp_path), target=state)
  assert step == 3 and restored.epoch_batches is None
  np.testing.assert_array_equal(restored.class_memory, state.class_memory)


def test_four_devices_match_one_device(tmp_path):
  """The batch split over 4 (simulated) devices: the matcher's BN statistics cover the whole
  global ``b x b`` block, and the graph step (extraction and scoring split over the devices)
  picks the same batches. 3 steps: from scratch at lr 0.05 the float-order differences grow
  with every step (measured 5e-4 on the matcher's BN mean after 8), and a later graph on
  near-equal class distances of an untrained net could then flip a neighbour."""
  four = str(tmp_path / "four")
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "JAX_PLATFORMS": "cpu",
  }
  cmd = [
    sys.executable,
    "train.py",
    "--config",
    "configs/gs_market.py:tiny",
    "--workdir",
    four,
    "--config.max_steps=3",
    "--config.eval.testsets=",
  ]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "4 device(s) on 1 process(es)" in out.stdout
  one = str(tmp_path / "one")
  train_and_evaluate(_cfg(max_steps=3), one)
  _, want = _leaves(one)
  _, got = _leaves(four)
  np.testing.assert_array_equal(got["['epoch_batches']"], want["['epoch_batches']"])
  for k in want:  # float-order differences only; a per-device BN statistic is off by ~0.1
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4, err_msg=k)
