"""Train QAConv.

  python train.py --config configs/default.py[:tiny] --workdir DIR [--config.KEY=VALUE ...]

Multi-host: pass --coordinator_address HOST:PORT --num_processes N --process_id I on every
host, or --distributed alone where jax.distributed finds them itself (Cloud TPU, SLURM, ...).
A bad config value, data set or checkpoint prints one line and exits 1 (--debug: the
traceback); libraries log warnings only (--verbosity=0: their INFO logs too).
"""

import jax
from absl import flags
from ml_collections import config_flags

from qaconv_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and results go here.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes (hosts) in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "jax.distributed.initialize() from the environment."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if _COORDINATOR.value or _NUM_PROCESSES.value or _DISTRIBUTED.value:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  from qaconv_jax.training import train_and_evaluate  # after distributed init

  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
