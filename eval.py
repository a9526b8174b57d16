"""Evaluate a QAConv checkpoint.

  python eval.py --config configs/default.py:tiny --workdir DIR \
      [--config.eval.testsets=synthetic_b] [--checkpoint STEP] [--visualize N]

A bad config value, data set or checkpoint prints one line and exits 1 (--debug: the
traceback); libraries log warnings only (--verbosity=0: their INFO logs too).
"""

from absl import flags
from ml_collections import config_flags

from qaconv_jax import cli
from qaconv_jax.evaluation.eval_lib import evaluate_checkpoint

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Step to evaluate (default: latest).")
_VISUALIZE = flags.DEFINE_integer("visualize", 0, "Write pictures for the first N queries.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _VISUALIZE.value)


if __name__ == "__main__":
  cli.run(main)
