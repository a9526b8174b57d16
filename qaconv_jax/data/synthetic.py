"""Synthetic re-ID data: structured persons seen by the cameras of two domains.

Each identity is a set of clothing colours and accessories; each image renders it in a
figure coordinate frame (u across the body, v down from the head) mapped from pixels by a
random affine transform, so detector shifts, scale changes and crops come from the same
mechanism; viewpoint (front/back mirrors the accessories), occluders, blur and noise are
drawn per image. Each camera has its own background and illumination, and the domains
``a`` and ``b`` differ in cameras, palettes, backgrounds and image statistics.

``python -m qaconv_jax.data.synthetic --out DIR --domain a --num-ids 500 --seed 0`` writes a
Market-1501 tree (``bounding_box_train/``, ``bounding_box_test/``, ``query/``, distractors
pid 0 and junk pid -1 included) whose time stamps come from `crowd.simulate_walks`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image, ImageFilter

from qaconv_jax.data.crowd import simulate_walks
from qaconv_jax.errors import ConfigError


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
    top=colour(),
    top_pattern=str(rng.choice(["solid", "stripes", "split"])),
    top_second=colour(),
    bottom=colour(),
    shoes=rng.uniform(0.0, 0.4, 3),
    bag_side=int(rng.choice([-1, 0, 1])),
    bag=colour(),
    hat=bool(rng.random() < 0.3),
    height=float(rng.uniform(0.9, 1.05)),
  )


def _box(u, v, u0, u1, v0, v1):
  return (u >= u0) & (u < u1) & (v >= v0) & (v < v1)


def render_person(
  ident: Identity,
  rng: np.random.Generator,
  size: tuple[int, int] = (128, 64),
  background: np.ndarray | None = None,
  misalign: float = 1.0,
  occlude: bool = True,
  noise: float = 0.03,
) -> np.ndarray:
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

  paint(
    _box(u, v, -0.16 + swing, -0.05 + swing, 0.5, 0.95)
    | _box(u, v, 0.05 - swing, 0.16 - swing, 0.5, 0.95),
    ident.bottom,
  )  # legs
  paint(
    _box(u, v, -0.17 + swing, -0.04 + swing, 0.95, 1.0)
    | _box(u, v, 0.04 - swing, 0.17 - swing, 0.95, 1.0),
    ident.shoes,
  )
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
    img[oy : oy + oh, ox : ox + ow] = rng.uniform(0.2, 0.8, 3)
  img = img * rng.uniform(0.8, 1.2) + rng.normal(0.0, noise, img.shape)
  return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def make_identity_set(
  num_ids: int, images_per_id: int, seed: int, size: tuple[int, int] = (128, 64)
):
  """A small labelled set: ``(images [N, H, W, 3] uint8, labels [N] int32)`` with the
  images of identity i at rows ``i*images_per_id ...``. Deterministic from ``seed``."""
  rng = np.random.default_rng(seed)
  idents = [random_identity(rng) for _ in range(num_ids)]
  images = np.stack(
    [render_person(idents[i], rng, size) for i in range(num_ids) for _ in range(images_per_id)]
  )
  labels = np.repeat(np.arange(num_ids, dtype=np.int32), images_per_id)
  return images, labels


@dataclasses.dataclass(frozen=True)
class Domain:
  """Image statistics of one synthetic domain."""

  num_cameras: int
  palette_shift: float  # rotates clothing colours
  tint: tuple[float, float, float]  # colour cast of every camera
  contrast: float
  gamma: float
  blur: float  # max Gaussian blur radius in pixels
  noise: float
  pid_base: int  # keeps the two domains' pid numbers apart


DOMAINS = {
  "a": Domain(
    num_cameras=6,
    palette_shift=0.0,
    tint=(1.06, 1.0, 0.9),
    contrast=1.0,
    gamma=1.0,
    blur=0.6,
    noise=0.03,
    pid_base=0,
  ),
  "b": Domain(
    num_cameras=5,
    palette_shift=0.5,
    tint=(0.88, 0.98, 1.12),
    contrast=0.75,
    gamma=1.25,
    blur=1.2,
    noise=0.05,
    pid_base=5000,
  ),
}
IMAGE_SIZE = (128, 64)  # Market-1501 crops


def camera_background(
  domain: Domain, rng: np.random.Generator, size: tuple[int, int] = IMAGE_SIZE
) -> np.ndarray:
  """``[H, W, 3]`` float background of one camera: wall, floor and pillars."""
  h, w = size
  wall, floor = rng.uniform(0.2, 0.8, 3), rng.uniform(0.1, 0.6, 3)
  horizon = int(rng.uniform(0.55, 0.8) * h)
  ys = np.linspace(0.0, 1.0, h)[:, None, None]
  img = np.where(
    np.arange(h)[:, None, None] < horizon, wall * (0.8 + 0.4 * ys), floor * (1.2 - 0.4 * ys)
  ) * np.ones((h, w, 3))
  for _ in range(int(rng.integers(0, 3))):
    x0 = int(rng.integers(0, w - 6))
    img[:horizon, x0 : x0 + int(rng.integers(3, 10))] = rng.uniform(0.2, 0.9, 3)
  return img


def apply_camera(
  img: np.ndarray, gain: np.ndarray, domain: Domain, rng: np.random.Generator
) -> np.ndarray:
  """Camera illumination and the domain's statistics on a float image in [0, 1]."""
  img = img * gain * np.asarray(domain.tint)
  img = (img - 0.5) * domain.contrast + 0.5
  img = np.clip(img, 0.0, 1.0) ** domain.gamma
  img = img + rng.normal(0.0, domain.noise, img.shape)
  out = Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
  radius = rng.uniform(0.0, domain.blur)
  return np.asarray(out.filter(ImageFilter.GaussianBlur(radius)) if radius > 0.2 else out)


def _junk(background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A bad detection: background with a sliver of somebody at the border."""
  img = background.copy()
  w = img.shape[1]
  x0 = int(rng.integers(0, w // 2))
  img[:, x0 : x0 + int(rng.integers(2, w // 4))] = rng.uniform(0.0, 1.0, 3)
  return img


def write_market_tree(
  out: str,
  domain_name: str,
  num_ids: int,
  seed: int,
  distractor_frac: float = 0.05,
  junk_frac: float = 0.03,
) -> dict:
  """Writes a Market-1501-format tree for ``num_ids`` people (half train, half test).

  Returns counts per split. Deterministic from ``(domain_name, num_ids, seed)``.
  """
  if domain_name not in DOMAINS:
    raise ConfigError(
      f"unknown synthetic domain {domain_name!r}; expected one of {sorted(DOMAINS)}."
    )
  domain = DOMAINS[domain_name]
  rng = np.random.default_rng([seed, ord(domain_name)])
  cams = [
    (camera_background(domain, rng), rng.uniform(0.75, 1.25, 3) * rng.uniform(0.8, 1.2))
    for _ in range(domain.num_cameras)
  ]
  people = [random_identity(rng, domain.palette_shift) for _ in range(num_ids)]
  sightings = simulate_walks(num_ids, domain.num_cameras, rng)
  train_people = set(rng.permutation(num_ids)[: num_ids // 2].tolist())
  dirs = {k: os.path.join(out, k) for k in ("bounding_box_train", "bounding_box_test", "query")}
  for d in dirs.values():
    os.makedirs(d, exist_ok=True)
  counts = dict.fromkeys(dirs, 0)
  names: set[str] = set()

  def save(split: str, pid: int, cam: int, t: float, img: np.ndarray) -> None:
    frame = int(round(t * 25.0)) + 1
    k = 1
    pid_str = "-1" if pid == -1 else f"{pid:04d}"  # Market writes junk as -1_c...
    while (name := f"{pid_str}_c{cam + 1}s1_{frame:06d}_{k:02d}.jpg") in names:
      k += 1
    names.add(name)
    Image.fromarray(img).save(os.path.join(dirs[split], name), quality=90)
    counts[split] += 1

  queried: set[tuple[int, int]] = set()
  for s in sightings:
    pid = domain.pid_base + s.person + 1
    bg, gain = cams[s.camera]
    for t in np.sort(rng.uniform(s.enter, s.leave, int(rng.integers(2, 6)))):
      img = apply_camera(
        render_person(people[s.person], rng, IMAGE_SIZE, bg, noise=0.0) / 255.0, gain, domain, rng
      )
      if s.person in train_people:
        save("bounding_box_train", pid, s.camera, t, img)
      elif (s.person, s.camera) not in queried:  # one query per person and camera
        queried.add((s.person, s.camera))
        save("query", pid, s.camera, t, img)
      else:
        save("bounding_box_test", pid, s.camera, t, img)
  n_gallery = counts["bounding_box_test"]
  for pid, frac in ((0, distractor_frac), (-1, junk_frac)):
    for _ in range(int(frac * n_gallery)):
      cam = int(rng.integers(domain.num_cameras))
      bg, gain = cams[cam]
      body = (
        render_person(random_identity(rng, domain.palette_shift), rng, IMAGE_SIZE, bg, noise=0.0)
        / 255.0
        if pid == 0
        else _junk(bg, rng)
      )
      save(
        "bounding_box_test",
        pid,
        cam,
        rng.uniform(0.0, 3600.0),
        apply_camera(body, gain, domain, rng),
      )
  return counts


def main(argv=None) -> None:
  import argparse

  ap = argparse.ArgumentParser(description="Write a synthetic Market-1501-format re-ID tree.")
  ap.add_argument("--out", required=True, help="output folder (created)")
  ap.add_argument("--domain", choices=sorted(DOMAINS), default="a")
  ap.add_argument("--num-ids", type=int, default=500, help="people; half train, half test")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  counts = write_market_tree(args.out, args.domain, args.num_ids, args.seed)
  print(f"wrote {sum(counts.values())} images to {args.out}: {counts}")


if __name__ == "__main__":
  from qaconv_jax import cli

  cli.run_plain(main)
