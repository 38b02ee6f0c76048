"""`pqfn bench`: pqfn's trial engine against the naive PyTorch loop a user would write, in one process.

Both run the same K-fold trial (same balanced pool, same folds, same model, optimizer, schedule,
seeds and epochs) and measure the same things every epoch (eval-mode accuracy and loss on the
training fold without augmentation and on the validation fold):

- naive: a torch Dataset that opens every image file with PIL on every access and applies
  torchvision transforms per sample (Resize, RandomRotation, ColorJitter, ToTensor, Normalize),
  a DataLoader, fp32, contiguous tensors, evaluation at the training batch size, the folds one
  after another;
- engine: pqfn.trial.cross_validate (data decoded once, resized once per trial and held on the
  device, batched on-device augmentation, bf16/channels_last as trial.bf16/channels_last resolve,
  large-batch evaluation, no host synchronisation per step).

Images per second = training images (folds x epochs x training-fold size) / wall time of the whole
trial, model construction and per-trial resizing included. The data set's one-time decode (shared
by every trial of a sweep and cached on disk) is timed separately.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pqfn.config import Config, TrialConfig, with_overrides
from pqfn.data import Dataset
from pqfn.errors import ConfigError
from pqfn.metrics import fold_key
from pqfn.splits import Fold, build_pool, make_folds
from pqfn.trial import cross_validate, fold_workers, make_optimizer, pick_device, use_bf16, use_channels_last

# --ablate: each fast-path feature turned off alone
ABLATIONS: dict[str, dict[str, Any]] = {
    "fp32 (bf16 off)": {"trial.bf16": False},
    "contiguous (channels_last off)": {"trial.channels_last": False},
    "one fold at a time": {"trial.parallel_folds": 1},
    "native small-map convolutions (matmul off)": {"trial.small_maps": "native"},
}

# The study's chosen configuration and the README quickstart's trial, as trial-key overrides.
SETTINGS: dict[str, dict[str, Any]] = {
    "paper": {"trial.folds": 5, "trial.data_size": 840, "trial.resolution": 100, "trial.batch_size": 8},
    "quickstart": {"trial.folds": 3, "trial.data_size": 200, "trial.resolution": 64, "trial.batch_size": 8},
    "config": {},  # the config's own trial block
}


@dataclass
class Side:
    wall_s: float
    images_per_s: float
    val_acc: float  # mean over folds, last epoch
    val_acc_std: float
    train_acc: float


@dataclass
class BenchResult:
    setting: str
    folds: int
    epochs: int
    data_size: int
    resolution: int
    batch_size: int
    train_images: int  # training images processed (folds x epochs x fold size)
    naive: Side
    engine: Side
    ratio: float  # naive wall time / engine wall time
    engine_bf16: bool
    engine_channels_last: bool
    engine_parallel_folds: int
    loader_workers: int
    # --ablate: the engine's wall time with one fast-path feature turned off, relative to the full engine
    ablation: dict[str, float] = field(default_factory=dict)


def machine() -> dict[str, Any]:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": dev,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------ the naive baseline
class FileImages(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """What a user writes first: open the file with PIL on every access, transform per sample."""

    def __init__(self, files: list[str], labels: list[int], transform: Any):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[i]) as im:
            x = self.transform(im.convert("L"))
        return x, self.labels[i]


def _transforms(cfg: TrialConfig, train: bool) -> Any:
    from torchvision import transforms as T

    r = cfg.resolution
    steps: list[Any] = [T.Resize((r, r), interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
    if train:
        a = cfg.augment
        if a.hflip:
            steps.append(T.RandomHorizontalFlip())
        if a.rotation_deg > 0:
            steps.append(T.RandomRotation(a.rotation_deg, interpolation=T.InterpolationMode.BILINEAR))
        if a.contrast > 0:
            steps.append(T.ColorJitter(contrast=a.contrast))
    steps += [T.ToTensor(), T.Normalize([0.5], [0.25])]
    return T.Compose(steps)


def _naive_fold(cfg: TrialConfig, files: np.ndarray, labels: np.ndarray, fold: Fold, k: int,
                device: torch.device, workers: int) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from pqfn.model import build_model

    def loader(idx: np.ndarray, train: bool) -> DataLoader[Any]:
        ds = FileImages([str(files[i]) for i in idx], [int(labels[i]) for i in idx], _transforms(cfg, train))
        return DataLoader(ds, batch_size=cfg.batch_size, shuffle=train, num_workers=workers,
                          generator=torch.Generator().manual_seed(cfg.seed * 1000 + k) if train else None)

    torch.manual_seed(cfg.seed * 1000 + k)
    model = build_model(cfg.model, cfg.pretrained).to(device)
    opt = make_optimizer(cfg, model, device, fused=False)  # the stock per-parameter implementation
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs) if cfg.schedule == "cosine" else None
    train_dl, train_eval_dl, val_dl = loader(fold.train, True), loader(fold.train_eval, False), loader(fold.val, False)

    def measure(dl: DataLoader[Any]) -> tuple[float, float]:
        model.eval()
        correct, loss, n = 0, 0.0, 0
        with torch.no_grad():
            for x, y in dl:
                x, y = x.to(device), y.to(device)
                out = model(x)
                loss += F.cross_entropy(out, y, reduction="sum").item()
                correct += int((out.argmax(1) == y).sum().item())
                n += len(y)
        return correct / n, loss / n

    m: dict[str, float] = {}
    for _ in range(cfg.epochs):
        model.train()
        for x, y in train_dl:
            if len(y) < 2:
                continue  # BatchNorm cannot train on a batch of one (the engine skips it too)
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
        (m["train/acc"], m["train/loss"]), (m["val/acc"], m["val/loss"]) = measure(train_eval_dl), measure(val_dl)
    return m


def naive_trial(cfg: TrialConfig, ds: Dataset, folds: list[Fold], device: torch.device,
                workers: int) -> list[dict[str, float]]:
    """The K folds one after another, reading ds.files (never ds.images); each fold's last-epoch metrics."""
    return [_naive_fold(cfg, ds.files, ds.labels, f, k, device, workers) for k, f in enumerate(folds, start=1)]


# ------------------------------------------------------------------ the comparison
def _side(wall: float, n_train: int, per_fold: list[dict[str, float]]) -> Side:
    va = np.array([m["val/acc"] for m in per_fold])
    tr = np.array([m["train/acc"] for m in per_fold])
    std = float(va.std(ddof=1)) if len(va) > 1 else 0.0  # as the engine's val/acc_std
    return Side(wall, n_train / wall, float(va.mean()), std, float(tr.mean()))


def run_setting(cfg: Config, name: str, overrides: dict[str, Any], ds: Dataset, pool: np.ndarray, *, epochs: int, loader_workers: int | None = None, ablate: bool = False,
                log: Any = print) -> BenchResult:
    # one repeat: the naive loop trains the trial's K folds once, so the engine must too
    trial_cfg = with_overrides(cfg, overrides | {"trial.epochs": epochs, "trial.repeats": 1}, source=f"bench setting {name}").trial
    device = pick_device(trial_cfg.device)
    workers = loader_workers if loader_workers is not None else (4 if device.type == "cuda" else 0)
    entries = build_pool(ds, pool, trial_cfg.data_size, trial_cfg.max_copies, trial_cfg.seed)
    folds = make_folds(ds, entries, trial_cfg.folds, trial_cfg.seed)
    n_train = sum(len(f.train) for f in folds) * epochs
    if trial_cfg.threads:
        torch.set_num_threads(trial_cfg.threads)  # both sides run on the same number of threads
    log(f"[{name}] {trial_cfg.folds} folds x {epochs} epochs, data_size {trial_cfg.data_size}, "
        f"{trial_cfg.resolution} px, batch {trial_cfg.batch_size}, {n_train} training images per side, on {device} "
        f"({torch.get_num_threads()} threads)")

    t0 = time.perf_counter()
    naive = naive_trial(trial_cfg, ds, folds, device, workers)
    naive_wall = time.perf_counter() - t0
    a = _side(naive_wall, n_train, naive)
    log(f"[{name}] naive  (PIL + torchvision per sample, DataLoader workers={workers}, fp32): "
        f"{a.images_per_s:8.1f} img/s, {a.wall_s:7.1f} s, val/acc {a.val_acc:.3f} +- {a.val_acc_std:.3f}")

    t0 = time.perf_counter()
    res = cross_validate(trial_cfg, ds, pool, device=device)
    engine_wall = time.perf_counter() - t0
    if not np.array_equal(res.entries, entries):
        raise AssertionError("bench: the engine drew another pool than the baseline")  # pragma: no cover
    k = trial_cfg.folds
    per_fold = [{m: res.final[fold_key(i, m)] for m in ("train/acc", "val/acc")} for i in range(1, k + 1)]
    b = _side(engine_wall, n_train, per_fold)
    bf16, cl, par = use_bf16(trial_cfg, device), use_channels_last(trial_cfg, device), fold_workers(trial_cfg, device)
    log(f"[{name}] engine (decoded once, on-device batches, bf16={bf16}, channels_last={cl}, folds at once={par}): "
        f"{b.images_per_s:8.1f} img/s, {b.wall_s:7.1f} s, val/acc {b.val_acc:.3f} +- {b.val_acc_std:.3f}")
    ratio = naive_wall / engine_wall
    noise = float(np.hypot(a.val_acc_std, b.val_acc_std) / np.sqrt(k))
    log(f"[{name}] ratio {ratio:.2f}x; val/acc difference {b.val_acc - a.val_acc:+.3f} "
        f"(standard error of the difference from the fold spread: {noise:.3f})")
    ablation: dict[str, float] = {}
    if ablate:
        for what, ov in ABLATIONS.items():
            off = with_overrides(cfg, overrides | ov | {"trial.epochs": epochs}, source="bench ablation").trial
            t0 = time.perf_counter()
            cross_validate(off, ds, pool, device=device)
            ablation[what] = (time.perf_counter() - t0) / engine_wall
            log(f"[{name}] engine with {what}: {ablation[what]:.2f}x the full engine's time")
    return BenchResult(name, k, epochs, trial_cfg.data_size, trial_cfg.resolution, trial_cfg.batch_size, n_train,
                       a, b, ratio, bf16, cl, par, workers, ablation)


def bench(cfg: Config, settings: list[str], *, epochs: int, loader_workers: int | None = None, ablate: bool = False,
          out: Path | None = None, log: Any = print) -> list[BenchResult]:
    from pqfn.data import load_dataset
    from pqfn.splits import split_test

    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ConfigError(f"bench: unknown setting {unknown[0]!r}; expected one of {', '.join(SETTINGS)}")
    m = machine()
    log(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"device {m['gpu'] or 'cpu'}")
    if cfg.trial.mask_loss > 0:  # the naive loop has no mask loss: both sides time the same work without it
        log(f"trial.mask_loss={cfg.trial.mask_loss} is left out of the benchmark (set to 0 for both loops)")
        cfg = with_overrides(cfg, {"trial.mask_loss": 0.0}, "bench")
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data)
    log(f"data: {len(ds)} images decoded once to {cfg.data.decode_size} px in {time.perf_counter() - t0:.1f} s "
        "(cached on disk; shared by all trials of a sweep)")
    pool = split_test(ds, cfg.data.test_fraction, cfg.data.split_seed).pool
    results = [run_setting(cfg, s, SETTINGS[s], ds, pool, epochs=epochs, loader_workers=loader_workers,
                           ablate=ablate, log=log)
               for s in settings]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"machine": m, "results": [asdict(r) for r in results]}, indent=2))
        tmp.replace(out)
        log(f"figures: {out}")
    return results
