"""Index, search and export speed on a trained model (docs/method.md §14).

Builds an index of the first ``--num`` images (default 1,000 of the demo's synthetic test
gallery) with the demo's QAConv model (``make demo`` trains it into workdir/demo/v1), then
times searches of ``--queries`` query images against it: all at once and one at a time,
exact and with a ``--shortlist``; then the exported model (`qaconv_jax.exported`) against
the live one; then the search command line for one query, start-up and compilation included.
Ratios are per query against exact search of all queries at once (search rows) and against
the live model (export rows), measured in the same process.

  python bench/bench_search.py [--workdir workdir/demo/v1 | --random-config CONFIG]
                               [--images GLOB] [--num 1000] [--queries 20]
                               [--shortlist 100] [--reps 3]

``--random-config configs/market_r50.py`` times the paper's model size (ResNet-50 at
384x128, 24x8 maps) with random weights instead: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from common import best_time, machine, table

from qaconv_jax import exported
from qaconv_jax.inference.export_lib import export_model
from qaconv_jax.inference.feature_index import list_images, load_image, open_index
from qaconv_jax.inference.index_build import build_index
from qaconv_jax.inference.search_lib import rank_index
from qaconv_jax.inference.trained import load_trained
from qaconv_jax.models.qaconv import logit_distance

DEMO_DATA = "workdir/demo/v1/data/synthetic_b_500"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="workdir/demo/v1")
  parser.add_argument(
    "--images", default=os.path.join(DEMO_DATA, "bounding_box_test", "[0-9]*.jpg")
  )
  parser.add_argument("--query-images", default=os.path.join(DEMO_DATA, "query", "[0-9]*.jpg"))
  parser.add_argument("--num", type=int, default=1000)
  parser.add_argument("--queries", type=int, default=20)
  parser.add_argument("--shortlist", type=int, default=100)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument(
    "--random-config",
    help="Instead of --workdir: a config file[:variant] whose model is saved with random "
    "weights and used (e.g. configs/market_r50.py: the paper's size, 384x128).",
  )
  args = parser.parse_args()

  tmp = tempfile.mkdtemp(prefix="bench_search_")
  if args.random_config:
    args.workdir = _random_checkpoint(args.random_config, os.path.join(tmp, "random"))
  trained = load_trained(args.workdir)
  images = sorted(glob.glob(args.images))[: args.num]
  queries = list_images(args.query_images)[: args.queries]
  rows = []

  # ---------------------------------------------------------------- index
  cold = build_index(trained, images, os.path.join(tmp, "cold"))
  warm = build_index(trained, images, os.path.join(tmp, "index"))
  index = open_index(os.path.join(tmp, "index"))
  n = len(index.maps)
  for name, s in (("index build (first, compiles)", cold), ("index build", warm)):
    rows.append([name, f"{s['seconds']:.2f}", f"{1e3 * s['seconds'] / n:.2f} ms/image", "-"])

  # ---------------------------------------------------------------- search
  def search(qs, k):
    return lambda: rank_index(trained, index, qs, top=10, shortlist=k)

  k = min(args.shortlist, n)
  timed = [
    (f"search exact, {len(queries)} queries at once", search(queries, 0), len(queries)),
    (f"search shortlist {k}, {len(queries)} queries at once", search(queries, k), len(queries)),
    ("search exact, 1 query", search(queries[:1], 0), 1),
    (f"search shortlist {k}, 1 query", search(queries[:1], k), 1),
  ]
  times = [best_time(fn, args.reps) for _, fn, _ in timed]
  base = times[0] / timed[0][2]  # per query
  for (name, _, count), t in zip(timed, times):
    per_query = t / count
    rows.append([name, f"{t:.3f}", f"{1e3 * per_query:.1f} ms/query", f"{base / per_query:.2f}x"])
  split = rank_index(trained, index, queries, top=10).seconds
  embed_share = split["embed queries"] / sum(split.values())

  # ---------------------------------------------------------------- export
  export_dir = os.path.join(tmp, "export")
  export_model(trained, export_dir, platforms=("cpu", "cuda"))
  served = exported.load(export_dir)
  batch = np.stack([load_image(p, trained.image_size) for p in images[:64]])
  live_embed = best_time(lambda: np.asarray(trained.embed(batch)), args.reps)
  served_embed = best_time(lambda: served.embed(batch), args.reps)
  q_maps = np.asarray(index.maps[:1], np.float32)
  g_maps = np.asarray(index.maps, np.float32)
  live_dist = best_time(
    lambda: np.asarray(logit_distance(trained.match(q_maps, g_maps), trained.distance)), args.reps
  )
  served_dist = best_time(lambda: served.distance(q_maps, g_maps), args.reps)
  for name, live, srv, unit, count in (
    ("embed 64 images", live_embed, served_embed, "ms/image", 64),
    (f"distance 1 x {n}", live_dist, served_dist, "ms/query", 1),
  ):
    rows.append([f"live {name}", f"{live:.3f}", f"{1e3 * live / count:.2f} {unit}", "1.00x"])
    rows.append(
      [f"exported {name}", f"{srv:.3f}", f"{1e3 * srv / count:.2f} {unit}", f"{live / srv:.2f}x"]
    )

  # ---------------------------------------------------------------- the command line
  cmd = [
    sys.executable, "-m", "qaconv_jax.search", "--index", index.path, "--workdir", args.workdir,
    "--query", queries[0], "--top", "10",
  ]  # fmt: skip
  start = time.perf_counter()
  subprocess.run(cmd, check=True, capture_output=True)
  cli = time.perf_counter() - start
  rows.append(["python -m qaconv_jax.search, 1 query", f"{cli:.2f}", "whole process", "-"])

  print(f"machine: {machine()}")
  if args.random_config:
    print(f"random weights, config {args.random_config}")
  print(
    f"model: {args.workdir} step {trained.step}; index: {n} images "
    f"{tuple(index.maps.shape[1:])} {index.maps.dtype}; {len(queries)} queries; embedding "
    f"is {100 * embed_share:.0f}% of an exact batch search"
  )
  print(table(["what", "seconds", "per item", "speed vs baseline"], rows))


def _random_checkpoint(spec: str, workdir: str) -> str:
  """A workdir holding ``spec``'s model with random weights and its config.json."""
  import jax
  import jax.numpy as jnp

  from qaconv_jax import checkpoint
  from qaconv_jax.inference.trained import load_config_file
  from qaconv_jax.models.model import build_model

  cfg = load_config_file(spec)
  model = build_model(cfg.model)
  x = jnp.zeros((1, *cfg.data.image_size, 3))
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
  mngr = checkpoint.manager(workdir)
  checkpoint.save(mngr, 0, dict(variables), {"model": cfg.model.to_dict(), "num_classes": 1})
  mngr.wait_until_finished()
  mngr.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  return workdir


if __name__ == "__main__":
  main()
