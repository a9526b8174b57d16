"""Config values are checked before any work, naming the key, the value and the range."""

import contextlib
import glob
import importlib
import os

import pytest

from configs.default import get_config
from qaconv_jax.config_checks import check_config
from qaconv_jax.errors import ConfigError
from qaconv_jax.training import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "name",
  sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith("base.py")
  ),
)
@pytest.mark.parametrize("variant", [None, "tiny"])
def test_shipped_configs_pass(name, variant):
  config = importlib.import_module(f"configs.{name}").get_config(variant)
  with (
    pytest.raises(ConfigError)
    if config.data.root == "" and not config.data.synthetic_domain
    else contextlib.nullcontext()
  ):  # a paper config names no dataset folder: the user does
    check_config(config, training=True)
  for src in [config.data, *config.eval.sources.values()]:
    if not src.synthetic_domain:
      src.root = "/datasets/somewhere"
  check_config(config, training=True)


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("checkpoint.every", 0, r"checkpoint.every=0: expected an integer >= 1"),
    ("checkpoint.every", -5, r"checkpoint.every=-5: expected an integer >= 1"),
    ("log_every", 0, r"log_every=0: expected an integer >= 1"),
    ("eval_every", -1, r"eval_every=-1: expected an integer >= 0 \(0 = none\)"),
    ("checkpoint.keep", 0, r"checkpoint.keep=0: expected an integer >= 1"),
    (
      "eval_every",
      5,
      r"eval_every=5: periodic evaluation runs on the validation split, so "
      r"set data.val_ids",
    ),
    (
      "checkpoint.keep_best",
      True,
      r"keep_best=True: selecting a checkpoint needs the "
      r"validation split",
    ),
    ("data.val_ids", 1.5, r"data.val_ids=1.5: expected 0 \(no validation split\)"),
    ("eval.lambda_value", 2.0, r"eval.lambda_value=2.0: expected a weight in \[0, 1\]"),
    ("eval.k1", 0, r"eval.k1=0: expected an integer >= 1"),
    ("eval.sigma", 0.0, r"eval.sigma=0.0: expected seconds > 0"),
    ("eval.ap_mode", "auc", r"eval.ap_mode='auc': expected 'step' or 'trapezoid'"),
    ("eval.distance", "logit", r"eval.distance='logit': expected 'sigmoid' or 'neg_logit'"),
    (
      "data.combine_all",
      True,
      r"data.combine_all=True with data.dataset='market1501': .* msmt17 only",
    ),
    ("eval.testsets", "synthetic_b,market", r"eval.testsets: unknown test set 'market'"),
    ("loss.name", "arcface", r"loss.name='arcface': expected one of \['class_memory'"),
    ("data.sampler", "random", r"data.sampler='random': expected one of"),
    ("optim.schedule", "cosine", r"optim.schedule='cosine': expected one of"),
    ("data.pk_k", 3, r"data.pk_k=3 with data.batch_size=16: expected K >= 1 dividing"),
    ("optim.clip_norm", 8.0, r"optim.clip_norm > 0 needs optim.clip_groups"),
    ("optim.clip_groups", ("^qaconv/",), r"clip nothing with optim.clip_norm=0"),
    (
      "eval.testsets",
      "dukemtmc",
      r"eval.sources.dukemtmc: no data; set "
      r"eval.sources.dukemtmc.root \(the dataset's folder\) or eval.sources.dukemtmc.tfds_dir",
    ),
    ("data.synthetic_domain", "", r"^invalid config: data: no data; set data.root"),
    ("model.dtype", "float16", r"model.dtype='float16': expected one of \['float32', 'tf32'"),
    ("eval.dtype", "fp32", r"eval.dtype='fp32': expected one of"),
    ("model.match_impl", "triton", r"match_impl='triton'.*must be one of \('xla', 'pallas'\)"),
    ("model.match_block", (0, 4), r"match_block=\(0, 4\).*two positive tile sizes"),
    ("model.match_block", "big", r"match_block='big'.*'auto', None or \(tp, tg\)"),
    ("model.match_block", (8.5, 4), r"match_block=\(8.5, 4\).*positive integer tile sizes"),
  ],
)
def test_bad_values_are_refused_before_training(tmp_path, key, value, message):
  config = get_config("tiny")
  *parents, last = key.split(".")
  target = config
  for p in parents:
    target = target[p]
  target[last] = value
  with pytest.raises(ConfigError, match=message):
    train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing was written: it failed first


def test_every_problem_is_listed_at_once():
  config = get_config("tiny")
  config.log_every = 0
  config.eval.k2 = 99
  with pytest.raises(ConfigError, match=r"log_every=0.*; eval.k2=99"):
    check_config(config, training=True)
  config.log_every = 1
  with pytest.raises(ConfigError, match=r"^invalid config: eval.k2=99"):
    check_config(config, training=False)  # evaluation checks only the eval settings


def test_runtime_knobs_are_not_model_identity():
  from qaconv_jax.checkpoint import CheckpointMismatch, check_model_config
  from qaconv_jax.models.matching import ACCELERATOR_BLOCK, DEFAULT_BLOCK, resolve_options

  saved = get_config("tiny").model.to_dict()
  other = {**saved, "dtype": "bfloat16", "match_block": (2, 2), "match_impl": "pallas"}
  check_model_config({"model": saved}, other)  # evaluation / resume with other knobs: fine
  with pytest.raises(CheckpointMismatch) as e:
    check_model_config({"model": saved}, {**other, "neck_dim": 64, "head": "v2"})
  assert "head: checkpoint 'v1' vs config 'v2'" in str(e.value) and "neck_dim" in str(e.value)
  assert "dtype" not in str(e.value) and "match" not in str(e.value)
  # "auto" tiles per backend
  assert resolve_options("auto", "xla", backend="cpu").block == DEFAULT_BLOCK
  assert resolve_options("auto", "xla", backend="gpu").block == ACCELERATOR_BLOCK
  assert resolve_options(None, "xla").block is None


def test_qaconv21_combinations_are_checked():
  from configs.gs_msmt_all import get_config as gs_config

  config = gs_config("tiny")
  config.data.sampler = "shuffle"
  config.optim.step_factor = 0.0
  config.optim.clip_groups = ("^(backbone|neck/",)
  config.init_memory = True
  with pytest.raises(ConfigError) as e:
    check_config(config, training=True)
  for message in (
    "loss.name='triplet' compares the images of a batch with each other",
    "optim.step_factor=0.0: expected a loss ratio > 0",
    "optim: the path regex '^(backbone|neck/' does not compile",
    "init_memory=True: loss.name='triplet' trains without a class memory",
  ):
    assert message in str(e.value)
  full = gs_config()
  full.data.root = "/datasets/msmt17"
  full.eval.testsets = "market1501,msmt17"
  with pytest.raises(ConfigError, match="would test on training images"):
    check_config(full, training=True)


def test_demo_graph_sampling_variant_has_the_class_memory_runs_budget():
  cm, gs = get_config(), get_config("gs")
  check_config(gs, training=True)
  train_ids = cm.data.synthetic_ids // 2
  cm_steps = cm.num_epochs * (train_ids // (cm.data.batch_size // cm.data.pk_k))
  gs_steps = gs.num_epochs * train_ids  # a graph epoch: one batch per class
  assert gs.data.sampler == "graph" and gs.loss.name == "triplet"
  assert cm_steps - train_ids < gs_steps <= cm_steps


def test_a_whole_model_saved_before_final_stage_existed_counts_as_layer3():
  from qaconv_jax.checkpoint import CheckpointMismatch, check_model_config

  old = {"model": {"depth": 18, "neck_dim": 32}}  # no final_stage key: written before it
  check_model_config(old, {"depth": 18, "neck_dim": 32, "final_stage": "layer3"})
  with pytest.raises(CheckpointMismatch, match="final_stage: checkpoint 'layer3' vs config"):
    check_model_config(old, {"depth": 18, "neck_dim": 32, "final_stage": "layer2"})
  check_model_config({"model": {"depth": 18}}, {"depth": 18, "final_stage": "layer2"})  # backbone
  config = get_config("tiny")
  config.model.final_stage = "layer1"
  with pytest.raises(ConfigError, match="model.final_stage='layer1': expected 'layer2'"):
    check_config(config, training=False)
