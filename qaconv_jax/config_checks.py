"""Config values checked before any work starts, so a typo fails in the first second with
its key, value and allowed range, not as a ZeroDivisionError hours into a run."""

from __future__ import annotations

import ml_collections

from qaconv_jax.data.splits import check_val_ids
from qaconv_jax.errors import ConfigError
from qaconv_jax.evaluation.rerank import check_rerank_params
from qaconv_jax.models.matching import resolve_options
from qaconv_jax.numerics import NAMES as NUMERICS


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
  for key, value, ok, expected in (
    ("batch_size", cfg.batch_size, _is_count(cfg.batch_size, 1), "an integer >= 1"),
    ("memory_budget_gb", cfg.memory_budget_gb, cfg.memory_budget_gb > 0, "> 0"),
    ("topk", cfg.topk, _is_count(cfg.topk, 1), "an integer >= 1"),
    ("ap_mode", cfg.ap_mode, cfg.ap_mode in ("step", "trapezoid"), "'step' or 'trapezoid'"),
    ("tau", cfg.tau, cfg.tau > 0, "seconds > 0"),
    ("sigma", cfg.sigma, cfg.sigma > 0, "seconds > 0"),
    ("tlift_k", cfg.tlift_k, _is_count(cfg.tlift_k, 1), "an integer >= 1"),
  ):
    if not ok:
      out.append(f"eval.{key}={value!r}: expected {expected}")
  try:
    check_rerank_params(cfg.k1, cfg.k2, cfg.lambda_value)
  except ValueError as e:
    out.append(f"eval.{e}")
  if cfg.dtype not in NUMERICS:
    out.append(f"eval.dtype={cfg.dtype!r}: expected one of {list(NUMERICS)}")
  return out


def runtime_problems(cfg: ml_collections.ConfigDict) -> list[str]:
  """Problems of the runtime knobs of ``config.model`` (numerics, matcher tiles/kernel)."""
  out = []
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
  try:
    check_val_ids(val_ids)
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
