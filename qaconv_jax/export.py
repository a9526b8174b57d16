"""Export a trained model for serving without the training code.

  python -m qaconv_jax.export --workdir CKPT --out DIR [--platforms cpu,cuda]
      [--config CONFIG[:variant]] [--checkpoint STEP] [--overwrite]

Writes DIR: the embedding (images -> feature maps) and the matcher (maps x maps ->
distances) as StableHLO (`jax.export`, symbolic batch dimensions) for each platform, the
weights (weights.npz) and model.json (input size, normalisation, map shape, distance, model
settings). ``qaconv_jax.exported.load(DIR)`` runs them with jax and numpy only. Before it
lands in DIR, the export is loaded back and checked against the live model on this machine.
``--overwrite`` replaces an earlier export (and nothing else).
"""

from __future__ import annotations

import argparse

from qaconv_jax import cli


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m qaconv_jax.export", description=__doc__.split("\n\n")[2]
  )
  p.add_argument("--workdir", required=True, help="Training workdir holding checkpoints/.")
  p.add_argument("--out", required=True, help="The export folder to write.")
  p.add_argument("--platforms", default="cpu,cuda", help="Comma-separated (default cpu,cuda).")
  p.add_argument("--config", help="Config file[:variant] (default: CKPT/config.json).")
  p.add_argument("--checkpoint", type=int, help="Step to use (default: latest).")
  p.add_argument("--overwrite", action="store_true", help="Replace an existing --out.")
  return p.parse_args(argv)


def main(argv: list[str]) -> None:
  args = parse(argv)
  from qaconv_jax.inference.export_lib import export_model
  from qaconv_jax.inference.trained import load_trained

  trained = load_trained(args.workdir, args.config, args.checkpoint)
  platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
  info = export_model(trained, args.out, platforms, args.overwrite)
  print(
    f"exported {args.workdir} step {info['step']} (model {info['fingerprint'][:12]}) for "
    f"{', '.join(platforms)} to {args.out}: input {info['input']['height']}x"
    f"{info['input']['width']} RGB in [0, 1], maps {info['maps']}, distance {info['distance']}",
    flush=True,
  )
  check = info["check"]
  if check is None:
    from jax import export as jax_export

    print(
      f"not checked against the live model: this machine runs "
      f"{jax_export.default_export_platform()}, the export is for {', '.join(platforms)}.",
      flush=True,
    )
  else:
    print(
      f"checked on {check['platform']}: export = live model within {check['max_abs_diff']:.2g}.",
      flush=True,
    )


if __name__ == "__main__":
  cli.run_plain(main)
