"""Synthetic persons: structured figures whose appearance is an identity, drawn with the
nuisances QAConv is meant to survive (detector misalignment, viewpoint, occlusion, noise).

Each identity is a set of clothing colours and accessories; each image renders it in a
figure coordinate frame (u across the body, v down from the head) mapped from pixels by a
random affine transform, so shifts, scale changes and crops come from the same mechanism.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Identity:
  """Appearance of one person. Colours are RGB in [0, 1]."""
  skin: np.ndarray
  hair: np.ndarray
  top: np.ndarray
  top_pattern: str  # "solid" | "stripes" | "split"
  top_second: np.ndarray
  bottom: np.ndarray
  shoes: np.ndarray
  bag_side: int  # -1 left, +1 right, 0 none (as seen from the front)
  bag: np.ndarray
  hat: bool
  height: float  # relative body height


def random_identity(rng: np.random.Generator, palette_shift: float = 0.0) -> Identity:
  """Draws one identity; ``palette_shift`` in [0, 1) rotates clothing hues (a domain knob)."""
  def colour():
    c = rng.uniform(0.05, 0.95, 3)
    return np.roll(c, int(palette_shift * 3)) if palette_shift else c
  return Identity(
      skin=np.array([0.9, 0.72, 0.58]) * rng.uniform(0.55, 1.0),
      hair=rng.uniform(0.0, 0.35, 3),
      top=colour(), top_pattern=str(rng.choice(["solid", "stripes", "split"])),
      top_second=colour(), bottom=colour(), shoes=rng.uniform(0.0, 0.4, 3),
      bag_side=int(rng.choice([-1, 0, 1])), bag=colour(), hat=bool(rng.random() < 0.3),
      height=float(rng.uniform(0.9, 1.05)))


def _box(u, v, u0, u1, v0, v1):
  return (u >= u0) & (u < u1) & (v >= v0) & (v < v1)


def render_person(ident: Identity, rng: np.random.Generator, size: tuple[int, int] = (128, 64),
                  background: np.ndarray | None = None, misalign: float = 1.0,
                  occlude: bool = True, noise: float = 0.03) -> np.ndarray:
  """One image ``[H, W, 3]`` uint8 of ``ident``.

  ``misalign`` scales the random shift/scale of the detection box; the viewpoint (front or
  back: the bag changes side) is drawn per image; ``occlude`` may hide a random rectangle
  with a plain object colour.
  """
  h, w = size
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
  scale = ident.height * (1.0 + misalign * rng.uniform(-0.12, 0.12))
  dx, dy = misalign * rng.uniform(-0.12, 0.12) * w, misalign * rng.uniform(-0.08, 0.08) * h
  u = (xs - w / 2 - dx) / (w * scale)  # -0.5..0.5 across a box-filling figure
  v = (ys - 0.04 * h - dy) / (0.92 * h * scale)  # 0 head top .. 1 feet
  facing_back = rng.random() < 0.5
  if facing_back:
    u = -u  # the figure is mirrored: a bag on the left is now on the right

  bg = np.zeros((h, w, 3), np.float32) if background is None else background.astype(np.float32)
  img = bg + (0.35 if background is None else 0.0)
  swing = rng.uniform(-0.04, 0.04)

  def paint(mask, colour):
    img[mask] = colour
  paint(_box(u, v, -0.16 + swing, -0.05 + swing, 0.5, 0.95) |
        _box(u, v, 0.05 - swing, 0.16 - swing, 0.5, 0.95), ident.bottom)  # legs
  paint(_box(u, v, -0.17 + swing, -0.04 + swing, 0.95, 1.0) |
        _box(u, v, 0.04 - swing, 0.17 - swing, 0.95, 1.0), ident.shoes)
  paint(_box(u, v, -0.3, -0.2, 0.2, 0.52) | _box(u, v, 0.2, 0.3, 0.2, 0.52), ident.top)  # arms
  torso = _box(u, v, -0.2, 0.2, 0.17, 0.55)
  paint(torso, ident.top)
  if ident.top_pattern == "stripes":
    paint(torso & ((np.floor(v * 30) % 2) == 0), ident.top_second)
  elif ident.top_pattern == "split":
    paint(torso & (v > 0.36), ident.top_second)
  head = (u / 0.11) ** 2 + ((v - 0.09) / 0.08) ** 2 <= 1.0
  paint(head, ident.skin)
  # From behind the whole head is hair; from the front only its top.
  paint(head if facing_back else head & (v < 0.06), ident.hair)
  if ident.hat:
    paint(_box(u, v, -0.13, 0.13, 0.0, 0.045), ident.top_second)
  if ident.bag_side:
    # u is already mirrored for a back view, so the bag changes image side by itself.
    paint(_box(u * ident.bag_side, v, 0.22, 0.38, 0.38, 0.6), ident.bag)
  if occlude and rng.random() < 0.3:
    oh, ow = int(rng.uniform(0.15, 0.4) * h), int(rng.uniform(0.3, 0.8) * w)
    oy, ox = rng.integers(0, h - oh), rng.integers(0, w - ow)
    img[oy:oy + oh, ox:ox + ow] = rng.uniform(0.2, 0.8, 3)
  img = img * rng.uniform(0.8, 1.2) + rng.normal(0.0, noise, img.shape)
  return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def make_identity_set(num_ids: int, images_per_id: int, seed: int,
                      size: tuple[int, int] = (128, 64)):
  """A small labelled set: ``(images [N, H, W, 3] uint8, labels [N] int32)`` with the
  images of identity i at rows ``i*images_per_id ...``. Deterministic from ``seed``."""
  rng = np.random.default_rng(seed)
  idents = [random_identity(rng) for _ in range(num_ids)]
  images = np.stack([render_person(idents[i], rng, size)
                     for i in range(num_ids) for _ in range(images_per_id)])
  labels = np.repeat(np.arange(num_ids, dtype=np.int32), images_per_id)
  return images, labels
