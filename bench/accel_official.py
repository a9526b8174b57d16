"""The authors' PyTorch code for bench_accel.py: their files read from a clone of
github.com/ShengcaiLiao/QAConv (``git show`` at a revision, or a plain tree), imported at run time,
and timed as the official rows of the matcher (v2.1 QAConv, their evaluation loop) and train
(v1.2 ResMap + QAConv + ClassMemoryLoss, SGD as their main.py) sections. torch is imported only
inside the sections, so that this module loads (and the rows say why they are skipped) without
it."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

from accel_common import FLOP_PER_PAIR, D, H, W, median_time, train_sizes


def official_files(repo: str, rev: str, paths: list[str]) -> tuple[dict[str, str], str]:
  """``({path: local file}, where from)`` for ``paths`` of the official repository: from git
  at ``rev`` when ``repo`` is a git repository holding them there, else from its tree."""
  files, tmp = {}, None
  for path in paths:
    try:
      res = subprocess.run(["git", "-C", repo, "show", f"{rev}:{path}"], capture_output=True)
    except OSError:  # no git on this machine: a plain checkout is still usable
      break
    if res.returncode != 0:
      break
    if tmp is None:
      tmp = tempfile.mkdtemp(prefix="qaconv_official_")
      atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    files[path] = os.path.join(tmp, path.replace("/", "__"))
    with open(files[path], "wb") as f:
      f.write(res.stdout)
  else:
    commit = subprocess.run(
      ["git", "-C", repo, "rev-parse", "--short", f"{rev}^{{commit}}"],
      capture_output=True,
      text=True,
    ).stdout.strip()
    return files, f"{rev} ({commit})"
  missing = [p for p in paths if not os.path.isfile(os.path.join(repo, p))]
  if missing:
    raise FileNotFoundError(f"{repo} has no {rev}:{missing[0]} (git) nor {missing[0]} (tree)")
  return {p: os.path.join(repo, p) for p in paths}, f"tree of {repo}"


def load_module(name: str, file: str):
  spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def official_skip_reason(repo: str | None) -> str | None:
  if not repo:
    return "no --official_repo"
  if importlib.util.find_spec("torch") is None:
    return "torch not importable"
  if not os.path.isdir(repo):
    return f"{repo} is not a directory"
  return None


def torch_unit_maps(torch, n: int, seed: int, device, dtype, hw=(H, W)):
  gen = torch.Generator(device=device).manual_seed(seed)
  x = torch.randn(n, D, *hw, generator=gen, device=device)  # NCHW, as their code takes maps
  return torch.nn.functional.normalize(x, dim=1).to(dtype)


def torch_sync(torch, device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize()


def error_text(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def official_matcher_section(args) -> dict:
  import torch

  files, where = official_files(
    args.official_repo, args.official_matcher_rev, ["reid/models/qaconv.py"]
  )
  module = load_module("official_qaconv_matcher", files["reid/models/qaconv.py"])
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  p, g = (16, 32) if args.small else (args.probes, args.gallery)
  pb, gb = min(args.official_prob_batch, p), min(args.official_gal_batch, g)
  rows = []
  dtypes = [("float32", torch.float32)]
  if device.type == "cuda":
    dtypes.append(("float16", torch.float16))  # the authors' HEAD tests with .half()
  for name, dtype in dtypes:
    row = {"case": f"official {where} QAConv, chunks {pb}x{gb} (+ their head)", "dtype": name}
    rows.append(row)
    try:
      matcher = module.QAConv(D, H, W).to(device=device, dtype=dtype).eval()
      probe = torch_unit_maps(torch, p, 0, device, dtype)
      gallery = torch_unit_maps(torch, g, 1, device, dtype)
      kernel_api = hasattr(matcher, "make_kernel")  # v1.x-v2.1; HEAD: forward(probe, gallery)

      def run(matcher=matcher, probe=probe, gallery=gallery, kernel_api=kernel_api):
        # Their evaluators.pairwise_distance: probe chunks x gallery chunks into one [p, g].
        with torch.no_grad():
          score = torch.zeros(p, g, device=device)
          for i in range(0, p, pb):
            kernel = probe[i : i + pb]
            if kernel_api:
              matcher.make_kernel(kernel)
            for k in range(0, g, gb):
              chunk = gallery[k : k + gb]
              score[i : i + pb, k : k + gb] = (
                matcher(chunk) if kernel_api else matcher(kernel, chunk)
              )
        torch_sync(torch, device)

      if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
      pps = p * g / median_time(run, args.reps)
      row.update(pps=pps, tflops=pps * FLOP_PER_PAIR / 1e12, peak_gb=torch_peak_gb(torch, device))
    except Exception as e:  # one failed row (out of memory, say) leaves the others standing
      row["error"] = error_text(e)
    finally:
      matcher = probe = gallery = None
      if device.type == "cuda":
        torch.cuda.empty_cache()
  kind = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
  return {"rows": rows, "kind": kind}


def torch_peak_gb(torch, device) -> float | None:
  return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def official_step(torch, model, criterion, optimizer, x, y, losses: list, bf16: bool, device):
  """One step of their trainers.Trainer: forward, loss, loss.item(), zero_grad, backward, SGD
  step; under torch.autocast(bfloat16) when ``bf16`` (HEAD trains under float16 autocast)."""

  def step():
    model.train()
    criterion.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    with autocast if bf16 else contextlib.nullcontext():
      feature = model(x)
      loss, acc = criterion(feature, y)
      loss, acc = torch.mean(loss), torch.mean(acc)
    losses.append(loss.item())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    torch_sync(torch, device)

  return step


def official_train_section(args) -> dict:
  import warnings

  import torch

  paths = ["reid/models/resmap.py", "reid/models/qaconv.py", "reid/loss/class_memory_loss.py"]
  repo = args.official_train_repo or args.official_repo
  files, where = official_files(repo, args.official_train_rev, paths)
  resmap = load_module("official_resmap", files[paths[0]])
  qaconv = load_module("official_qaconv", files[paths[1]])
  cml = load_module("official_class_memory_loss", files[paths[2]])
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.backends.cudnn.benchmark = True  # as their main.py
  size, classes, batches, (depth, _) = train_sizes(args)
  hei, wid = size[0] // 16, size[1] // 16  # layer3: stride 16
  rows = []
  for dtype_name in ("float32", "autocast bf16"):
    torch.manual_seed(0)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
      warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation
      model = resmap.create(f"resnet{depth}", final_layer="layer3", neck=D, pretrained=False)
    matcher = qaconv.QAConv(D, hei, wid)
    # mem_batch_size 16: their main.py's default (the memory is matched 16 classes at a time).
    criterion = cml.ClassMemoryLoss(matcher, classes, D, hei, wid, 16)
    model, criterion = model.to(device), criterion.to(device)
    with torch.no_grad():  # never time on zeros: a random unit memory, every class valid
      memory = torch_unit_maps(torch, classes, 3, device, torch.float32, (hei, wid))
      criterion.class_memory.copy_(memory)
      criterion.valid_class.fill_(1.0)
    base = {id(q) for q in model.base.parameters()}
    lr = 0.005  # their main.py's default; the rate does not change the time
    optimizer = torch.optim.SGD(
      [
        {"params": model.base.parameters(), "lr": 0.1 * lr},
        {"params": [q for q in model.parameters() if id(q) not in base], "lr": lr},
        {"params": criterion.parameters(), "lr": lr},
      ],
      lr=lr,
      momentum=0.9,
      weight_decay=5e-4,
      nesterov=True,
    )
    for b in batches:
      row = {"case": f"official {where} ResNet-{depth}", "dtype": dtype_name, "batch": b}
      rows.append(row)
      try:
        x = torch.rand(b, 3, *size, device=device)
        y = torch.randint(0, classes, (b,), device=device)
        losses = []
        bf16 = dtype_name != "float32"
        step = official_step(torch, model, criterion, optimizer, x, y, losses, bf16, device)
        if device.type == "cuda":
          torch.cuda.reset_peak_memory_stats()
        t = median_time(step, args.train_steps, warmup=3)  # cudnn.benchmark tunes at first
        row.update(s=t, ips=b / t, loss=losses[-1], peak_gb=torch_peak_gb(torch, device))
      except Exception as e:  # e.g. their memory update under autocast: the others still run
        row["error"] = error_text(e)
    model = criterion = optimizer = None
    if device.type == "cuda":
      torch.cuda.empty_cache()
  flags = (
    f"torch {torch.__version__}: cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
    f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, cudnn.benchmark=True"
  )
  return {"rows": rows, "flags": flags}
