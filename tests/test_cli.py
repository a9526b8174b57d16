"""The command lines: the project's own errors print one line and exit 1, --debug shows the
traceback, bugs keep theirs."""

import os

import pytest

from configs.default import get_config
from tests.runs import run_python, save_untrained_checkpoint


def _one_error_line(proc, starts):
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith(starts), proc.stderr[-3000:]


def test_train_py_bad_config_values_are_one_line(tmp_path):
  proc = run_python(
    "train.py",
    "--config",
    "configs/default.py:tiny",
    "--workdir",
    str(tmp_path),
    "--config.checkpoint.every=0",
    "--config.eval.k2=30",
  )
  _one_error_line(
    proc,
    "error: invalid config: checkpoint.every=0: expected an integer >= 1; "
    "eval.k2=30: expected an integer in [1, k1 + 1] = [1, 21]",
  )
  assert not os.listdir(tmp_path)  # refused before any work


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  save_untrained_checkpoint(get_config("tiny"), workdir, step=3)
  return workdir


def test_checkpoint_mismatch_is_one_line_and_debug_shows_the_traceback(float32_run):
  args = (
    "eval.py",
    "--config",
    "configs/default.py:tiny",
    "--workdir",
    float32_run,
    "--config.model.neck_dim=16",
  )
  _one_error_line(
    run_python(*args),
    "error: the checkpoint was written for a different model: neck_dim: checkpoint 32 vs config 16",
  )
  debug = run_python(*args, "--debug")
  assert debug.returncode != 0 and "Traceback" in debug.stderr
  assert "qaconv_jax.errors.CheckpointMismatch: the checkpoint was written" in debug.stderr


def test_argparse_entry_points_too(tmp_path):
  _one_error_line(
    run_python(
      "-m",
      "qaconv_jax.convert",
      "--from",
      str(tmp_path / "missing.pth"),
      "--to",
      str(tmp_path / "out"),
    ),
    f"error: no such file: {tmp_path / 'missing.pth'}",
  )
