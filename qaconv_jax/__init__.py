"""qaconv-jax: QAConv person re-identification in JAX/Flax."""

from qaconv_jax.losses import focal_memory_loss, memory_accuracy
from qaconv_jax.memory import init_class_memory, update_class_memory
from qaconv_jax.models.model import QAConvModel, build_model
from qaconv_jax.models.qaconv import (
  QAConv,
  match_maxima,
  match_maxima_with_indices,
  qaconv_distance,
  qaconv_score,
)
from qaconv_jax.models.resnet import ResNet

__all__ = [
  "QAConv",
  "QAConvModel",
  "ResNet",
  "build_model",
  "focal_memory_loss",
  "init_class_memory",
  "match_maxima",
  "match_maxima_with_indices",
  "memory_accuracy",
  "qaconv_distance",
  "qaconv_score",
  "update_class_memory",
]
__version__ = "0.1.0"
