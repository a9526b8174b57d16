"""Image decoding, resizing and the official training augmentations (docs/method.md §4).

Everything works on uint8 ``[H, W, 3]`` PIL/NumPy images and a ``np.random.Generator`` that
grain derives from (seed, element index), so a batch is a pure function of its indices.

- ``"v1.0"``: resize, random horizontal flip, RandomOcclusion (always one white square).
- ``"v1.2"``: resize, pad 10 + random crop, flip, rotation +-5 deg, colour jitter
  (brightness/contrast/saturation factors in [0.5, 2], hue +-0.1, random order), occlusion.
- ``"flip"``: resize and random horizontal flip only (short from-scratch runs, the demo).
- ``"none"``: resize only (evaluation).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from qaconv_jax.errors import ConfigError, DataError

AUGMENTATIONS = ("none", "flip", "v1.0", "v1.2")


class ImageDecodeError(DataError):
  """An image file that cannot be decoded."""


def decode(data: bytes | np.ndarray, where: str) -> Image.Image:
  """Encoded bytes (or an already decoded array) -> RGB PIL image; names ``where`` on error."""
  if isinstance(data, np.ndarray):
    return Image.fromarray(data).convert("RGB")
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except UnidentifiedImageError:
    raise ImageDecodeError(
      f"cannot decode image {where}: not an image format PIL reads (or a corrupt header)."
    ) from None
  except Exception as e:  # PIL raises several types for corrupt files
    raise ImageDecodeError(f"cannot decode image {where}: {type(e).__name__}: {e}") from None
  return img.convert("RGB")


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
  """Bicubic resize to ``size = (H, W)``."""
  h, w = size
  return img if img.size == (w, h) else img.resize((w, h), Image.BICUBIC)


def random_occlusion(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One white square of side ``U{1 .. int(0.8 * min(H, W)) - 1}`` (101 at 384x128) at a
  uniform position, always applied: the official RandomOcclusion."""
  h, w = x.shape[:2]
  max_side = max(1, int(0.8 * min(h, w)) - 1)
  side = int(rng.integers(1, max_side + 1))
  y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
  x = x.copy()
  x[y0 : y0 + side, x0 : x0 + side] = 255
  return x


def _pad_crop(img: Image.Image, rng: np.random.Generator, pad: int = 10) -> Image.Image:
  w, h = img.size
  padded = ImageOps.expand(img, border=pad, fill=0)
  x0, y0 = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
  return padded.crop((x0, y0, x0 + w, y0 + h))


def _hue_shift(img: Image.Image, shift: float) -> Image.Image:
  hsv = np.asarray(img.convert("HSV")).copy()
  hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(round(shift * 255))) % 256
  return Image.fromarray(hsv, "HSV").convert("RGB")


def _colour_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
  ops = [
    lambda im, f: ImageEnhance.Brightness(im).enhance(f),
    lambda im, f: ImageEnhance.Contrast(im).enhance(f),
    lambda im, f: ImageEnhance.Color(im).enhance(f),
  ]
  factors = rng.uniform(0.5, 2.0, 3)
  hue = rng.uniform(-0.1, 0.1)
  for i in rng.permutation(4):
    img = _hue_shift(img, hue) if i == 3 else ops[i](img, factors[i])
  return img


def augment(
  img: Image.Image, size: tuple[int, int], kind: str, rng: np.random.Generator | None
) -> np.ndarray:
  """Resized (and, unless ``kind == "none"``, augmented) uint8 ``[H, W, 3]``."""
  if kind not in AUGMENTATIONS:
    raise ConfigError(f"unknown augmentation {kind!r}; expected one of {AUGMENTATIONS}.")
  img = resize(img, size)
  if kind == "none":
    return np.asarray(img)
  if kind == "v1.2":
    img = _pad_crop(img, rng)
  if rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  if kind == "flip":
    return np.asarray(img)
  if kind == "v1.2":
    img = img.rotate(float(rng.uniform(-5.0, 5.0)), resample=Image.BICUBIC)
    img = _colour_jitter(img, rng)
  return random_occlusion(np.asarray(img), rng)
