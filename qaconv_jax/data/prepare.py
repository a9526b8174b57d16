"""Prepare a re-ID dataset as TFDS array_record (no TensorFlow needed).

python -m qaconv_jax.data.prepare --dataset market1501 --manual-dir DIR --data-dir DIR
"""

from __future__ import annotations

import argparse

from qaconv_jax.data.tfds_builders import BUILDERS, prepare


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dataset", required=True, choices=sorted(BUILDERS))
  ap.add_argument("--manual-dir", required=True, help="the dataset's own folder")
  ap.add_argument("--data-dir", required=True, help="where TFDS writes the prepared data")
  args = ap.parse_args(argv)
  builder = prepare(args.dataset, args.manual_dir, args.data_dir)
  info = builder.info
  print(
    f"prepared {args.dataset} in {builder.data_dir}: "
    + ", ".join(f"{k} {v.num_examples}" for k, v in info.splits.items())
  )


if __name__ == "__main__":
  from qaconv_jax import cli

  cli.run_plain(main)
