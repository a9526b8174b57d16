"""Synthetic persons: uniformed groups whose members differ only in local parts.

A `Uniform` is what a group wears: top and bottom colours, a trim colour and a small set of
accent colours. A `Person` wears its group's uniform and differs from the other members in
its parts: the trim pattern of the top (band, yoke, stripes, hem), textured patches on the
chest and knees (solid, stripes or checks), a hat, a bag, hair and shoes, every part
coloured from the group's accents. So members of a group share their global colour
statistics and a global average sees about the same blend of colours for each of them;
what tells them apart is which texture and colour sit together in one part, the kind of
evidence local matching compares region by region and averaging blurs.

`render_person` draws a person in a figure frame (u across the body, v down from the head)
mapped from pixels by a random affine transform, so detector shifts, scale changes and
crops come from one mechanism; the viewpoint (a back view mirrors the figure), occluders
and noise are drawn per image.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PATTERNS = ("band", "yoke", "vstripes", "hem")  # trim of the top, in the uniform's trim colour
TEXTURES = ("solid", "hstripes", "vstripes", "checks")  # of the chest and knee patches
HAIR = np.array([[0.08, 0.06, 0.05], [0.3, 0.18, 0.08], [0.75, 0.6, 0.3], [0.6, 0.6, 0.6]])


def random_colour(rng: np.random.Generator, palette_shift: float = 0.0) -> np.ndarray:
  """A clothing colour in RGB [0, 1]; ``palette_shift`` in [0, 1) permutes the channels (a
  domain knob: the same draws give other hues)."""
  c = rng.uniform(0.05, 0.95, 3)
  return np.roll(c, int(palette_shift * 3)) if palette_shift else c


@dataclasses.dataclass(frozen=True)
class Uniform:
  """What every member of a group wears. Colours are RGB in [0, 1]."""

  top: np.ndarray
  bottom: np.ndarray
  trim: np.ndarray
  accents: np.ndarray  # [A, 3]: the colours its members' parts are drawn from


def random_uniform(rng: np.random.Generator, palette_shift: float = 0.0) -> Uniform:
  return Uniform(
    top=random_colour(rng, palette_shift),
    bottom=random_colour(rng, palette_shift),
    trim=random_colour(rng, palette_shift),
    accents=np.stack([random_colour(rng, palette_shift) for _ in range(3)]),
  )


@dataclasses.dataclass(frozen=True)
class Person:
  """One identity: a uniform plus the parts that make it this member of its group."""

  uniform: Uniform
  group: int
  skin: np.ndarray
  hair: np.ndarray
  long_hair: bool
  pattern: str  # one of PATTERNS
  chest: tuple[str, np.ndarray]  # texture and colour of the patch on the chest
  knees: tuple[str, np.ndarray]  # ... and of the patches on both knees
  hat: np.ndarray | None  # colour, or None: no hat
  bag_side: int  # -1 left, +1 right, 0 none (as seen from the front)
  bag: np.ndarray
  shoes: np.ndarray
  height: float  # relative body height


def random_person(rng: np.random.Generator, uniform: Uniform, group: int = 0) -> Person:
  """A member of ``uniform``'s group; every part colour is one of the group's accents."""

  def accent():
    return uniform.accents[rng.integers(len(uniform.accents))]

  return Person(
    uniform=uniform,
    group=group,
    skin=np.array([0.9, 0.72, 0.58]) * rng.uniform(0.55, 1.0),
    hair=HAIR[rng.integers(len(HAIR))] * rng.uniform(0.8, 1.2),
    long_hair=bool(rng.random() < 0.4),
    pattern=str(rng.choice(PATTERNS)),
    chest=(str(rng.choice(TEXTURES)), accent()),
    knees=(str(rng.choice(TEXTURES)), accent()),
    hat=accent() if rng.random() < 0.5 else None,
    bag_side=int(rng.choice([-1, 0, 1])),
    bag=accent(),
    shoes=accent(),
    height=float(rng.uniform(0.92, 1.04)),
  )


def _box(u, v, u0, u1, v0, v1):
  return (u >= u0) & (u < u1) & (v >= v0) & (v < v1)


def render_person(
  person: Person,
  rng: np.random.Generator,
  size: tuple[int, int] = (128, 64),
  background: np.ndarray | None = None,
  misalign: float = 1.0,
  occlude: float = 0.3,
  noise: float = 0.03,
) -> np.ndarray:
  """One image ``[H, W, 3]`` uint8 of ``person``.

  ``misalign`` scales the random shift and scale of the detection box (0: centred, 1: the
  v1 detector's ±12%); ``occlude`` is the chance that an object hides part of the body
  (from below, from a side, or a pole across it).
  """
  h, w = size
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
  scale = person.height * (1.0 + misalign * rng.uniform(-0.12, 0.12))
  dx, dy = misalign * rng.uniform(-0.12, 0.12) * w, misalign * rng.uniform(-0.08, 0.08) * h
  u = (xs - w / 2 - dx) / (w * scale)  # -0.5..0.5 across a box-filling figure
  v = (ys - 0.04 * h - dy) / (0.92 * h * scale)  # 0 head top .. 1 feet
  facing_back = rng.random() < 0.5
  swing, gain = rng.uniform(-0.04, 0.04), rng.uniform(0.8, 1.2)
  # Drawn up front from a stream of its own: with or without the occluder, one seed gives
  # the same figure, the same view and the same gain.
  occluder_seed, occluded = rng.integers(2**63), rng.random() < occlude
  if facing_back:
    u = -u  # the figure is mirrored: a bag on the left is now on the right

  img = (np.full((h, w, 3), 0.35) if background is None else background).astype(np.float32)
  uni = person.uniform

  def paint(mask, colour):
    img[mask] = colour

  if person.long_hair:  # behind the shoulders: seen around the head from either side
    paint(_box(u, v, -0.14, 0.14, 0.05, 0.3), person.hair)
  legs = _box(u, v, -0.16 + swing, -0.04 + swing, 0.5, 0.95)
  legs |= _box(u, v, 0.04 - swing, 0.16 - swing, 0.5, 0.95)
  paint(legs, uni.bottom)
  shoes = _box(u, v, -0.18 + swing, -0.03 + swing, 0.92, 1.0)
  shoes |= _box(u, v, 0.03 - swing, 0.18 - swing, 0.92, 1.0)
  paint(shoes, person.shoes)
  arms = _box(u, v, -0.3, -0.2, 0.19, 0.52) | _box(u, v, 0.2, 0.3, 0.19, 0.52)
  torso = _box(u, v, -0.2, 0.2, 0.17, 0.56)
  paint(arms | torso, uni.top)
  # Each trim covers about the same area of the top: the colour histogram stays the group's.
  trim = {
    "band": torso & (v >= 0.3) & (v < 0.39),
    "yoke": (torso | arms) & (v < 0.24),
    "vstripes": torso & (np.floor((u + 0.2) * 25) % 3 == 1) & (v < 0.45),
    "hem": (torso & (v >= 0.48)) | (arms & (v >= 0.45)),
  }[person.pattern]
  paint(trim, uni.trim)
  for (texture, colour), mask in (
    (person.chest, _box(u, v, -0.13, 0.13, 0.26, 0.42)),
    (person.knees, legs & (v >= 0.66) & (v < 0.8)),
  ):
    paint(mask & _texture(texture, u, v), colour)
  head = (u / 0.11) ** 2 + ((v - 0.09) / 0.08) ** 2 <= 1.0
  paint(head, person.skin)
  # From behind the whole head is hair; from the front only its top.
  paint(head if facing_back else head & (v < 0.055), person.hair)
  if person.hat is not None:
    paint(_box(u, v, -0.14, 0.14, -0.03, 0.06) | _box(u, v, 0.0, 0.22, 0.05, 0.08), person.hat)
  if person.bag_side:
    # u is already mirrored for a back view, so the bag changes image side by itself.
    paint(_box(u * person.bag_side, v, 0.22, 0.42, 0.38, 0.62), person.bag)
    paint(_box(u * person.bag_side, v, 0.14, 0.2, 0.17, 0.4), person.bag)  # the strap

  if occluded:
    _occlude(img, u, v, np.random.default_rng(occluder_seed))
  img = img * gain + rng.normal(0.0, noise, img.shape)
  return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _occlude(img: np.ndarray, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> None:
  """Hides 20-45% of the body behind a plain or striped object, in the figure's frame."""
  kind = rng.integers(3)
  extent = rng.uniform(0.2, 0.45)
  if kind == 0:  # a bench, a car or a crowd in front: from below
    mask = v > 1.0 - extent
  elif kind == 1:  # somebody passing at one side
    side = rng.choice([-1.0, 1.0])
    mask = side * u > 0.45 - extent
  else:  # a pole or a sign across the body
    u0 = rng.uniform(-0.3, 0.1)
    mask = (u > u0) & (u < u0 + 0.5 * extent)
  colour = rng.uniform(0.1, 0.9, 3)
  if rng.random() < 0.5:  # a textured object, not a flat colour a model could learn to skip
    img[mask & (np.floor(v * 20) % 2 == 0)] = rng.uniform(0.1, 0.9, 3)
    mask = mask & (np.floor(v * 20) % 2 == 1)
  img[mask] = colour


def _texture(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Where a patch of texture ``name`` takes its colour (elsewhere the cloth shows)."""
  if name == "solid":
    return np.ones_like(u, bool)
  hs, vs = np.floor(v * 24) % 2 == 0, np.floor(u * 12) % 2 == 0
  return {"hstripes": hs, "vstripes": vs, "checks": hs ^ vs}[name]
