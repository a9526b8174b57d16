"""The QAConv head (docs/method.md §2): BN -> FC -> BN over the matcher's maxima.

The matcher itself (``match_maxima``: XLA tiles, the Pallas kernel, their custom VJP) lives
in `qaconv_jax.models.matching`; it is re-exported here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from qaconv_jax.errors import ConfigError
from qaconv_jax.models.init import uniform
from qaconv_jax.models.matching import DEFAULT_BLOCK, match_maxima, match_maxima_with_indices
from qaconv_jax.models.matching_lists import match_maxima_lists
from qaconv_jax.models.norm import BatchNorm


class QAConv(nn.Module):
  """Matcher + head: ``(probe [p,h,w,d], gallery [g,h,w,d], train) -> logits [p, g]``.

  head "v1" (the paper): scalar BN -> Dense(2hw -> 1) -> scalar BN.
  head "v2" (v2.1): scalar BN -> one Dense(hw -> 1) applied to both halves, summed -> BN.
  Initialisation follows PyTorch's ``nn.Linear`` (v2: weight filled with 1/hw).

  Runtime knobs (no weight depends on them): ``block``/``impl``/``precision`` of
  `match_maxima`, ``dtype`` of its operands (the maxima, BN and FC stay float32), and
  ``gallery_axis``, the mesh axis the gallery (class memory) is split over.
  ``gallery_mask [g]`` (train mode) marks the real gallery rows: padding rows of a split
  memory are kept out of the BN statistics.

  Candidate lists (evaluation, docs/method.md §13): with ``anchor_is_probe [B, K]`` given,
  ``probe`` is ``[B, h, w, d]`` anchors and ``gallery`` ``[B, K, h, w, d]`` their
  candidates; the logits ``[B, K]`` are those of each (anchor, candidate) pair in the
  roles ``anchor_is_probe`` says (`match_maxima_lists`).
  """

  head: str = "v1"
  block: tuple[int, int] | str | None = "auto"
  impl: str = "xla"
  dtype: Any = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST
  gallery_axis: str | None = None
  anchors_per_step: int = 1

  @nn.compact
  def __call__(
    self,
    probe: jax.Array,
    gallery: jax.Array,
    train: bool,
    gallery_mask: jax.Array | None = None,
    anchor_is_probe: jax.Array | None = None,
  ) -> jax.Array:
    if self.head not in ("v1", "v2"):
      raise ConfigError(f"QAConv head must be 'v1' or 'v2', got {self.head!r}.")
    if anchor_is_probe is not None:
      if train:
        raise ValueError("candidate lists are scored in inference mode only (train=False).")
      x = match_maxima_lists(
        probe.astype(self.dtype),
        gallery.astype(self.dtype),
        anchor_is_probe,
        precision=self.precision,
        anchors_per_step=self.anchors_per_step,
      )  # [B, K, 2hw] float32
    else:
      x = match_maxima(
        probe.astype(self.dtype),
        gallery.astype(self.dtype),
        block=self.block,
        impl=self.impl,
        precision=self.precision,
        gallery_axis=self.gallery_axis,
      )  # [p, g, 2hw] float32
    hw = x.shape[-1] // 2
    mask = None if gallery_mask is None else gallery_mask[None, :, None]  # [1, g, 1]
    x = BatchNorm(scalar=True, name="bn")(x, train, mask)
    if self.head == "v1":
      fan_in = 2 * hw
      # nn.Linear's default: weight and bias both ~ U(+-1/sqrt(fan_in)).
      fc = nn.Dense(
        1,
        kernel_init=uniform(fan_in**-0.5),
        bias_init=uniform(fan_in**-0.5),
        precision=self.precision,
        name="fc",
      )
      logits = fc(x)[..., 0]  # [p, g] (lists: [B, K])
    else:
      fc = nn.Dense(
        1,
        kernel_init=nn.initializers.constant(1.0 / hw),
        bias_init=uniform(hw**-0.5),
        precision=self.precision,
        name="fc",
      )
      # Shared weights make the eval-mode score symmetric in (probe, gallery).
      logits = fc(x[..., :hw])[..., 0] + fc(x[..., hw:])[..., 0]  # [p, g]
    logit_mask = None if gallery_mask is None else gallery_mask[None, :]  # [1, g]
    return BatchNorm(scalar=True, name="logit_bn")(logits, train, logit_mask)


def qaconv_score(logits: jax.Array) -> jax.Array:
  """Evaluation similarity in (0, 1): ``sigmoid(logit / 10)`` as in the official code."""
  return jax.nn.sigmoid(logits / 10.0)


def qaconv_distance(logits: jax.Array) -> jax.Array:
  """Evaluation distance ``1 - score``."""
  return 1.0 - qaconv_score(logits)


# config.eval.distance (docs/method.md §5, §10).
EVAL_DISTANCES = ("sigmoid", "neg_logit")


def check_eval_distance(kind: str) -> None:
  """Raises `ConfigError` unless ``kind`` is one of `EVAL_DISTANCES`."""
  if kind not in EVAL_DISTANCES:
    raise ConfigError(f"eval.distance={kind!r}: expected 'sigmoid' or 'neg_logit'.")


def logit_distance(logits: jax.Array, kind: str = "sigmoid") -> jax.Array:
  """Evaluation distance of QAConv logits, any shape (e.g. ``[P, G]``) -> the same shape.

  ``"sigmoid"``: ``1 - sigmoid(logit / 10)`` (`qaconv_distance`), what ``pairwise_distance``
  in the authors' ``reid/evaluators.py`` returns from v1.0 through the v2.1 tag.
  ``"neg_logit"``: ``-logit``, what it returns on their master since commit 1e50faa (2023).
  Both rank alike; k-reciprocal re-ranking, which rescales and exponentiates distances,
  does not (docs/method.md §5).
  """
  check_eval_distance(kind)
  return qaconv_distance(logits) if kind == "sigmoid" else -logits


__all__ = [
  "match_maxima",
  "match_maxima_with_indices",
  "match_maxima_lists",
  "QAConv",
  "qaconv_score",
  "qaconv_distance",
  "logit_distance",
  "EVAL_DISTANCES",
  "DEFAULT_BLOCK",
]
