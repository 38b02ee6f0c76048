"""The cross-validated trial: a plain function (no Ray) from a trial config and a decoded data set
to per-epoch records in the metric vocabulary of pqfn.metrics.

All K fold models train side by side, one epoch at a time, so every epoch yields one record
(per-fold metrics, mean and std) that a caller receives as it happens, and the whole trial state
(all folds' models, optimizers, schedules and random generators) can be checkpointed and
restored at an epoch boundary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from pqfn.augment import augment_with_masks
from pqfn.baselines import fold_records, make_baselines
from pqfn.config import TrialConfig
from pqfn.data import Dataset, resize_uint8
from pqfn.device import native_bf16
from pqfn.ensemble import save_members
from pqfn.errors import TrialError
from pqfn.metrics import aggregate, aggregate_keys, class_metrics, versus_baseline, with_gaps
from pqfn.model import DenseResNet18, build_model, check_mask_loss, check_model_name, matmul_small_maps
from pqfn.records import TrialProgress
from pqfn.splits import Fold, build_pool, describe_pool, repeated_folds

EpochCallback = Callable[[dict[str, float], "CrossValidation"], None]


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrialError("trial.device: cuda was asked for but no CUDA GPU is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_bf16(cfg: TrialConfig, device: torch.device) -> bool:
    """trial.bf16 resolved: auto = bf16 autocast where the device computes bf16 natively."""
    if cfg.bf16 != "auto":
        return bool(cfg.bf16)
    return native_bf16(device)


def use_small_map_matmul(cfg: TrialConfig, device: torch.device) -> bool:
    """trial.small_maps resolved: auto = the matmul path (pqfn.model.SmallMapConv2d) on CPU only."""
    return cfg.small_maps == "matmul" or (cfg.small_maps == "auto" and device.type == "cpu")


def use_channels_last(cfg: TrialConfig, device: torch.device) -> bool:
    return True if cfg.channels_last == "auto" else bool(cfg.channels_last)


# The input normalisation every pqfn model trains with: x = (pixel / 255 - MEAN) / STD (bundles record it).
MEAN, STD = 0.5, 0.25


class TrialImages:
    """The images one trial needs, resized ONCE to the trial's resolution and held on the device."""

    def __init__(self, ds: Dataset, needed: np.ndarray, resolution: int, device: torch.device, masks: bool = False,
                 reduce: str = "bilinear"):
        needed = np.unique(needed)
        self.row = np.full(len(ds), -1, np.int64)  # dataset index -> row in self.images
        self.row[needed] = np.arange(len(needed))
        chunks = []
        for s in range(0, len(needed), 256):
            chunks.append(resize_uint8(torch.from_numpy(ds.images[needed[s : s + 256]]).to(device), resolution, reduce))
        self.images = torch.cat(chunks)  # (M, 1, r, r) uint8
        self.labels = torch.from_numpy(ds.labels[needed]).to(device)  # (M,) int64
        # (M, 2, r, r) uint8 die-pad and bond-pad planes (trial.mask_loss): a pixel is marked when any part of it
        # was delaminated, so a bond-pad patch survives a lower resolution
        self.masks: torch.Tensor | None = None
        if masks:
            if ds.masks is None:
                raise TrialError("trial.mask_loss > 0 needs the data set's masks (pqfn.data.with_masks)")
            planes = []
            for s in range(0, len(needed), 256):
                m = torch.from_numpy(ds.masks[needed[s : s + 256]]).to(device)
                p = torch.stack([m == 1, m == 2], 1).float()
                if p.shape[-1] != resolution or p.shape[-2] != resolution:
                    p = F.adaptive_max_pool2d(p, resolution)
                planes.append(p.to(torch.uint8))
            self.masks = torch.cat(planes)

    def rows(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.row[idx]).to(self.images.device)


def _to_input(x_uint8: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x_uint8.float().div_(255.0)  # (B, 1, r, r) in [0, 1]
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict_logits(cfg: TrialConfig, model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """images (N, 1, r, r) uint8 -> logits (N, num_classes) float32, eval mode, never augmented."""
    model.eval()
    bf16, cl = use_bf16(cfg, device), use_channels_last(cfg, device)
    out = []
    for s in range(0, len(images), cfg.eval_batch_size):
        x = (_to_input(images[s : s + cfg.eval_batch_size].to(device), cl) - MEAN) / STD
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float())
    return torch.cat(out)


def make_optimizer(cfg: TrialConfig, model: torch.nn.Module, device: torch.device,
                   fused: bool = True) -> torch.optim.Optimizer:
    """The configured optimizer; by default the fused implementation (one kernel for all parameters, on CPU
    and CUDA)."""
    o = cfg.optimizer
    params = model.parameters()
    fused = fused and device.type in ("cpu", "cuda")
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=fused)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused)


def fold_workers(cfg: TrialConfig, device: torch.device) -> int:
    """How many folds train at once: on CPU one 1-thread fold per thread of the budget (faster than one
    fold on all threads for small batches, see `pqfn bench`); on a GPU one at a time."""
    if cfg.parallel_folds != "auto":
        return min(int(cfg.parallel_folds), cfg.folds * cfg.repeats)
    if device.type != "cpu":
        return 1
    return max(1, min(cfg.folds * cfg.repeats, cfg.threads or torch.get_num_threads()))


class Learner:
    """One model with its optimizer, schedule and random generator, trained on a set of rows."""

    def __init__(self, cfg: TrialConfig, data: TrialImages, train_rows: torch.Tensor, seed: int, device: torch.device):
        self.cfg, self.data, self.train_rows, self.device = cfg, data, train_rows, device
        self.bf16, self.channels_last = use_bf16(cfg, device), use_channels_last(cfg, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_model(cfg.model, cfg.pretrained).to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if use_small_map_matmul(cfg, device):
            matmul_small_maps(self.model)
        self.opt = make_optimizer(cfg, self.model, device)
        self.sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.epochs)
            if cfg.schedule == "cosine" else None
        )
        self.gen = torch.Generator().manual_seed(seed)
        n = len(train_rows)  # batches per epoch: a last batch of one is skipped (BatchNorm)
        self.steps_per_epoch = n // cfg.batch_size + int(n % cfg.batch_size >= 2)
        self.step = 0  # batches done in the current epoch (read by CrossValidation.progress from another thread)
        self.step_t = 0.0  # time.perf_counter() when the latest batch was handed to the device
        # Shuffles and augmentation draws come from a generator on the device: on a GPU, numbers drawn on the
        # host would be copied to it every step, a blocking copy. On the CPU it is self.gen (unchanged draws).
        self.dev_gen = self.gen if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
        self.val_logits: torch.Tensor | None = None  # (n_val, classes) from the latest measure("val")

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train_epoch(self) -> torch.Tensor:
        """One pass over the training rows in random order; returns the mean loss (a device tensor)."""
        cfg = self.cfg
        self.model.train()
        n = len(self.train_rows)
        perm = self.train_rows[torch.randperm(n, generator=self.dev_gen, device=self.dev_gen.device)]
        total = torch.zeros((), device=self.device)
        steps = self.step = 0
        for s in range(0, n, cfg.batch_size):
            rows = perm[s : s + cfg.batch_size]
            if len(rows) < 2:
                break  # BatchNorm cannot train on a batch of one
            x = _to_input(self.data.images[rows], self.channels_last)
            masks = None if self.data.masks is None else self.data.masks[rows].float()  # held only for mask_loss > 0
            a = cfg.augment
            x, masks = augment_with_masks(x, masks, self.dev_gen, a.rotation_deg, a.contrast, a.hflip, a.gain, a.dihedral)
            x = (x - MEAN) / STD
            with self._autocast():
                logits = self.model(x)
                loss = F.cross_entropy(logits.float(), self.data.labels[rows], label_smoothing=cfg.label_smoothing)
                if masks is not None:
                    loss = loss + cfg.mask_loss * cast(DenseResNet18, self.model).dense_loss(masks)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach()  # no host synchronisation per step
            steps += 1
            self.step, self.step_t = steps, time.perf_counter()  # Python values: no host synchronisation
        if self.sched is not None:
            self.sched.step()
        return total / max(steps, 1)

    def predict(self, rows: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.cfg, self.model, self.data.images[rows], self.device)

    def measure(self, rows: torch.Tensor, prefix: str) -> dict[str, float]:
        logits = self.predict(rows)
        y = self.data.labels[rows]
        pred = logits.argmax(1)
        loss = F.cross_entropy(logits, y).item()
        m = {f"{prefix}/acc": (pred == y).float().mean().item(), f"{prefix}/loss": loss}
        if prefix == "val":
            m |= class_metrics(y.cpu().numpy(), pred.cpu().numpy())
            self.val_logits = logits.cpu()  # the latest out-of-fold predictions (for prior calibration)
        return m

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched else None,
            "generator": self.gen.get_state(),
            "device_generator": None if self.dev_gen is self.gen else self.dev_gen.get_state(),
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        if self.sched is not None and st["scheduler"] is not None:
            self.sched.load_state_dict(st["scheduler"])
        self.gen.set_state(st["generator"])
        if self.dev_gen is not self.gen and st.get("device_generator") is not None:
            self.dev_gen.set_state(st["device_generator"])


@dataclass
class CVResult:
    records: list[dict[str, float]]
    folds: list[Fold]
    entries: np.ndarray  # the balanced pool (indices into the Dataset; repeats are augmented copies)
    final: dict[str, float] = field(default_factory=dict)


def check_trial(cfg: TrialConfig, folds: list[Fold]) -> None:
    smallest = min(len(f.train) for f in folds)
    if cfg.batch_size > smallest:
        raise TrialError(
            f"trial.batch_size={cfg.batch_size} is larger than the smallest training fold ({smallest} images); "
            "lower batch_size or raise data_size"
        )


class CrossValidation:
    """K fold models trained one epoch at a time. Use cross_validate() unless you need the steps."""

    def __init__(self, cfg: TrialConfig, ds: Dataset, pool: np.ndarray, device: torch.device | None = None):
        check_model_name(cfg.model)
        check_mask_loss(cfg.model, cfg.mask_loss)
        self.cfg = cfg
        self.device = device or pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.entries = build_pool(ds, pool, cfg.data_size, cfg.max_copies, cfg.seed)
        self.ds = ds
        self.folds = repeated_folds(ds, self.entries, cfg.folds, cfg.repeats, cfg.seed)  # K x repeats
        check_trial(cfg, self.folds)
        self.data = TrialImages(ds, self.entries, cfg.resolution, self.device, masks=cfg.mask_loss > 0,
                                reduce=cfg.reduce)
        # The cheap baselines on the same folds (about a second with the intensity model's size choice): their
        # figures join every record.
        self.baseline_folds = fold_records(ds, self.folds, make_baselines(ds, self.entries, self.folds))
        self.learners = [
            Learner(cfg, self.data, self.data.rows(f.train), cfg.seed * 1000 + k, self.device)
            for k, f in enumerate(self.folds, start=1)
        ]
        self._eval_rows = [(self.data.rows(f.train_eval), self.data.rows(f.val)) for f in self.folds]
        self.workers = fold_workers(cfg, self.device)
        self.epoch = 0
        self._unmeasured_s = 0.0
        self.history: list[dict[str, float]] = []
        self._fit_t0: float | None = None  # when this process's first epoch began (progress())
        self._fit_from = 0  # the epoch it began from (a restored trial starts past 0)
        self._last_epoch_s: float | None = None
        self._in_epoch = False
        self._cycles = (0.0, 0)  # (seconds, epochs) from the first epoch's start to the latest epoch's start

    def _fold_epoch(self, k: int, threads: int, measure: bool) -> dict[str, float]:
        if threads:
            torch.set_num_threads(threads)  # per OS thread: a worker thread does not inherit the caller's
        learner, (tr_rows, va_rows) = self.learners[k - 1], self._eval_rows[k - 1]
        train_loss = learner.train_epoch().item()
        if not np.isfinite(train_loss):
            raise TrialError(
                f"fold {k} epoch {self.epoch + 1}: training loss is {train_loss}; trial stopped "
                f"(lower trial.optimizer.lr={self.cfg.optimizer.lr} or set trial.bf16=false)"
            )
        if not measure:
            return {}
        m = learner.measure(tr_rows, "train") | learner.measure(va_rows, "val")
        bad = [name for name, v in m.items() if not np.isfinite(v)]
        if bad:
            raise TrialError(
                f"fold {k} epoch {self.epoch + 1}: {bad[0]} is {m[bad[0]]}; trial stopped "
                f"(the model diverged: lower trial.optimizer.lr={self.cfg.optimizer.lr})"
            )
        return with_gaps(m)

    def measured(self, epoch: int) -> bool:
        """Epochs whose train/val metrics are measured: every trial.eval_every-th and always the last."""
        return epoch % self.cfg.eval_every == 0 or epoch >= self.cfg.epochs

    def run_epoch(self) -> dict[str, float] | None:
        """Train every fold one epoch; the record of a measured epoch, None for an unmeasured one."""
        t0 = time.perf_counter()
        if self._fit_t0 is None:
            self._fit_t0, self._fit_from = t0, self.epoch
        self._cycles = (t0 - self._fit_t0, self.epoch - self._fit_from)  # whole epochs: measuring, reporting too
        for ln in self.learners:
            ln.step = 0
        self._in_epoch = True
        folds = range(1, len(self.learners) + 1)
        measure = self.measured(self.epoch + 1)
        if self.workers > 1:
            # Folds are independent (own model, optimizer, generator): the result does not depend on the order.
            per_thread = max(1, (self.cfg.threads or torch.get_num_threads()) // self.workers)
            with ThreadPoolExecutor(self.workers, thread_name_prefix="pqfn-fold") as ex:
                futures = [ex.submit(self._fold_epoch, k, per_thread, measure) for k in folds]
                per_fold = [f.result() for f in futures]
        else:
            per_fold = [self._fold_epoch(k, 0, measure) for k in folds]
        self._last_epoch_s = time.perf_counter() - t0
        self.epoch += 1
        self._in_epoch = False
        self._unmeasured_s += self._last_epoch_s
        if not measure:
            return None
        rec = {"epoch": float(self.epoch)} | aggregate(per_fold) | {"n_repeats": float(self.cfg.repeats)}
        rec |= aggregate_keys(self.baseline_folds) | versus_baseline(per_fold, self.baseline_folds)
        rec["time/epoch_s"] = self._unmeasured_s  # every epoch since the last record
        self._unmeasured_s = 0.0
        self.history.append(rec)
        return rec

    def progress(self) -> TrialProgress:
        """Where the trial is inside its epoch: plain counters, safe to read from another thread while it trains."""
        steps = sum(ln.steps_per_epoch for ln in self.learners)
        if self._fit_t0 is None:
            return TrialProgress(self.epoch + 1, self.cfg.epochs, 0, steps)
        if self._in_epoch:
            epoch, step = self.epoch + 1, sum(ln.step for ln in self.learners)
        else:  # between epochs (reporting, checkpointing): the last epoch's batches are all done
            epoch, step = self.epoch, steps
        return TrialProgress(
            epoch=epoch, epochs=self.cfg.epochs, step=step, steps=steps, epoch_s=self._last_epoch_s,
            run_s=time.perf_counter() - self._fit_t0,
            last_step_s=max((ln.step_t for ln in self.learners), default=self._fit_t0) - self._fit_t0,
            run_epochs=epoch - 1 - self._fit_from + (step / steps if steps else 1.0),
            cycle_s=self._cycles[0], cycle_epochs=self._cycles[1],
        )

    def fit(self, on_epoch: EpochCallback | None = None) -> CVResult:
        """The one epoch loop (pqfn trial, the Tune adapter and pqfn evaluate all run it): train every fold
        one epoch, measure, hand the record to on_epoch (checkpoint, report, log), until cfg.epochs."""
        while self.epoch < self.cfg.epochs:
            rec = self.run_epoch()
            if rec is not None and on_epoch is not None:
                on_epoch(rec, self)
        return CVResult(self.history, self.folds, self.entries, self.history[-1] if self.history else {})

    def out_of_fold(self) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, logits (N, classes)) of every validation image, each from its own fold's model
        at the latest measured epoch; what the prior-correction strength is chosen on. With repeated
        cross-validation every image is validated once per repeat: its row is the log of its mean probability
        over the repeats (as FoldEnsemble averages; each model never saw it), in the first repeat's order."""
        missing = [k for k, ln in enumerate(self.learners, start=1) if ln.val_logits is None]
        if missing:
            raise TrialError(f"fold {missing[0]}: no validation predictions yet (run an epoch first)")
        idx = np.concatenate([f.val for f in self.folds])
        logits = torch.cat([ln.val_logits for ln in self.learners if ln.val_logits is not None]).numpy()
        if self.cfg.repeats == 1:
            return idx, logits
        first = idx[: len(idx) // self.cfg.repeats]
        pos = np.searchsorted(np.sort(first), idx)
        order = np.argsort(first)
        mean = np.zeros((len(first), logits.shape[1]), np.float64)  # mean probability, as FoldEnsemble averages
        np.add.at(mean, order[pos], torch.softmax(torch.from_numpy(logits).double(), 1).numpy())
        return first, np.log(np.clip(mean / self.cfg.repeats, 1e-12, None)).astype(logits.dtype)

    def save_models(self, folder: Path) -> None:
        """The fold models and their out-of-fold logits (the selected trial's become the final model)."""
        idx, logits = self.out_of_fold()
        save_members(folder, [ln.model for ln in self.learners], idx, logits)
        tmp = folder / "pool.json.tmp"  # which classes came from which cycles (README, "Splits")
        tmp.write_text(json.dumps(describe_pool(self.ds, self.entries), indent=2))
        tmp.replace(folder / "pool.json")

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "history": self.history,
            "config": self.cfg.model_dump(mode="json"),
            "learners": [ln.state_dict() for ln in self.learners],
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        try:  # a checkpoint from before a key existed stores no value for it: its default is what it ran with
            same = TrialConfig(**st.get("config", {})).model_dump(mode="json") == self.cfg.model_dump(mode="json")
        except (TypeError, ValueError):
            same = False
        if not same:
            raise TrialError("checkpoint: it was written by a trial with another configuration; cannot resume from it")
        for ln, s in zip(self.learners, st["learners"], strict=True):
            ln.load_state_dict(s)
        self.epoch = int(st["epoch"])
        self.history = list(st["history"])


def cross_validate(
    cfg: TrialConfig,
    ds: Dataset,
    pool: np.ndarray,
    *,
    on_epoch: EpochCallback | None = None,
    resume: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> CVResult:
    """Run (or resume) a K-fold trial to cfg.epochs; on_epoch(record, cv) gets every epoch's record."""
    cv = CrossValidation(cfg, ds, pool, device)
    if resume is not None:
        cv.load_state_dict(resume)
    return cv.fit(on_epoch)
