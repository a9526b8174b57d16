"""Index a folder of person crops with a trained model.

  python -m qaconv_jax.index --workdir CKPT --images DIR_OR_GLOB [...] --out INDEX
      [--config CONFIG[:variant]] [--checkpoint STEP] [--map-dtype float16]
      [--chunk 1024] [--batch-size N] [--coordinator-address HOST:PORT --num-processes N
      --process-id I | --distributed]

Embeds every image (a folder is searched recursively; a glob may use ``**``; several may be
given, and the index holds them sorted by path) on all devices and writes the index folder
INDEX: the feature maps (float16 by default), the global
descriptors and a metadata table (path; pid / camera / time where the file name is in a
known dataset's format). It is written in chunks: run the same command again after an
interruption and it resumes at the first unfinished chunk. An image that cannot be read or
decoded is listed (INDEX/skipped.csv) and skipped. The index records the model it came from,
and search refuses another. Multi-host: run it on every host with the jax.distributed flags
(INDEX on a file system all hosts share; process 0 writes it).
"""

from __future__ import annotations

import argparse

from qaconv_jax import cli


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m qaconv_jax.index", description=__doc__.split("\n\n")[2]
  )
  p.add_argument("--workdir", required=True, help="Training workdir holding checkpoints/.")
  p.add_argument("--images", required=True, nargs="+", help="Image folder(s), glob(s) or file(s).")
  p.add_argument("--out", required=True, help="The index folder to write (or resume).")
  p.add_argument("--config", help="Config file[:variant] (default: CKPT/config.json).")
  p.add_argument("--checkpoint", type=int, help="Step to use (default: latest).")
  p.add_argument(
    "--map-dtype",
    default="float16",
    choices=("float16", "bfloat16", "float32"),
    help="How the maps are stored (default float16: half the disk of float32).",
  )
  p.add_argument("--chunk", type=cli.count, default=1024, help="Images per resumable chunk.")
  p.add_argument("--batch-size", type=cli.count, help="Images per step (default: config.eval).")
  cli.add_distributed_args(p)
  return p.parse_args(argv)


def main(argv: list[str]) -> None:
  args = parse(argv)
  cli.init_distributed(args)
  from qaconv_jax.inference.feature_index import list_images
  from qaconv_jax.inference.index_build import build_index
  from qaconv_jax.inference.trained import load_trained

  images = sorted({p for spec in args.images for p in list_images(spec)})
  trained = load_trained(args.workdir, args.config, args.checkpoint)
  print(
    f"indexing {len(images)} images with {args.workdir} step {trained.step} "
    f"(model {trained.fingerprint[:12]}) into {args.out}",
    flush=True,
  )
  out = build_index(trained, images, args.out, args.map_dtype, args.chunk, args.batch_size)
  if out["already_complete"]:
    print(f"{args.out} is already complete: nothing to do.", flush=True)
  elif out["chunks_done_before"]:
    print(f"resumed: {out['chunks_done_before']} of {out['chunks']} chunks were done.", flush=True)
  line = f"{out['indexed']} images indexed, {out['skipped']} skipped"
  if out["skipped"]:
    line += f" (listed in {args.out}/skipped.csv)"
  if out["embedded"]:
    rate = out["embedded"] / out["seconds"]
    line += f"; {out['embedded']} embedded in {out['seconds']:.1f}s ({rate:.1f} images/s)"
  print(line, flush=True)


if __name__ == "__main__":
  cli.run_plain(main)
