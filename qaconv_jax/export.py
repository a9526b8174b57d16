"""Export a trained model for serving without the training code.

  python -m qaconv_jax.export --workdir CKPT --out DIR [--platforms cpu,cuda]
      [--config CONFIG[:variant]] [--checkpoint STEP] [--overwrite]

Writes DIR: the embedding (images -> feature maps) and the matcher (maps x maps ->
distances) as StableHLO (`jax.export`, symbolic batch dimensions) for each platform, the
weights (weights.npz) and model.json (input size, normalisation, map shape, distance, model
settings). ``qaconv_jax.exported.load(DIR)`` runs them with jax and numpy only. After
writing, the export is loaded back and checked against the live model on this machine.
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
  import numpy as np

  from qaconv_jax import exported
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
  # The check: the export, loaded as a service would, against the live model.
  import jax

  if jax.default_backend() not in platforms:
    print(f"not checked: this machine runs {jax.default_backend()}.", flush=True)
    return
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(3, *trained.image_size, 3)).astype(np.float32)
  served = exported.load(args.out)
  maps = served.embed(images)
  live_maps = np.asarray(trained.embed(images))
  live = np.asarray(trained.match(live_maps, live_maps))
  from qaconv_jax.models.qaconv import logit_distance

  live_dist = np.asarray(logit_distance(live, trained.distance))
  err = max(
    float(np.abs(maps - live_maps).max()),
    float(np.abs(served.distance(maps, maps) - live_dist).max()),
  )
  if not err <= 1e-4:
    raise RuntimeError(f"the export differs from the live model by {err:.3g} on random images.")
  print(f"checked on {jax.default_backend()}: export = live model within {err:.2g}.", flush=True)


if __name__ == "__main__":
  cli.run_plain(main)
