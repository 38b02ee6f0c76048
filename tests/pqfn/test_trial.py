from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from pqfn.cli import main
from pqfn.config import ConfigError, TrialConfig, validate
from pqfn.data import Dataset
from pqfn.errors import TrialError
from pqfn.metrics import FOLD_METRICS
from pqfn.model import build_model
from pqfn.splits import split_test
from pqfn.trial import CrossValidation, cross_validate, fold_workers
from pqfn.wandb_files import offline_runs

TINY = dict(resolution=32, folds=2, epochs=2, data_size=40, batch_size=8, max_copies=10, device="cpu")
# The trial's machinery (records, progress, checkpoints, resume) is the same for every timm model: these tests
# train timm's own test model (0.37 M weights, a tenth of ResNet-18's step time on one thread); the pinned trial,
# bf16 and the dense-model tests keep ResNet-18.
MECHANICS = TINY | {"model": "test_resnet"}


@pytest.fixture(scope="module")
def pool(tiny_ds: Dataset) -> np.ndarray:
    return split_test(tiny_ds, 0.2, seed=0).pool


def test_tiny_trial_records(tiny_ds: Dataset, pool: np.ndarray) -> None:
    seen = []
    res = cross_validate(TrialConfig(**MECHANICS), tiny_ds, pool, on_epoch=lambda rec, cv: seen.append(rec["epoch"]))
    assert seen == [1.0, 2.0] and len(res.records) == 2
    rec = res.records[-1]
    for m in FOLD_METRICS:
        assert f"fold1/{m}" in rec and f"fold2/{m}" in rec and m in rec and f"{m}_std" in rec
        assert np.isfinite(rec[m])
    assert rec["gap/acc"] == pytest.approx(rec["train/acc"] - rec["val/acc"], abs=1e-12)
    assert rec["gap/loss"] == pytest.approx(rec["val/loss"] - rec["train/loss"], abs=1e-12)
    for k in (1, 2):
        assert rec[f"fold{k}/gap/acc"] == pytest.approx(rec[f"fold{k}/train/acc"] - rec[f"fold{k}/val/acc"])
    assert rec["val/acc"] == pytest.approx(np.mean([rec["fold1/val/acc"], rec["fold2/val/acc"]]))
    pk = [set(tiny_ds.package_ids[f.val]) for f in res.folds]
    assert not pk[0] & pk[1]


@pytest.mark.slow
def test_resume_from_checkpoint_matches_uninterrupted(tiny_ds: Dataset, pool: np.ndarray, tmp_path: Path) -> None:
    cfg = TrialConfig(**MECHANICS)
    straight = cross_validate(cfg, tiny_ds, pool).records

    cv = CrossValidation(cfg, tiny_ds, pool)
    cv.run_epoch()
    torch.save(cv.state_dict(), tmp_path / "ckpt.pt")  # interrupted after epoch 1
    del cv
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed = cross_validate(cfg, tiny_ds, pool, resume=state).records
    assert len(resumed) == 2
    for a, b in zip(straight, resumed, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == {k: v for k, v in b.items() if not k.startswith("time/")}


def test_resume_refuses_other_config(tiny_ds: Dataset, pool: np.ndarray) -> None:
    cv = CrossValidation(TrialConfig(**MECHANICS), tiny_ds, pool)
    state = cv.state_dict()
    with pytest.raises(TrialError, match="another configuration"):
        cross_validate(TrialConfig(**(MECHANICS | {"seed": 5})), tiny_ds, pool, resume=state)


@pytest.mark.slow
def test_bf16_and_channels_last_run_on_cpu(tiny_ds: Dataset, pool: np.ndarray) -> None:
    res = cross_validate(TrialConfig(**(TINY | {"epochs": 1, "bf16": True, "channels_last": True})), tiny_ds, pool)
    assert np.isfinite(res.records[-1]["val/loss"])


@pytest.mark.slow
def test_folds_in_parallel_threads_give_the_same_trial(tiny_ds: Dataset, pool: np.ndarray) -> None:
    one = TrialConfig(**(MECHANICS | {"threads": 1, "parallel_folds": 1}))
    two = TrialConfig(**(MECHANICS | {"threads": 1, "parallel_folds": 2}))
    cv = CrossValidation(two, tiny_ds, pool)
    assert cv.workers == 2
    a, b = cross_validate(one, tiny_ds, pool).records, cross_validate(two, tiny_ds, pool).records
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k != "time/epoch_s"} == {k: v for k, v in rb.items() if k != "time/epoch_s"}
    # auto: one fold per thread on CPU, never more than the folds
    assert fold_workers(TrialConfig(**(MECHANICS | {"threads": 2})), torch.device("cpu")) == 2
    assert fold_workers(TrialConfig(**(MECHANICS | {"threads": 8})), torch.device("cpu")) == 2
    assert fold_workers(TrialConfig(**(MECHANICS | {"threads": 2})), torch.device("cuda")) == 1


def test_bad_inputs(tiny_ds: Dataset, pool: np.ndarray) -> None:
    with pytest.raises(TrialError, match="'resnet_nope' is not a timm model"):
        CrossValidation(TrialConfig(**(TINY | {"model": "resnet_nope"})), tiny_ds, pool)
    with pytest.raises(TrialError, match="batch_size=64 is larger than the smallest training fold"):
        CrossValidation(TrialConfig(**(TINY | {"batch_size": 64})), tiny_ds, pool)
    with pytest.raises(ConfigError, match="trial.resolution"):
        validate({"trial": {"resolution": 15}}, "t.yaml")
    with pytest.raises(ConfigError, match="trial.folds"):
        validate({"trial": {"folds": 1}}, "t.yaml")


def test_nan_loss_stops_the_trial(tiny_ds: Dataset, pool: np.ndarray) -> None:
    cfg = TrialConfig(**(TINY | {"epochs": 3, "optimizer": {"name": "sgd", "lr": 10.0, "momentum": 0.99}, "schedule": "none"}))
    seen: list[float] = []
    with pytest.raises(TrialError, match=r"(loss|acc) is (nan|inf); trial stopped"):
        cross_validate(cfg, tiny_ds, pool, on_epoch=lambda rec, cv: seen.append(rec["epoch"]))
    assert len(seen) < 3


def test_pretrained_weights_from_local_files(tmp_path: Path) -> None:
    src = timm.create_model("resnet18", num_classes=1000, in_chans=3)  # an "ImageNet-shaped" file
    sd = src.state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        m = build_model("resnet18", tmp_path / f)
        assert torch.allclose(m.state_dict()["conv1.weight"], sd["conv1.weight"].sum(1, keepdim=True))
        assert torch.equal(m.state_dict()["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])
        assert m.state_dict()["fc.weight"].shape == (4, 512)


def test_wrong_weights_file(tmp_path: Path) -> None:
    sd = timm.create_model("resnet34", num_classes=4, in_chans=1).state_dict()
    save_file({"layer1.0.conv1.weight": torch.zeros(3, 3, 3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(TrialError, match=r"layer1.0.conv1.weight has shape \(3, 3, 3, 3\) but resnet18 expects"):
        build_model("resnet18", tmp_path / "bad.safetensors")
    torch.save(sd, tmp_path / "r34.pt")
    with pytest.raises(TrialError, match="key"):
        build_model("resnet18", tmp_path / "r34.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(TrialError, match="cannot read weights"):
        build_model("resnet18", tmp_path / "junk.pt")


def _cfg_file(tmp_path: Path, tiny_data_cfg: object, extra: str = "") -> Path:
    d = tiny_data_cfg
    p = tmp_path / "tiny.yaml"
    p.write_text(
        f"name: tiny\noutput_dir: {tmp_path / 'runs'}\n"
        f"data:\n  path: {d.path}\n  cache_dir: {d.cache_dir}\n  decode_size: {d.decode_size}\n"  # type: ignore[attr-defined]
        f"  synthetic: {{packages: {{Ag: 6, NiPdAu: 6, Cu: 6}}, image_size: 64, cycle_step: 250}}\n"
        f"trial: {{resolution: 32, folds: 2, epochs: 2, data_size: 40, batch_size: 8, max_copies: 10, device: cpu}}\n{extra}"
    )
    return p


@pytest.mark.slow
def test_trial_cli_writes_results_and_refuses_overwrite(tmp_path: Path, tiny_data_cfg: object, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg_file(tmp_path, tiny_data_cfg)
    assert main(["trial", str(cfg)]) == 0
    out = tmp_path / "runs/tiny-trial"
    for f in ("config.yaml", "folds.csv", "metrics.csv", "checkpoint.pt", "curves.png", "final.json"):
        assert (out / f).exists(), f
    (run,) = offline_runs(out)  # W&B offline by default (no key in the environment)
    assert run.job_type == "trial" and [h["_step"] for h in run.history if "gap/acc" in h] == [1, 2]
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,fold,train/acc,train/loss,val/acc,val/loss")
    assert len(lines) == 1 + 2 * (2 + 2)  # 2 epochs x (2 folds + mean + std)
    before = (out / "metrics.csv").read_text()
    assert main(["trial", str(cfg)]) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert (out / "metrics.csv").read_text() == before
    assert main(["trial", str(cfg), "--resume"]) == 0  # complete: nothing left to train
    assert (out / "metrics.csv").read_text() == before
    assert main(["trial", str(cfg), "--overwrite", "--no-wandb", "trial.epochs=1"]) == 0
    assert not (out / "wandb").exists()
    assert main(["trial", str(cfg), "trial.batch_size=128", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pqfn: error: trial.batch_size=128 is larger")


def test_trial_cli_bad_config_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("trial: {batch_size: 0}\n")
    assert main(["trial", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml: trial.batch_size" in err[0]


def test_seeded_trial_is_pinned(tiny_ds: Dataset, pool: np.ndarray) -> None:
    """A silent change of behaviour (data path, folds, model, optimizer, augmentation, metrics) fails here.

    Values recorded before and after the code-path refactor (identical to the last digit on an AVX2 CPU
    in fp32, 1 thread); re-pinned in session 6 on an AVX-512 CPU (fp32, 1 thread) for simulator version 2's
    images and the pool drawn at random up to a cycling step (both change the data this trial sees). Tolerances leave room for other CPUs' fp32 kernels: losses rtol 2e-3 (the sharp
    pin); accuracies within two images of one fold, since this 2-epoch model sits near chance (loss ~ ln 4)
    and an argmax flips on the last bits: an AVX512 CPU gives train/acc 0.284 here, one image from 0.314.
    """
    cfg = TrialConfig(**(TINY | {"threads": 1, "bf16": False}))
    res = cross_validate(cfg, tiny_ds, pool)
    rec = res.records[-1]
    # One image in the smallest fold moves the fold mean by 1 / (folds x its size).
    train_img = 1 / (cfg.folds * min(len(f.train_eval) for f in res.folds))
    val_img = 1 / (cfg.folds * min(len(f.val) for f in res.folds))
    pinned = {"train/loss": 1.3911945819854736, "val/loss": 1.4008445143699646, "fold1/val/loss": 1.3754454851150513,
              "fold2/train/loss": 1.3977906703948975}
    for k, v in pinned.items():
        assert rec[k] == pytest.approx(v, rel=2e-3), k
    assert rec["train/acc"] == pytest.approx(0.2137254998087883, abs=2 * train_img + 1e-6)
    assert rec["val/acc"] == pytest.approx(0.22549020126461983, abs=2 * val_img + 1e-6)


def test_progress_inside_an_epoch_without_ray(tiny_ds: Dataset, pool: np.ndarray) -> None:
    """CrossValidation.progress: epoch and batch counters a caller can read while the trial trains (the Tune
    adapter writes them to progress.json from a thread); unmeasured epochs count too."""
    cv = CrossValidation(TrialConfig(**(MECHANICS | {"epochs": 3, "eval_every": 2})), tiny_ds, pool)
    steps = sum(-(-len(f.train) // 8) for f in cv.folds)  # batches of 8 (no fold here leaves a batch of one)
    p = cv.progress()
    assert (p.epoch, p.epochs, p.step, p.steps, p.seconds_per_epoch()) == (1, 3, 0, steps, None)
    inside: list[tuple[int, int]] = []
    train_epoch = cv.learners[1].train_epoch

    def spy() -> torch.Tensor:  # the second fold starts: the first fold's batches of this epoch are done
        q = cv.progress()
        inside.append((q.epoch, q.step))
        return train_epoch()

    cv.learners[1].train_epoch = spy  # type: ignore[method-assign]
    between: list[tuple[int, int, int]] = []
    cv.fit(lambda rec, cv: between.append((cv.progress().epoch, cv.progress().step, cv.progress().cycle_epochs)))
    assert inside == [(1, cv.learners[0].steps_per_epoch), (2, cv.learners[0].steps_per_epoch),
                      (3, cv.learners[0].steps_per_epoch)]
    assert between == [(2, steps, 1), (3, steps, 2)]  # reported at the measured epochs 2 and 3
    p = cv.progress()
    assert p.run_epochs == 3 and p.epoch_s is not None and p.seconds_per_epoch() is not None


@pytest.mark.slow  # trains 2 x 3 fold models: seconds
def test_repeated_cross_validation_trains_every_repeat_and_averages_its_out_of_fold(tiny_ds: Dataset, pool: np.ndarray) -> None:
    once = CrossValidation(TrialConfig(**(MECHANICS | {"epochs": 1})), tiny_ds, pool)
    cv = CrossValidation(TrialConfig(**(MECHANICS | {"epochs": 1, "repeats": 2})), tiny_ds, pool)
    assert len(cv.learners) == len(cv.folds) == 4
    # repeat 1 is the trial without repeats (same folds, same initial weights); repeat 2 draws other folds
    for a, b in zip(once.folds, cv.folds[:2], strict=True):
        assert np.array_equal(a.val, b.val) and np.array_equal(a.train, b.train)
    assert any(not np.array_equal(a.val, b.val) for a, b in zip(cv.folds[:2], cv.folds[2:], strict=True))
    for rep in (cv.folds[:2], cv.folds[2:]):  # each repeat validates every pool image once, packages never split
        assert sorted(np.concatenate([f.val for f in rep]).tolist()) == sorted(np.unique(cv.entries).tolist())
        assert not set(tiny_ds.package_ids[rep[0].val]) & set(tiny_ds.package_ids[rep[1].val])
    rec = cv.fit().final
    assert rec["n_folds"] == 4 and rec["n_repeats"] == 2 and all(np.isfinite(rec[f"fold{k}/val/acc"]) for k in range(1, 5))
    assert rec["val/acc"] == pytest.approx(np.mean([rec[f"fold{k}/val/acc"] for k in range(1, 5)]))
    idx, logits = cv.out_of_fold()
    assert sorted(idx.tolist()) == sorted(np.unique(cv.entries).tolist())  # one row per image, not per repeat
    by_image = {}
    for f, ln in zip(cv.folds, cv.learners, strict=True):
        for i, row in zip(f.val, ln.val_logits.numpy(), strict=True):
            by_image.setdefault(int(i), []).append(row)
    for i, row in zip(idx, logits, strict=True):
        probs = torch.softmax(torch.tensor(np.array(by_image[int(i)]), dtype=torch.float64), 1).mean(0)
        assert len(by_image[int(i)]) == 2 and np.allclose(row, probs.log().numpy(), atol=1e-5)  # as the ensemble averages


def test_dihedral_augmentation_applies_one_of_the_squares_eight_symmetries() -> None:
    from pqfn.augment import augment_batch

    x = torch.rand(64, 1, 12, 12).contiguous(memory_format=torch.channels_last)
    out = augment_batch(x, torch.Generator().manual_seed(0), 0.0, 0.0, dihedral=True)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    seen = set()
    for a, b in zip(x, out, strict=True):
        images = [torch.rot90(a, k, dims=(1, 2)) for k in range(4)]
        images += [im.flip(2) for im in images]
        match = [i for i, im in enumerate(images) if torch.equal(im, b)]
        assert match, "not a symmetry of the input"  # exact: no interpolation
        seen.add(match[0])
    assert seen == set(range(8))
    same = augment_batch(x, torch.Generator().manual_seed(0), 0.0, 0.0)  # off: the image is untouched
    assert torch.equal(same, x)


def test_a_checkpoint_from_before_a_key_existed_still_resumes(tiny_ds: Dataset, pool: np.ndarray) -> None:
    cv = CrossValidation(TrialConfig(**MECHANICS), tiny_ds, pool)
    state = cv.state_dict()
    del state["config"]["repeats"], state["config"]["augment"]["dihedral"], state["config"]["small_maps"]  # keys added later
    CrossValidation(TrialConfig(**MECHANICS), tiny_ds, pool).load_state_dict(state)
    state["config"]["augment"]["dihedral"] = True  # but a checkpoint of another configuration is still refused
    with pytest.raises(TrialError, match="another configuration"):
        CrossValidation(TrialConfig(**MECHANICS), tiny_ds, pool).load_state_dict(state)
