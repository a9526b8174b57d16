"""eval.py's library: evaluate variables or a checkpoint on every configured test set, print
the table and write ``<workdir>/eval/`` (one test set at a time: `testset.evaluate_testset`).

In a multi-process run every process calls it (extraction and scoring use every device of
every process) and gets the same summary; only process 0 prints and writes files."""

from __future__ import annotations

import functools
import json
import os

import jax
import ml_collections

from qaconv_jax import checkpoint, sharding
from qaconv_jax.config_checks import check_config, testset_names
from qaconv_jax.data.pipeline import eval_image, materialize_synthetic, open_source
from qaconv_jax.evaluation.testset import evaluate_testset
from qaconv_jax.models.model import QAConvModel, build_model
from qaconv_jax.visualize import match_picture, ranking_strip


def jit_model_fns(model: QAConvModel):
  """Jitted ``embed(variables, images)`` and ``match(variables, probe, gallery)``; the
  variables are arguments (as constants, XLA would try to fold the whole network), so one
  compilation serves every evaluation of a run."""
  embed = jax.jit(lambda v, x: model.apply(v, x, train=False, method=QAConvModel.embed))
  match = jax.jit(lambda v, p, g: model.apply(v, p, g, train=False, method=QAConvModel.match))
  return embed, match


def lists_fn(model: QAConvModel, variables: dict):
  """``match_lists(anchor, cands, anchor_is_probe)`` bound to ``variables``, jitted with the
  variables as an argument (two-stage retrieval's re-scoring, docs/method.md §13)."""
  fn = jax.jit(lambda v, a, c, aip: model.apply(v, a, c, aip, method=QAConvModel.match_lists))
  return functools.partial(fn, variables)


def model_fns(model: QAConvModel, variables: dict, jitted=None):
  """``embed(images)`` and ``match(probe, gallery)`` bound to ``variables`` (``jitted``:
  the pair from `jit_model_fns`, to reuse its compilations)."""
  embed, match = jitted or jit_model_fns(model)
  return functools.partial(embed, variables), functools.partial(match, variables)


def format_table(rows: list[tuple[str, str, dict]]) -> str:
  cols = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")
  lines = [f"{'test set':<16} {'method':<17}" + "".join(f"{c:>8}" for c in cols)]
  for testset, method, r in rows:
    lines.append(f"{testset:<16} {method:<17}" + "".join(f"{r[c]:8.2f}" for c in cols))
  return "\n".join(lines)


def _pictures(out_dir, name, query, gallery, result, image_size, n: int) -> None:
  os.makedirs(out_dir, exist_ok=True)
  method = list(result["topk"])[-1]  # the best available ranking
  topk = result["topk"][method]
  for q in range(min(n, len(query))):
    ranked = topk[q]
    strip = ranking_strip(
      eval_image(query, q, image_size),
      [eval_image(gallery, int(g), image_size) for g in ranked],
      [bool(gallery.pids[g] == query.pids[q]) for g in ranked],
    )
    strip.save(os.path.join(out_dir, f"{name}_q{q:04d}_top{len(ranked)}.png"))
    g = int(ranked[0])
    match_picture(
      eval_image(query, q, image_size),
      eval_image(gallery, g, image_size),
      result["query_maps"][q],
      result["gallery_maps"][g],
    ).save(os.path.join(out_dir, f"{name}_q{q:04d}_matches.png"))


def _report(name, query, gallery, result, config, out_dir, image_size, visualize, main) -> None:
  """Process 0: one test set's notes, per-query top-k lists and pictures."""
  if not main:
    return
  for note in result["notes"]:
    print(f"{name}: {note}", flush=True)
  ranked = [
    {
      "query": query.names[q],
      "pid": int(query.pids[q]),
      "camera": int(query.cameras[q]),
      **{m: [gallery.names[g] for g in t[q]] for m, t in result["topk"].items()},
    }
    for q in range(len(query))
  ]
  with open(os.path.join(out_dir, f"{name}_top{config.eval.topk}.json"), "w") as f:
    json.dump(ranked, f)
  if visualize:
    _pictures(
      os.path.join(out_dir, "pictures"), name, query, gallery, result, image_size, visualize
    )


def evaluate_variables(
  config: ml_collections.ConfigDict,
  workdir: str,
  variables: dict,
  step: int,
  visualize: int = 0,
  quiet: bool = False,
) -> dict:
  """Evaluates ``variables`` (params + batch_stats) on every set of ``config.eval.testsets``,
  prints a table and writes ``<workdir>/eval/`` (process 0); returns the summary."""
  main = jax.process_index() == 0
  mesh = sharding.make_mesh()
  variables = sharding.replicate(variables, mesh)  # once, not per test set
  # Evaluation runs under its own numerics (eval.dtype: float32 at HIGHEST by default).
  model = build_model(config.model, numerics=config.eval.dtype)
  embed, match = model_fns(model, variables)
  match_lists = lists_fn(model, variables)
  image_size = tuple(config.data.image_size)
  out_dir = os.path.join(workdir, "eval")
  if main:
    os.makedirs(out_dir, exist_ok=True)
  # The distance is no part of the model, so the results say which one they come from.
  distance = config.eval.get("distance", "sigmoid")
  # Two-stage results (eval.shortlist > 0, docs/method.md §13) are not exact mode's: say so.
  shortlist = int(config.eval.get("shortlist", 0))
  summary = {"step": int(step), "distance": distance, "shortlist": shortlist, "testsets": {}}
  rows = []
  check_config(config, training=False)  # evaluate_variables is also called directly
  for name in testset_names(config.eval):
    src_cfg = materialize_synthetic(
      config.eval.sources[name], os.path.join(workdir, "data"), write=main
    )
    query, gallery = open_source(src_cfg, "query"), open_source(src_cfg, "gallery")
    memmap_dir = config.eval.get("gallery_memmap", "")
    gallery_file = None
    if memmap_dir:
      os.makedirs(memmap_dir, exist_ok=True)
      # Process and pid in the name: concurrent evaluations never share a file.
      gallery_file = os.path.join(
        memmap_dir, f"{name}_gallery_maps.p{jax.process_index()}.{os.getpid()}.bin"
      )
    try:
      result = evaluate_testset(
        embed, match, query, gallery, config.eval, image_size, mesh, match_lists, gallery_file
      )
      _report(name, query, gallery, result, config, out_dir, image_size, visualize, main)
    finally:
      if gallery_file and os.path.exists(gallery_file):
        os.remove(gallery_file)  # a scratch file: nothing reads it after this test set
    summary["testsets"][name] = result["results"]
    rows += [(name, m, r) for m, r in result["results"].items()]
  if main:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(summary, f, indent=2)
    if not quiet:
      mode = f"two-stage, eval.shortlist={shortlist}" if shortlist else "exact"
      print(f"step {step}, eval.distance={distance}, {mode}\n" + format_table(rows), flush=True)
  return summary


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None, visualize: int = 0
) -> dict:
  """Restores ``workdir``'s latest (or ``step``) checkpoint and evaluates it."""
  check_config(config, training=False)
  step, variables = checkpoint.restore_variables(config, workdir, step)
  return evaluate_variables(config, workdir, variables, step, visualize)
