"""qaconv-jax: QAConv person re-identification in JAX/Flax.

The names below are imported on first use, so ``import qaconv_jax.exported`` (an exported
model, run with jax and numpy alone) does not load Flax or the model code.
"""

import importlib

_EXPORTS = {
  "focal_memory_loss": "qaconv_jax.losses",
  "memory_accuracy": "qaconv_jax.losses",
  "init_class_memory": "qaconv_jax.memory",
  "update_class_memory": "qaconv_jax.memory",
  "QAConvModel": "qaconv_jax.models.model",
  "build_model": "qaconv_jax.models.model",
  "QAConv": "qaconv_jax.models.qaconv",
  "match_maxima": "qaconv_jax.models.qaconv",
  "match_maxima_with_indices": "qaconv_jax.models.qaconv",
  "qaconv_distance": "qaconv_jax.models.qaconv",
  "qaconv_score": "qaconv_jax.models.qaconv",
  "ResNet": "qaconv_jax.models.resnet",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'qaconv_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_EXPORTS])
