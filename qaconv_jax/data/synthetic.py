"""Synthetic re-ID data: uniformed groups of people seen by the cameras of two domains.

People come in groups that wear one uniform and differ only in local parts
(`synthetic_persons`): the trim of the top, textured chest and knee patches, a hat, a bag,
hair and shoes, all coloured from the group's accents. Each camera has its own background
and illumination, and the domains ``a`` (source) and ``b`` (target) differ in cameras,
palettes and image statistics; ``b`` also has a sloppier detector (larger shifts and scale
changes, crops) and more people partly hidden behind objects.

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
from qaconv_jax.data.synthetic_persons import random_person, random_uniform, render_person
from qaconv_jax.errors import ConfigError


def make_identity_set(
  num_ids: int,
  images_per_id: int,
  seed: int,
  size: tuple[int, int] = (128, 64),
  group_size: int = 1,
):
  """A small labelled set: ``(images [N, H, W, 3] uint8, labels [N] int32)`` with the
  images of identity i at rows ``i*images_per_id ...``. Deterministic from ``seed``.

  ``group_size`` people share each uniform; 1 (every person its own uniform) keeps the set
  easy, for tests that need a model to learn it in a few steps."""
  rng = np.random.default_rng(seed)
  uniforms = [random_uniform(rng) for _ in range(-(-num_ids // group_size))]
  people = [random_person(rng, uniforms[i // group_size], i // group_size) for i in range(num_ids)]
  images = np.stack(
    [render_person(people[i], rng, size) for i in range(num_ids) for _ in range(images_per_id)]
  )
  labels = np.repeat(np.arange(num_ids, dtype=np.int32), images_per_id)
  return images, labels


@dataclasses.dataclass(frozen=True)
class Domain:
  """Image statistics of one synthetic domain."""

  num_cameras: int
  palette_shift: float  # permutes clothing colour channels
  tint: tuple[float, float, float]  # colour cast of every camera
  contrast: float
  gamma: float
  blur: float  # max Gaussian blur radius in pixels
  noise: float
  pid_base: int  # keeps the two domains' pid numbers apart
  group_size: int  # people per uniform
  misalign: float  # detector shift / scale jitter, 1 = ±12% (render_person)
  occlude: float  # chance that an object hides part of the body


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
    group_size=5,
    misalign=0.8,
    occlude=0.2,
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
    group_size=5,
    misalign=1.2,
    occlude=0.35,
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


def _render(person, rng, background, domain: Domain) -> np.ndarray:
  return render_person(
    person, rng, IMAGE_SIZE, background, domain.misalign, domain.occlude, noise=0.0
  )


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
  num_groups = -(-num_ids // domain.group_size)
  uniforms = [random_uniform(rng, domain.palette_shift) for _ in range(num_groups)]
  people = [
    random_person(rng, uniforms[i // domain.group_size], i // domain.group_size)
    for i in range(num_ids)
  ]
  sightings = simulate_walks(num_ids, domain.num_cameras, rng)
  # Whole groups go to one side (but for the one the cut falls in), so the test side has
  # every member of its groups to tell apart.
  by_group = np.argsort(
    rng.permutation(num_groups)[np.arange(num_ids) // domain.group_size], kind="stable"
  )
  train_people = set(by_group[: num_ids // 2].tolist())
  dirs = {k: os.path.join(out, k) for k in ("bounding_box_train", "bounding_box_test", "query")}
  for d in dirs.values():
    os.makedirs(d, exist_ok=True)
  counts = dict.fromkeys(dirs, 0)
  names: set[str] = set()

  def save(split: str, pid: int, cam: int, t: float, img: np.ndarray) -> None:
    frame = max(0, int(round(t * 25.0))) + 1  # a walk's jitter can start before 0
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
      img = apply_camera(_render(people[s.person], rng, bg, domain) / 255.0, gain, domain, rng)
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
      # Distractors wear the test groups' uniforms too: more look-alikes to rank below.
      body = (
        _render(random_person(rng, uniforms[rng.integers(num_groups)]), rng, bg, domain) / 255.0
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
