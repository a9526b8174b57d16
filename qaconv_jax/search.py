"""Search a feature index for query images.

  python -m qaconv_jax.search --index INDEX --workdir CKPT --query IMG [IMG ...]
      [--top 10] [--shortlist K] [--html report.html] [--json out.json] [--matches 3]
      [--config CONFIG[:variant]] [--checkpoint STEP]

Ranks the index (built by ``python -m qaconv_jax.index``) for each query with QAConv, as
eval.py ranks a gallery; ``--shortlist K`` scores only each query's K nearest index images by
the global descriptor. Prints each query's top list (rank, distance, camera, time, path);
``--json`` writes ``{"queries": [{"query": PATH, "results": [{"rank", "path", "distance",
"row", "pid", "camera", "time"}, ...]}, ...]}``; ``--html`` one self-contained page with
each query's ranked strip and the local correspondences of its best ``--matches`` results.
A query argument may also be a folder or a glob. The index must come from the same model.
"""

from __future__ import annotations

import argparse
import json
import os

from qaconv_jax import cli


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m qaconv_jax.search", description=__doc__.split("\n\n")[2]
  )
  p.add_argument("--index", required=True, help="Index folder (python -m qaconv_jax.index).")
  p.add_argument("--workdir", required=True, help="Training workdir holding checkpoints/.")
  p.add_argument("--query", required=True, nargs="+", help="Query image(s), folder(s) or glob(s).")
  p.add_argument("--top", type=cli.count, default=10, help="Results per query (default 10).")
  p.add_argument(
    "--shortlist",
    type=int,
    default=0,
    help="QAConv scores each query's K nearest by the "
    "global descriptor only (default 0: every index image).",
  )
  p.add_argument("--html", help="Write a self-contained HTML report here.")
  p.add_argument("--json", help="Write the ranked lists as JSON here.")
  p.add_argument(
    "--matches", type=int, default=3, help="HTML: correspondence pictures per query (default 3)."
  )
  p.add_argument("--config", help="Config file[:variant] (default: CKPT/config.json).")
  p.add_argument("--checkpoint", type=int, help="Step to use (default: latest).")
  return p.parse_args(argv)


def main(argv: list[str]) -> None:
  args = parse(argv)
  # Imported after parsing: --help answers without loading JAX.
  from qaconv_jax.inference.feature_index import list_images, open_index, read_image
  from qaconv_jax.inference.report import html_report
  from qaconv_jax.inference.search_lib import format_text, rank_index, results_json
  from qaconv_jax.inference.trained import load_trained

  for path in filter(None, (args.html, args.json)):
    _check_writable(path)  # before the work, not after it
  index = open_index(args.index)
  queries = [p for spec in args.query for p in list_images(spec)]
  trained = load_trained(args.workdir, args.config, args.checkpoint)
  ranking = rank_index(trained, index, queries, args.top, args.shortlist)
  report = results_json(index, queries, ranking, trained)
  print(format_text(report), flush=True)
  seconds = ", ".join(f"{k} {v:.2f}s" for k, v in ranking.seconds.items())
  print(f"{len(queries)} queries x {len(index.maps)} index images: {seconds}", flush=True)
  if args.json:
    _write(args.json, json.dumps(report, indent=2))
    print(f"wrote {args.json}", flush=True)
  if args.html:
    size = trained.image_size
    notes, matches = [], max(0, args.matches)
    if trained.config.model.head == "gap" and matches:
      notes.append("GAP baseline model: no local matching, so no correspondence pictures.")
      matches = 0
    page = html_report(
      report,
      [read_image(p, size) for p in queries],
      ranking.query_maps,
      lambda row: read_image(index.records[row]["path"], size),
      index.maps,
      matches,
      tuple(notes),
    )
    _write(args.html, page)
    print(f"wrote {args.html}", flush=True)


def _check_writable(path: str) -> None:
  """Raises `OutputExists` unless a file can be written at ``path`` (its folder is made)."""
  from qaconv_jax.errors import OutputExists

  if os.path.isdir(path):
    raise OutputExists(f"{path} is a folder: --html and --json take a file name.")
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise OutputExists(f"cannot write {path}: {e}.") from None
  if not os.access(parent, os.W_OK):
    raise OutputExists(f"cannot write {path}: its folder {parent} is not writable.")


def _write(path: str, text: str) -> None:
  """``text`` into ``path`` as UTF-8 (through a temporary file: never half a file)."""
  from qaconv_jax.errors import OutputExists

  _check_writable(path)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError as e:
    raise OutputExists(f"cannot write {path}: {e}.") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


if __name__ == "__main__":
  cli.run_plain(main)
