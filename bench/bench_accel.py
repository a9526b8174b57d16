"""The accelerator path in one command: matcher, class-memory train step, full-size evaluation.

Sections (``--only``, comma-separated; default all), one table each, headed by the device and
the JAX version:

  matcher      pairs/s of ``match_maxima`` at hw = 192 (24 x 8), d = 128: XLA and Pallas,
               float32 (HIGHEST) and bfloat16, as a fraction of the device's dense peak for that
               dtype and of a square matmul run in the same process; beside them the authors'
               QAConv matcher (PyTorch, their evaluation loop) when ``--official_repo`` is given
               and torch imports.
  train        ResNet-50 384x128 class-memory train step (b = 32, 64; C = 751) images/s per
               numerics policy; beside it the official v1.2 step (their ResMap + QAConv +
               ClassMemoryLoss, random weights, SGD as their main.py).
  eval_market  Market-1501-sized evaluation from random unit maps (3,368 x 15,913 [24, 8, 128]):
               q-g, q-q, g-g distances through a real (random) QAConv head, k-reciprocal
               re-ranking, TLift, metrics: wall time per stage, total, peak device memory.
  eval_msmt    MSMT17 size (11,659 x 82,161): q-g distances and metrics (no re-ranking; MSMT17
               has no frame times, so no TLift either).

Every section runs in a subprocess of its own, and the PyTorch code in another: each peak-memory
figure is its own, and JAX's GPU preallocation never starves PyTorch. GPU timings: warm-up
first, then the median of ``--reps`` runs, each ending in block_until_ready / synchronize.
Evaluation stages run once, as eval.py would run them: their times include compilation, whose
XLA share is a column of its own. ``--small`` (the default on CPU) shrinks every size so the
whole script runs in a few minutes on 2 cores; ``--full`` forces the real sizes.

``--official_repo PATH``: a clone of github.com/ShengcaiLiao/QAConv. From a git repository the
matcher is read at ``--official_matcher_rev`` (v2.1) and the train step's files at
``--official_train_rev`` (v1.2) with ``git show``; from a plain checkout its files are used as
they are (``--official_train_repo`` can name a second checkout for the train step). Nothing of
theirs is stored here: the modules are imported from those files at run time.

  python bench/bench_accel.py [--only matcher,train,eval_market,eval_msmt] [--small|--full]
      [--reps 5] [--official_repo PATH] [--eval_dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accel_common import FLOP_PER_PAIR, D, H, W, eval_sizes, peak_tflops, train_sizes
from accel_official import official_matcher_section, official_skip_reason, official_train_section
from accel_ours import eval_section, matcher_section, train_section
from common import table

SECTIONS = ("matcher", "train", "eval_market", "eval_msmt")
MARKER = "BENCH_ACCEL_JSON "


def fmt_pct(x: float | None) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def fmt_ratio(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}x"


def run_child(args, child: str) -> tuple[dict | None, str]:
  """Runs ``--child child`` in a subprocess; ``(its JSON or None, error text)``. Its stderr
  (progress bars) streams through; stdout is kept for the JSON line."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", child, *args.passthrough]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  tail = collections.deque(maxlen=4096)

  def pump():
    for chunk in iter(lambda: proc.stderr.read1(4096), b""):
      sys.stderr.buffer.write(chunk)
      sys.stderr.flush()
      tail.extend(chunk)

  thread = threading.Thread(target=pump, daemon=True)
  thread.start()
  out = proc.stdout.read().decode(errors="replace")
  proc.wait()
  thread.join()
  for line in reversed(out.splitlines()):
    if line.startswith(MARKER):
      return json.loads(line[len(MARKER) :]), ""
  lines = [x for x in bytes(tail).decode(errors="replace").replace("\r", "\n").splitlines() if x]
  why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
  return None, f"failed (exit {proc.returncode}): {why[:160]}"


def header(title: str, res: dict | None) -> str:
  line = res["machine"] if res else "(device line unavailable: the section's process failed)"
  return f"\n== {title} ==\ndevice: {line}"


def official_notes(official, why: str | None, what: str) -> list[str]:
  """Lines saying why official rows are missing (skipped, the process failed, a row failed)."""
  if official is None:
    return [f"{what}: {why}"]
  where = lambda r: r["dtype"] + (f" b={r['batch']}" if "batch" in r else "")
  return [f"{what} {where(r)}: {r['error']}" for r in official["rows"] if "error" in r]


def print_matcher(args, ours, err, official, official_why):
  p, g = (ours["p"], ours["g"]) if ours else ("?", "?")
  title = (
    f"matcher: match_maxima, h={H} w={W} d={D} ({FLOP_PER_PAIR / 1e6:.2f} MFLOP/pair), "
    f"{p} x {g} pairs"
  )
  print(header(title, ours))
  if not ours:
    print(err)
  off = {}
  for r in (official or {}).get("rows", []):
    if "error" not in r:  # their float16 sits beside our bfloat16: same tensor-core peak
      off["bfloat16" if r["dtype"] == "float16" else r["dtype"]] = r
  rows = []
  for r in (ours or {}).get("rows", []):
    base = off.get(r["dtype"])
    rows.append(
      [
        r["case"],
        r["dtype"],
        f"{r['pps']:,.0f}" if "pps" in r else "-",
        f"{r['tflops']:.2f}",
        fmt_pct(r["peak_frac"]),
        fmt_ratio(r.get("vs_mm", 1.0)),
        fmt_ratio(r["pps"] / base["pps"] if base and "pps" in r else None),
        f"{r['err']:.1e}" if "err" in r else "-",
        f"{r['first_s']:.1f} ({r['compile_s']:.1f})" if "first_s" in r else "-",
      ]
    )
  for r in (official or {}).get("rows", []):
    if "error" in r:
      continue
    peak, _ = peak_tflops(official["kind"], "bfloat16" if r["dtype"] == "float16" else "float32")
    peak_gb = "" if r["peak_gb"] is None else f", {r['peak_gb']:.1f} GB"
    rows.append(
      [
        r["case"] + peak_gb,
        r["dtype"],
        f"{r['pps']:,.0f}",
        f"{r['tflops']:.2f}",
        fmt_pct(None if peak is None else r["tflops"] / peak),
        "-",
        "1.00x",
        "-",
        "-",
      ]
    )
  part = peak_tflops(ours["kind"], "float32")[1] if ours else "n/a"
  head = ["case (impl tile (resolved))", "dtype", "pairs/s", "TFLOP/s", f"of peak ({part})"]
  head += ["vs matmul", "vs official", "rel err", "first call s (XLA compile)"]
  print(table(head, rows))
  notes = official_notes(official, official_why, "official HEAD matcher")
  notes.append(
    "rel err: ||out - ref|| / ||ref|| on a corner of the pair grid, ref in float64; 'vs "
    "official': same dtype class (their float16 beside our bfloat16); peak device memory "
    + ("n/a" if not ours or ours["peak_gb"] is None else f"{ours['peak_gb']:.2f} GB")
  )
  print("\n".join(notes))


def print_train(args, ours, err, official, official_why):
  size, classes, batches, _ = train_sizes(args)
  title = f"train: class-memory step, {size[0]}x{size[1]}, C={classes}, batches {batches}"
  print(header(title, ours))
  good = [r for r in (official or {}).get("rows", []) if "error" not in r]
  off32 = {r["batch"]: r for r in good if r["dtype"] == "float32"}
  offbf = {r["batch"]: r for r in good if r["dtype"] != "float32"}

  def ratio(r, o):  # --small: their ResNet-18 is torchvision's (width 64), ours width 16
    return None if o is None or args.small else r["ips"] / o["ips"]

  def row(r, vs_f32: str, vs_same: str, first: str):
    peak = "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
    timing = [f"{r['s'] * 1e3:.1f}", f"{r['ips']:.1f}", vs_f32, vs_same, f"{r['loss']:.3f}"]
    return [r["case"], r["dtype"], r["batch"], *timing, peak, first]

  rows = []
  for r in (ours or {}).get("rows", []):
    same = (offbf if r["dtype"] == "bfloat16" else off32).get(r["batch"])
    vs_f32 = fmt_ratio(ratio(r, off32.get(r["batch"])))
    first = f"{r['first_s']:.1f} ({r['compile_s']:.1f})"
    rows.append(row(r, vs_f32, fmt_ratio(ratio(r, same)), first))
  for r in good:
    rows.append(row(r, "1.00x" if r["dtype"] == "float32" else "-", "1.00x", "-"))
  head = ["case", "dtype", "batch", "ms/step", "img/s", "vs official f32"]
  head += ["vs official same dtype", "loss", "peak GB", "first call s (XLA compile)"]
  print(table(head, rows))
  notes = [] if ours else [f"ours: {err}"]
  notes += official_notes(official, official_why, "official v1.2 step")
  notes.append("median step after warm-up; a step = forward + loss + backward + SGD update")
  if official:
    notes.append(official["flags"])
  if args.small:
    notes.append("--small: no ratios (their ResNet-18 has torchvision's width 64, ours 16)")
  print("\n".join(notes))


def print_eval(args, section, dtype_name, res, err):
  p, g, _ = eval_sizes(section, args.small)
  name = "Market-1501" if section == "eval_market" else "MSMT17"
  print(header(f"{section}: {name}-sized evaluation, {p} x {g} maps, {dtype_name}", res))
  if not res:
    print(err)
    return
  rows, total, compile_total = [], 0.0, 0.0
  for s in res["stages"]:
    total += s["s"]
    compile_total += s["compile_s"]
    rows.append(
      [
        s["stage"],
        f"{s['s']:.2f}",
        f"{s['compile_s']:.2f}",
        f"{s['pairs'] / s['s']:,.0f}" if s["pairs"] else "-",
        "n/a" if s["peak_gb"] is None else f"{s['peak_gb']:.2f}",
        f"{s['host_gb']:.2f}",
      ]
    )
  rows.append(["total", f"{total:.2f}", f"{compile_total:.2f}", "-", "-", "-"])
  print(
    table(
      ["stage", "wall s", "of which XLA compile s", "pairs/s", "device peak GB", "host peak GB"],
      rows,
    )
  )
  maps_ = ", ".join(f"{k} {100 * v:.2f}" for k, v in res["mAP"].items())
  print(f"peaks are running maxima of this section's process; mAP (random maps: ~chance): {maps_}")


def child_main(args) -> None:
  section, _, extra = args.child.partition(":")
  if section == "matcher":
    out = matcher_section(args)
  elif section == "train":
    out = train_section(args)
  elif section == "official_matcher":
    out = official_matcher_section(args)
  elif section == "official_train":
    out = official_train_section(args)
  else:
    out = eval_section(args, section, extra)
  print(MARKER + json.dumps(out), flush=True)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", default=",".join(SECTIONS), help=f"some of {','.join(SECTIONS)}")
  size = ap.add_mutually_exclusive_group()
  size.add_argument("--small", action="store_true", default=None, help="tiny sizes (CPU default)")
  size.add_argument("--full", dest="small", action="store_false", help="real sizes (GPU default)")
  ap.add_argument("--reps", type=int, default=5, help="timed runs per matcher row")
  ap.add_argument("--probes", type=int, default=512, help="matcher probes (full size)")
  ap.add_argument("--gallery", type=int, default=2048, help="matcher gallery maps (full size)")
  ap.add_argument("--match_dtypes", default="float32,bfloat16", help="numerics policies")
  ap.add_argument("--xla_tiles", default=None, help="'auto' and/or TPxTG (full: auto,8x16,32x64)")
  ap.add_argument("--pallas_tiles", default="auto")
  ap.add_argument("--train_dtypes", default="float32,bfloat16", help="numerics policies")
  ap.add_argument("--train_batches", default="32,64")
  ap.add_argument("--train_steps", type=int, default=None, help="timed steps (median)")
  ap.add_argument("--eval_dtypes", default="float32", help="numerics of scoring, one table each")
  ap.add_argument("--eval_impl", default="xla", choices=("xla", "pallas"))
  ap.add_argument("--eval_budget_gb", type=float, default=2.0, help="scoring block budget")
  ap.add_argument("--official_repo", default=None, help="clone of ShengcaiLiao/QAConv")
  ap.add_argument("--official_train_repo", default=None, help="(default: --official_repo)")
  ap.add_argument("--official_matcher_rev", default="v2.1")
  ap.add_argument("--official_train_rev", default="v1.2")
  ap.add_argument("--official_prob_batch", type=int, default=256, help="v2.1 main.py default")
  ap.add_argument("--official_gal_batch", type=int, default=256, help="v2.1 main.py default")
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)
  return ap.parse_args(argv)


def default_small() -> bool:
  """True unless a GPU is visible: decided in a throwaway process, so that this one never
  initialises a backend (its preallocation would hold GPU memory the sections need)."""
  code = "import jax; print(jax.default_backend())"
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  return res.stdout.strip() in ("", "cpu")


def main():
  args = parse_args()
  if args.small is None:
    args.small = default_small()
  if args.xla_tiles is None:
    args.xla_tiles = "auto" if args.small else "auto,8x16,32x64"
  if args.train_steps is None:
    args.train_steps = 3 if args.small else 10
  args.passthrough = [a for a in sys.argv[1:] if a not in ("--small", "--full")]
  args.passthrough += ["--small" if args.small else "--full", "--xla_tiles", args.xla_tiles]
  args.passthrough += ["--train_steps", str(args.train_steps)]
  if args.child:
    child_main(args)
    return
  only = [s for s in args.only.split(",") if s]
  unknown = set(only) - set(SECTIONS)
  if unknown:
    raise SystemExit(f"--only: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
  t_all = time.perf_counter()
  why = official_skip_reason(args.official_repo)
  for section in only:
    t = time.perf_counter()
    if section in ("matcher", "train"):
      ours, err = run_child(args, section)
      official, official_why = None, f"skipped: {why}"
      if why is None:
        official, official_why = run_child(args, f"official_{section}")
      printer = print_matcher if section == "matcher" else print_train
      printer(args, ours, err, official, official_why)
    else:
      for dtype_name in args.eval_dtypes.split(","):
        res, err = run_child(args, f"{section}:{dtype_name}")
        print_eval(args, section, dtype_name, res, err)
    print(f"({section}: {time.perf_counter() - t:.0f} s with process start-up)", flush=True)
  print(f"\nall sections: {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
  main()
