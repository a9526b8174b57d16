"""Pictures of evaluation results: ranking strips and local correspondences (Fig. 1b)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from qaconv_jax.models.qaconv import match_maxima_with_indices

GREEN, RED, BLUE = (40, 190, 60), (220, 40, 40), (60, 90, 220)


def _framed(img: np.ndarray, colour, size: tuple[int, int], border: int = 4) -> Image.Image:
  h, w = size
  frame = Image.new("RGB", (w + 2 * border, h + 2 * border), colour)
  frame.paste(Image.fromarray(img).resize((w, h), Image.BICUBIC), (border, border))
  return frame


def ranking_strip(
  query: np.ndarray,
  gallery: list[np.ndarray],
  correct: list[bool],
  size: tuple[int, int] = (128, 64),
) -> Image.Image:
  """The query (blue frame) then its ranked gallery images, green = same id, red = not."""
  tiles = [_framed(query, BLUE, size)] + [
    _framed(g, GREEN if ok else RED, size) for g, ok in zip(gallery, correct)
  ]
  gap = 12
  w = sum(t.width for t in tiles) + gap * len(tiles)
  strip = Image.new("RGB", (w, tiles[0].height), (255, 255, 255))
  x = 0
  for i, t in enumerate(tiles):
    strip.paste(t, (x, 0))
    x += t.width + (2 * gap if i == 0 else gap)
  return strip


def correspondences(
  query: np.ndarray,
  gallery: np.ndarray,
  maxima: np.ndarray,
  indices: np.ndarray,
  map_hw: tuple[int, int],
  top: int = 12,
  size: tuple[int, int] = (256, 128),
) -> Image.Image:
  """Query and gallery side by side with lines joining the ``top`` strongest matches.

  ``maxima``/``indices`` are one pair's ``[2hw]`` outputs of ``match_maxima_with_indices``;
  the probe-indexed half gives, for each query location, its best gallery location.
  """
  h, w = map_hw
  hw = h * w
  height, width = size
  gap = 24
  canvas = Image.new("RGB", (2 * width + gap, height), (255, 255, 255))
  canvas.paste(Image.fromarray(query).resize((width, height), Image.BICUBIC), (0, 0))
  canvas.paste(Image.fromarray(gallery).resize((width, height), Image.BICUBIC), (width + gap, 0))
  draw = ImageDraw.Draw(canvas)
  best = maxima[hw:]
  centre = lambda loc, x0: (x0 + (loc % w + 0.5) * width / w, (loc // w + 0.5) * height / h)
  lo, hi = float(best.min()), float(best.max())
  for s in np.argsort(-best)[:top]:
    strength = (best[s] - lo) / max(hi - lo, 1e-6)
    colour = (int(255 * (1 - strength)), int(200 * strength), 40)
    a, b = centre(int(s), 0), centre(int(indices[hw + s]), width + gap)
    draw.line([a, b], fill=colour, width=2)
    for x, y in (a, b):
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colour, width=2)
  return canvas


def match_picture(
  query: np.ndarray, gallery: np.ndarray, query_map: np.ndarray, gallery_map: np.ndarray
) -> Image.Image:
  """`correspondences` of one pair from its images (uint8 ``[H, W, 3]``) and unit maps
  (``[h, w, d]``, any stored dtype): the matcher's maxima and argmaxima found here."""
  maxima, idx = match_maxima_with_indices(
    np.asarray(query_map, np.float32)[None], np.asarray(gallery_map, np.float32)[None]
  )  # [1, 1, 2hw] each
  return correspondences(
    query, gallery, np.asarray(maxima[0, 0]), np.asarray(idx[0, 0]), query_map.shape[:2]
  )
