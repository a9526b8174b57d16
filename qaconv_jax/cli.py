"""What every command-line entry point shares: quiet library logs and one-line errors.

``run(main)`` is ``absl.app.run(main)`` plus two things. Library INFO logs (Orbax, absl, grain,
TFDS: hundreds of lines of checkpoint internals per run) are hidden unless ``--verbosity`` is
given (``--verbosity=0`` shows INFO, ``1`` debug); our own progress lines and tables are
printed, not logged, so they stay. And the project's own errors (`qaconv_jax.errors`: a bad
config value, a data set that cannot be used, a checkpoint of another model) print
``error: <message>`` and exit with status 1; ``--debug`` shows their traceback instead. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging

from qaconv_jax.errors import QAConvError

_DEBUG = flags.DEFINE_bool("debug", False, "Show the Python traceback of an error.")


@contextlib.contextmanager
def user_errors(debug: bool = False):
  """Turns a `QAConvError` raised inside into ``error: <message>`` on stderr and exit 1."""
  try:
    yield
  except QAConvError as e:
    if debug:
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def quiet_library_logs() -> None:
  """Warnings and errors only from the libraries' loggers (absl's root handler)."""
  absl_logging.set_verbosity(absl_logging.WARNING)


def run_plain(main: Callable[[list[str]], object]) -> None:
  """For the argparse entry points (convert, prepare, synthetic): ``main(argv)`` with
  one-line errors; ``--debug`` anywhere on the command line shows the traceback."""
  argv = sys.argv[1:]
  with user_errors(debug="--debug" in argv):
    main([a for a in argv if a != "--debug"])


def count(text: str) -> int:
  """An argparse type: an integer >= 1 (else argparse's own one-line usage error)."""
  import argparse

  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
  return value


def add_distributed_args(parser) -> None:
  """An argparse entry point's multi-host flags (as train.py's): every host passes
  ``--coordinator-address HOST:PORT --num-processes N --process-id I``, or ``--distributed``
  alone where `jax.distributed` finds them itself (Cloud TPU, SLURM, ...)."""
  parser.add_argument("--coordinator-address", help="jax.distributed coordinator HOST:PORT.")
  parser.add_argument("--num-processes", type=int, help="Processes (hosts) in the run.")
  parser.add_argument("--process-id", type=int, help="This process's index.")
  parser.add_argument(
    "--distributed", action="store_true", help="jax.distributed.initialize() from the environment."
  )


def init_distributed(args) -> None:
  """`jax.distributed.initialize` when `add_distributed_args`' flags ask for it."""
  if args.coordinator_address or args.num_processes or args.distributed:
    import jax

    jax.distributed.initialize(
      coordinator_address=args.coordinator_address,
      num_processes=args.num_processes,
      process_id=args.process_id,
    )


def run(main: Callable[[list[str]], object]) -> None:
  """``absl.app.run(main)`` with quiet library logs and one-line errors (module docstring)."""

  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      quiet_library_logs()
    with user_errors(_DEBUG.value):
      return main(argv)

  app.run(wrapped)
