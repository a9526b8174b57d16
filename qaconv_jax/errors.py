"""The project's own exceptions: problems with what the user gave (a config value, a data set,
a checkpoint), as opposed to bugs. The command-line entry points print their message alone,
without a traceback (`qaconv_jax.cli`); every one also derives from the builtin a caller would
expect (``ValueError``, ``FileNotFoundError``, ...), so library callers can catch either.
"""

from __future__ import annotations


class QAConvError(Exception):
  """Base class: the message says what was wrong and what was expected."""


class ConfigError(QAConvError, ValueError):
  """A config value outside its allowed range, or settings that contradict each other."""


class DataError(QAConvError, ValueError):
  """Data that cannot be used as given: labels, images, folders, splits."""


class CheckpointMismatch(QAConvError, ValueError):
  """A checkpoint written for a different model or run."""


class CheckpointNotFound(QAConvError, FileNotFoundError):
  """No checkpoint (or not the asked-for step) where one was expected."""


class TrainingDiverged(QAConvError, FloatingPointError):
  """A non-finite loss or metric: training stopped before checkpointing a broken state."""


class MissingFile(QAConvError, FileNotFoundError):
  """A file or folder the user pointed at (an image, a prepared data set) is not there."""


class OutputExists(QAConvError, FileExistsError):
  """An output folder that already holds what would be overwritten."""


class MissingExtra(QAConvError, ImportError):
  """An optional dependency (e.g. torch for .pth files) is not installed."""
