"""Config values checked before any work starts, so a typo fails in the first second with
its key, value and allowed range, not as a ZeroDivisionError hours into a run."""

from __future__ import annotations

import re

import ml_collections

from qaconv_jax.data.datasets import check_combine_all
from qaconv_jax.data.splits import check_val_ids
from qaconv_jax.errors import ConfigError
from qaconv_jax.evaluation.rerank import check_rerank_params
from qaconv_jax.evaluation.two_stage import GATHERS, MAP_DTYPES
from qaconv_jax.models.matching import resolve_options
from qaconv_jax.models.qaconv import EVAL_DISTANCES
from qaconv_jax.numerics import NAMES as NUMERICS
from qaconv_jax.train_step import PAIR_LOSSES


def _is_count(v, minimum: int) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def testset_names(cfg: ml_collections.ConfigDict) -> list[str]:
  """``config.eval.testsets`` ("a, b") as a list of names."""
  return [t.strip() for t in cfg.testsets.split(",") if t.strip()]


def _source_problem(key: str, src) -> list[str]:
  if src.get("root") or src.get("tfds_dir") or src.get("synthetic_domain"):
    return []
  return [f"{key}: no data; set {key}.root (the dataset's folder) or {key}.tfds_dir"]


def eval_problems(cfg: ml_collections.ConfigDict) -> list[str]:
  """Problems of ``config.eval`` (empty when it is usable)."""
  out = []
  for name in testset_names(cfg):
    if name not in cfg.sources:
      out.append(
        f"eval.testsets: unknown test set {name!r}; eval.sources has {sorted(cfg.sources)}"
      )
    else:
      out += _source_problem(f"eval.sources.{name}", cfg.sources[name])
  distance = cfg.get("distance", "sigmoid")  # configs written before the key: the old default
  # Configs written before two-stage retrieval: exact, float32, in RAM.
  shortlist, far = cfg.get("shortlist", 0), cfg.get("shortlist_far", 10)
  map_dtype = cfg.get("map_dtype", "float32")
  neighbours = cfg.get("neighbour_shortlist", 0)
  gather = cfg.get("lists_gather", "auto")
  for key, value, ok, expected in (
    ("batch_size", cfg.batch_size, _is_count(cfg.batch_size, 1), "an integer >= 1"),
    ("memory_budget_gb", cfg.memory_budget_gb, cfg.memory_budget_gb > 0, "> 0"),
    ("topk", cfg.topk, _is_count(cfg.topk, 1), "an integer >= 1"),
    ("ap_mode", cfg.ap_mode, cfg.ap_mode in ("step", "trapezoid"), "'step' or 'trapezoid'"),
    ("tau", cfg.tau, cfg.tau > 0, "seconds > 0"),
    ("sigma", cfg.sigma, cfg.sigma > 0, "seconds > 0"),
    ("tlift_k", cfg.tlift_k, _is_count(cfg.tlift_k, 1), "an integer >= 1"),
    ("distance", distance, distance in EVAL_DISTANCES, "'sigmoid' or 'neg_logit'"),
    ("shortlist", shortlist, _is_count(shortlist, 0), "an integer >= 0 (0: exact)"),
    ("shortlist_far", far, _is_count(far, 0), "an integer >= 0"),
    ("map_dtype", map_dtype, map_dtype in MAP_DTYPES, f"one of {list(MAP_DTYPES)}"),
    ("lists_gather", gather, gather in GATHERS, f"one of {list(GATHERS)}"),
  ):
    if not ok:
      out.append(f"eval.{key}={value!r}: expected {expected}")
  if not isinstance(cfg.get("gallery_memmap", ""), str):
    out.append(
      f"eval.gallery_memmap={cfg.gallery_memmap!r}: expected a directory path, or '' (RAM)"
    )
  if _is_count(neighbours, 1) and shortlist == 0:
    out.append(
      f"eval.neighbour_shortlist={neighbours} has no effect in exact mode (eval.shortlist=0): "
      "set eval.shortlist too, or leave it 0"
    )
  if not _is_count(neighbours, 0):
    out.append(f"eval.neighbour_shortlist={neighbours!r}: expected an integer >= 0")
  elif cfg.rerank and _is_count(shortlist, 1) and _is_count(cfg.k1, 1):
    key, value = ("neighbour_shortlist", neighbours) if neighbours else ("shortlist", shortlist)
    if value < cfg.k1 + 1:
      out.append(
        f"eval.{key}={value} with eval.rerank: each image's re-scored shortlist must "
        f"hold its k1 + 1 = {cfg.k1 + 1} neighbours; use eval.{key} >= {cfg.k1 + 1}"
      )
  try:
    check_rerank_params(cfg.k1, cfg.k2, cfg.lambda_value)
  except ValueError as e:
    out.append(f"eval.{e}")
  if cfg.dtype not in NUMERICS:
    out.append(f"eval.dtype={cfg.dtype!r}: expected one of {list(NUMERICS)}")
  return out


def runtime_problems(cfg: ml_collections.ConfigDict) -> list[str]:
  """Problems of ``config.model`` found before building it: the stage the maps come from and
  the runtime knobs (numerics, matcher tiles/kernel)."""
  out = []
  if cfg.final_stage not in ("layer2", "layer3", "layer4"):
    out.append(
      f"model.final_stage={cfg.final_stage!r}: expected 'layer2', 'layer3' or 'layer4' "
      "(the authors' --final_layer)"
    )
  if cfg.dtype not in NUMERICS:
    out.append(f"model.dtype={cfg.dtype!r}: expected one of {list(NUMERICS)}")
  block = cfg.match_block
  try:
    resolve_options(block, cfg.match_impl)
  except (ValueError, TypeError) as e:  # TypeError: a block that is no sequence
    out.append(f"model.match_block={block!r} / match_impl={cfg.match_impl!r}: {e}".rstrip("."))
  return out


def train_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Problems of the training settings (empty when they are usable)."""
  out = _source_problem("data", config.data)
  for key, value, minimum in (
    ("num_epochs", config.num_epochs, 1),
    ("max_steps", config.max_steps, 0),
    ("log_every", config.log_every, 1),
    ("eval_every", config.eval_every, 0),
    ("checkpoint.every", config.checkpoint.every, 1),
    ("checkpoint.keep", config.checkpoint.keep, 1),
    ("data.batch_size", config.data.batch_size, 1),
  ):
    if not _is_count(value, minimum):
      out.append(
        f"{key}={value!r}: expected an integer >= {minimum}"
        + (" (0 = none)" if minimum == 0 else "")
      )
  val_ids = config.data.val_ids
  for check, args in (
    (check_val_ids, (val_ids,)),
    (check_combine_all, (config.data.dataset, config.data.get("combine_all", False))),
  ):
    try:
      check(*args)
    except ConfigError as e:
      out.append(str(e).rstrip("."))
  if config.eval_every and not val_ids:
    out.append(
      f"eval_every={config.eval_every}: periodic evaluation runs on the validation "
      "split, so set data.val_ids (test sets are evaluated once, at the end)"
    )
  if config.checkpoint.keep_best and not (val_ids and config.eval_every):
    out.append(
      "checkpoint.keep_best=True: selecting a checkpoint needs the validation split "
      "(data.val_ids) and eval_every > 0; a test set is never used to select one"
    )
  return out + recipe_problems(config)


LOSSES = ("class_memory", *PAIR_LOSSES)
SAMPLERS = ("shuffle", "pk", "graph")
SCHEDULES = ("step", "constant", "plateau", "adaptive")


def recipe_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Problems of the loss, sampler and optimiser choices (QAConv 2.1's among them)."""
  out = []
  loss, data, optim = config.loss.name, config.data, config.optim
  if loss not in LOSSES:
    out.append(f"loss.name={loss!r}: expected one of {list(LOSSES)}")
  if data.sampler not in SAMPLERS:
    out.append(f"data.sampler={data.sampler!r}: expected one of {list(SAMPLERS)}")
  if optim.schedule not in SCHEDULES:
    out.append(f"optim.schedule={optim.schedule!r}: expected one of {list(SCHEDULES)}")
  if loss in LOSSES[1:] and data.sampler == "shuffle":
    out.append(
      f"loss.name={loss!r} compares the images of a batch with each other, so every batch "
      "needs K images per identity: set data.sampler to 'graph' (QAConv 2.1) or 'pk'"
    )
  if data.sampler in ("pk", "graph"):
    k = data.pk_k
    if not _is_count(k, 1) or data.batch_size % k or data.batch_size // k < 2:
      out.append(
        f"data.pk_k={k!r} with data.batch_size={data.batch_size}: expected K >= 1 dividing "
        "the batch into at least 2 identities"
      )
  if loss in LOSSES[1:] and config.init_memory:
    out.append(f"init_memory=True: loss.name={loss!r} trains without a class memory")
  if not optim.clip_norm >= 0:
    out.append(f"optim.clip_norm={optim.clip_norm!r}: expected >= 0 (0 = no clipping)")
  elif not optim.clip_norm and optim.clip_groups:
    out.append(
      f"optim.clip_groups={list(optim.clip_groups)} clip nothing with optim.clip_norm=0: set "
      "the norm (QAConv 2.1: 8.0) or drop the groups"
    )
  elif optim.clip_norm and not optim.clip_groups:
    out.append(
      "optim.clip_norm > 0 needs optim.clip_groups, the parameter path regexes clipped "
      "separately (QAConv 2.1: '^(backbone|neck)/', '^qaconv/')"
    )
  if optim.schedule == "adaptive" and not optim.step_factor > 0:
    out.append(f"optim.step_factor={optim.step_factor!r}: expected a loss ratio > 0")
  if not 0 < optim.decay_factor <= 1:
    out.append(f"optim.decay_factor={optim.decay_factor!r}: expected a factor in (0, 1]")
  for rx in [*optim.clip_groups, *(rx for rx, _ in optim.lr_multipliers)]:
    try:
      re.compile(rx)
    except re.error as e:
      out.append(f"optim: the path regex {rx!r} does not compile ({e})")
  if data.get("combine_all") and "msmt17" in testset_names(config.eval):
    out.append(
      "data.combine_all=True trains on MSMT17's query and gallery images: testing on "
      "msmt17 would test on training images; drop it from eval.testsets"
    )
  return out


def check_config(config: ml_collections.ConfigDict, training: bool) -> None:
  """Raises `ConfigError` listing every unusable value (training settings when
  ``training``; the evaluation settings always)."""
  problems = (
    (train_problems(config) if training else [])
    + runtime_problems(config.model)
    + eval_problems(config.eval)
  )
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems) + ".")
