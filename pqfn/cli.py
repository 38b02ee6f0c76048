"""pqfn: find the least-overfitting ResNet-18 setup for classifying delamination in CSAM scans."""

# The commands without Ray (synth, trial, evaluate, report, predict, export, dfi, bench). The installed
# `pqfn` command is tune_jobs.cli, which adds sweep, submit and cluster: pqfn/ never imports ray or
# tune_jobs, and `python -m pqfn.cli` runs where Ray is not installed (a GPU box).

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pqfn.errors import PqfnError
from pqfn.io import check_not_on_inputs, check_output_paths, replacing_folder, write_marker


def _warning_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    if getattr(category, "__name__", "") == "DecompressionBombWarning":
        return  # PIL's; pqfn.data.decode_image refuses such images itself and lists them in its skipped line
    print(f"pqfn: warning: {message}", file=sys.stderr)


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool, what: str, command: str, can_resume: bool = True,
                    key: str = "results folder", inputs: Iterable[tuple[str, Path]] = ()) -> None:
    """Check a results folder before any work; nothing is deleted here.

    An existing folder is refused unless --resume (continue it) or --overwrite; --overwrite replaces only a
    folder this command wrote (its pqfn.io.MARKER names `command`), and the replacement happens in
    pqfn.io.replacing_folder once the new result is complete. `inputs`: what the command reads (config,
    data, fold models); the folder may not be, contain or lie inside any of them, whatever --overwrite says.
    `can_resume`: whether the command has --resume (only then is it suggested); `key` names the setting the
    folder came from (output_dir, --out) in messages.
    """
    from pqfn.io import MARKER, written_by

    if resume and overwrite:
        raise PqfnError(f"--resume and --overwrite contradict each other: --resume continues {out}, --overwrite "
                        "replaces it; pass one of them")
    check_output_paths(folders={key: out})  # a file in the way fails here, before any work
    check_not_on_inputs({key: out}, inputs)
    if out.exists() and any(out.iterdir()):
        if not resume and not written_by(out, command):
            raise PqfnError(f"{key} {out}: already exists and was not written by `pqfn {command}` (it has no {MARKER} "
                            f"file naming it), so --overwrite will not replace it: choose another {key} or move it away")
        if not overwrite and not resume:
            how = "pass --resume to continue it or --overwrite to replace it" if can_resume else "pass --overwrite to replace it"
            raise PqfnError(f"{out}: {what} folder already exists; {how}")
    elif resume:
        raise PqfnError(f"{out}: nothing to resume (the folder does not exist or is empty)")


def _read_paths(config: str | Path, cfg: Any, model: Path | None = None) -> list[tuple[str, Path]]:
    """What trial and evaluate read, for the output-path rule."""
    pairs = [("config", Path(config)), ("data.path", cfg.data.path)]
    if cfg.data.test_manifest is not None:
        pairs.append(("data.test_manifest", cfg.data.test_manifest))
    if cfg.trial.pretrained is not None:
        pairs.append(("trial.pretrained", cfg.trial.pretrained))
    if model is not None:
        pairs.append(("--model folder", model))
    return pairs


# ---------------------------------------------------------------- synth
def cmd_synth(a: argparse.Namespace) -> int:
    from pqfn.config import SynthConfig, validate
    from pqfn.io import check_output_paths
    from pqfn.synth import SIMULATOR_VERSION, class_counts, contact_sheet, generate

    out = Path(a.out_dir)
    check_output_paths(folders={"out_dir": out})
    if (out / "manifest.csv").exists() and not a.overwrite:
        raise PqfnError(f"{out}: already holds a data set (manifest.csv); pass --overwrite to replace it")
    data = {"packages": {"Ag": a.ag, "NiPdAu": a.nipdau, "Cu": a.cu}, "max_cycles": a.max_cycles,
            "cycle_step": a.cycle_step, "image_size": a.image_size, "difficulty": a.difficulty, "seed": a.seed}
    cfg = validate({"data": {"synthetic": data}}, "command line").data.synthetic
    assert isinstance(cfg, SynthConfig)
    if a.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = generate(cfg, out, workers=a.workers)
    dt = time.perf_counter() - t0
    (out / "synth.json").write_text(json.dumps(cfg.model_dump(mode="json") | {"simulator": SIMULATOR_VERSION}))
    counts = class_counts(records)
    print(f"wrote {len(records)} scans of {sum(cfg.packages.values())} packages to {out} in {dt:.1f} s")
    print("class counts: " + ", ".join(f"{c}={n}" for c, n in counts.items()))
    print(f"manifest: {out / 'manifest.csv'}")
    if a.preview:
        contact_sheet(records, out, out / "preview.png")
        print(f"preview: {out / 'preview.png'}")
    return 0


# ---------------------------------------------------------------- trial
def _load(a: argparse.Namespace) -> Any:
    from pqfn.config import load_config

    return load_config(a.config, a.overrides)


def _data(cfg: Any, *, trains: bool = True) -> tuple[Any, Any]:
    """The decoded data set and its held-out split; with the masks when `trains` and the config's trials use them,
    or when saved models trained on them are scored (their bundle's data fingerprint counts the masks)."""
    from pqfn.config import uses_masks
    from pqfn.data import load_dataset
    from pqfn.model import check_mask_loss
    from pqfn.splits import split_test

    if trains:  # the model's error before any mask is looked for
        check_mask_loss(cfg.trial.model, cfg.trial.mask_loss)
    ds = load_dataset(cfg.data, masks=uses_masks(cfg) if trains else cfg.trial.mask_loss > 0)
    return ds, split_test(ds, cfg.data.test_fraction, cfg.data.split_seed)


def cmd_trial(a: argparse.Namespace) -> int:
    from pqfn.config import with_overrides
    from pqfn.wandb_log import check_mode

    cfg = _load(a)
    if a.no_wandb:
        cfg = with_overrides(cfg, {"wandb.mode": "disabled"}, source="--no-wandb")
    check_mode(cfg)
    out = Path(a.out or cfg.output_dir / f"{cfg.name}-trial")
    prepare_out_dir(out, resume=a.resume, overwrite=a.overwrite, what="trial results", command="trial",
                    key="--out" if a.out else "output_dir", inputs=_read_paths(a.config, cfg))
    # --overwrite: the old folder waits aside until this run completes, and comes back if it fails
    with contextlib.nullcontext(out) if a.resume else replacing_folder(out, keep_if="checkpoint.pt"):
        if not a.resume:  # a resumed folder gets its marker once its checkpoint has been read
            write_marker(out, "trial")
        return _run_trial(a, cfg, out)


def _run_trial(a: argparse.Namespace, cfg: Any, out: Path) -> int:
    import torch
    from tqdm import tqdm

    from pqfn.config import dump_config
    from pqfn.io import load_checkpoint
    from pqfn.report import atomic_write, plot_curves, write_metrics_csv
    from pqfn.splits import describe_pool, write_folds_csv
    from pqfn.trial import CrossValidation
    from pqfn.wandb_log import trial_run

    tc = cfg.trial
    ckpt = out / "checkpoint.pt"
    # Read the checkpoint before decoding any image: a damaged one (killed mid-write, full disk) fails at once.
    state = load_checkpoint(ckpt, required=("epoch", "history", "config", "learners"),
                            hint="pass --overwrite to start the trial again") if a.resume else None
    ds, holdout = _data(cfg)
    cv = CrossValidation(tc, ds, holdout.pool)
    if state is not None:
        try:
            cv.load_state_dict(state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # PqfnError passes through
            raise PqfnError(f"{ckpt}: does not fit this trial ({type(e).__name__}: {str(e).strip()[:150]}); "
                            "pass --overwrite to start the trial again") from None
        print(f"resuming {out} after epoch {cv.epoch}")
        write_marker(out, "trial")
    atomic_write(out / "config.yaml", dump_config(cfg))
    write_folds_csv(out / "folds.csv", ds, holdout, cv.entries, cv.folds, tc.folds)
    atomic_write(out / "pool.json", json.dumps(describe_pool(ds, cv.entries), indent=2))
    reps = f" x {tc.repeats} repeats" if tc.repeats > 1 else ""
    print(f"trial {cfg.name}: {tc.model}, {tc.folds} folds{reps} x {tc.epochs} epochs, data_size {tc.data_size}, "
          f"{tc.resolution} px, batch {tc.batch_size}, on {cv.device}")
    print("pool: " + "; ".join(f"{c} {d['originals']} originals" + (f" from cycles {d['cycles_min']}-{d['cycles_max']}"
                                                                     if "cycles_min" in d else "")
                               for c, d in describe_pool(ds, cv.entries).items()))
    cols = ["train/acc", "val/acc", "gap/acc", "train/loss", "val/loss", "gap/loss", "val/bal_acc", "val/min_recall"]
    head = f"{'epoch':>5} " + " ".join(f"{c:>14}" for c in cols) + f" {'sec':>6}"
    # One W&B run per results folder however often it is resumed: its id is kept in the folder.
    id_file = out / "wandb_id"
    if not id_file.exists():
        atomic_write(id_file, f"{cfg.name}-{uuid.uuid4().hex[:8]}")
    run = (trial_run(cfg, {}, trial_name=f"{cfg.name}-local", trial_id=id_file.read_text().strip(), folder=out)
           if cv.epoch < tc.epochs else None)
    if run is not None:
        run.replay(cv.history)  # epochs a killed run logged but W&B never wrote
    bar = tqdm(total=tc.epochs, initial=cv.epoch, desc="epochs", unit="ep", file=sys.stderr, leave=False)

    def line(rec: dict[str, float]) -> str:
        return f"{int(rec['epoch']):>5} " + " ".join(f"{rec[c]:>14.4f}" for c in cols) + f" {rec['time/epoch_s']:>6.1f}"

    tqdm.write(head)
    for rec in cv.history:
        tqdm.write(line(rec))

    def on_epoch(rec: dict[str, float], cv: CrossValidation) -> None:
        tmp = ckpt.with_name("checkpoint.pt.tmp")
        torch.save(cv.state_dict(), tmp)
        tmp.replace(ckpt)
        write_metrics_csv(out / "metrics.csv", cv.history, len(cv.folds))
        if run is not None:
            run.log(rec, step=int(rec["epoch"]))
        tqdm.write(line(rec))
        bar.update(1)
        if cv.epoch >= tc.epochs:
            cv.save_models(out)

    cv.fit(on_epoch)
    bar.close()
    if run is not None:
        run.finish()
    write_metrics_csv(out / "metrics.csv", cv.history, len(cv.folds))
    plot_curves(out / "curves.png", cv.history, f"{cfg.name}: {tc.resolution} px, batch {tc.batch_size}, data_size {tc.data_size}")
    final = cv.history[-1]
    atomic_write(out / "final.json", json.dumps(final, indent=2))
    print(f"final (mean of {len(cv.folds)} folds): val/acc {final['val/acc']:.3f} +- {final['val/acc_std']:.3f}, "
          f"val/bal_acc {final['val/bal_acc']:.3f}, worst class recall {final['val/min_recall']:.3f}, "
          f"gap/acc {final['gap/acc']:+.3f}, gap/loss {final['gap/loss']:+.3f}")
    print(f"results: {out} (metrics.csv, folds.csv, curves.png, checkpoint.pt, models.safetensors)")
    return 0


# ---------------------------------------------------------------- evaluate
def cmd_evaluate(a: argparse.Namespace) -> int:
    from pqfn.config import dump_config
    from pqfn.ensemble import check_fold_folder, check_oof_fits, load_members, load_oof
    from pqfn.evaluate import evaluate_holdout
    from pqfn.report import atomic_write
    from pqfn.trial import CrossValidation

    cfg = _load(a)
    out = Path(a.out or cfg.output_dir / f"{cfg.name}-eval")
    folder = Path(a.model) if a.model else None  # the fold models of an earlier `pqfn trial` or a sweep trial
    if folder is not None:
        check_fold_folder(folder)
    prepare_out_dir(out, resume=False, overwrite=a.overwrite, what="evaluation", command="evaluate",
                    can_resume=False, key="--out" if a.out else "output_dir", inputs=_read_paths(a.config, cfg, folder))
    if folder is not None:  # read (and so checked) before any image is decoded
        model, oof = load_members(folder, cfg.trial.model), load_oof(folder)
    # A failed run leaves no folder behind (or the old one, with --overwrite): its corrected rerun is not refused.
    with replacing_folder(out):
        write_marker(out, "evaluate")
        ds, holdout = _data(cfg, trains=folder is None)
        atomic_write(out / "config.yaml", dump_config(cfg))
        if folder is not None:
            check_oof_fits(folder, oof[0], len(ds), holdout.pool)
        else:
            tc = cfg.trial
            print(f"training the {tc.folds * tc.repeats} fold models ({tc.data_size} images, {tc.resolution} px, {tc.epochs} epochs) ...")
            cv = CrossValidation(tc, ds, holdout.pool)
            cv.fit(lambda rec, cv: print(f"  epoch {int(rec['epoch'])}: val/bal_acc {rec['val/bal_acc']:.3f}"))
            cv.save_models(out)
            model, oof = load_members(out, tc.model), cv.out_of_fold()
        m, _ = evaluate_holdout(cfg.trial, cfg.evaluate, model, oof, ds, holdout, out, decode_size=cfg.data.decode_size)
    print_evaluation(m)
    print(f"results: {out} (evaluation.json, confusion.png, predictions.csv, models.safetensors)")
    return 0


def print_evaluation(m: dict[str, Any]) -> None:
    b = m["baselines"]
    print(f"held-out test: {m['n_test_images']} images of {m['n_test_packages']} packages ({m['final_model']}, prior "
          f"correction strength {m['prior_correction']['strength']:g}): accuracy {m['accuracy']:.3f} "
          f"(always-{b['majority_class']} {b['majority_accuracy']:.3f}), balanced accuracy {m['balanced_accuracy']:.3f} "
          f"(chance {b['chance_balanced_accuracy']:.2f}), macro-F1 {m['macro_f1']:.3f}")
    print(f"{'class':>6} {'precision':>10} {'recall':>8} {'f1':>6} {'n':>5}")
    for c, v in m["per_class"].items():
        print(f"{c:>6} {v['precision']:>10.3f} {v['recall']:>8.3f} {v['f1']:>6.3f} {v['support']:>5}")
    from pqfn.report import baseline_lines

    for line in baseline_lines(m):
        print(line.strip())
    print(m["verdict"])


def cmd_bench(a: argparse.Namespace) -> int:
    from pqfn.bench import bench

    cfg = _load(a)
    results = bench(cfg, a.settings, epochs=a.epochs, loader_workers=a.loader_workers, ablate=a.ablate,
                    out=Path(a.out) if a.out else None)
    print("summary: " + "; ".join(f"{r.setting} ratio {r.ratio:.2f}x" for r in results))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    """Re-run the sweep's select and write steps from its results folder (no Ray, no W&B, no training)."""
    from pqfn.config import load_config
    from pqfn.io import read_json
    from pqfn.records import SweepResult
    from pqfn.report import plot_confusion, print_summary, read_trials_csv, write_sweep
    from pqfn.selection import select

    run_dir = Path(a.run_dir)
    if not (run_dir / "trials.csv").exists():
        raise PqfnError(f"{run_dir}: no trials.csv; expected a sweep results folder")
    cfg = load_config(run_dir / "config.yaml")
    rows = read_trials_csv(run_dir / "trials.csv")
    ev_file = run_dir / "final" / "evaluation.json"  # read before anything is written: damaged -> one line
    evaluation = read_json(ev_file, "held-out evaluation (final/evaluation.json)") if ev_file.exists() else None
    if evaluation is not None and not isinstance(evaluation, dict):
        raise PqfnError(f"{ev_file}: holds a {type(evaluation).__name__}; expected the evaluation a sweep writes "
                        "(re-run the sweep command to write it again)")
    selection = select(rows, cfg.selection)
    write_sweep(run_dir, cfg, rows, selection)
    if evaluation is not None and selection.selected is not None and evaluation.get("trial_id") != selection.selected["trial_id"]:
        print(f"pqfn: warning: final/evaluation.json is of trial {evaluation.get('trial_id')}, not of the selection "
              f"{selection.selected['trial_id']}; re-run the sweep command to evaluate it", file=sys.stderr)
    elif evaluation is not None:
        plot_confusion(run_dir / "final" / "confusion.png", evaluation)
    print_summary(SweepResult(folder=str(run_dir), selection=selection, evaluation=evaluation))
    return 0


def cmd_audit(a: argparse.Namespace) -> int:
    """Score every completed trial's fold ensemble on the held-out packages (hindsight, never used to select)."""
    from pqfn.audit import audit_sweep, lines, write_audit
    from pqfn.config import load_config
    from pqfn.io import read_json
    from pqfn.records import Selection
    from pqfn.report import read_trials_csv
    from pqfn.selection import select

    run_dir = Path(a.run_dir)
    if not (run_dir / "trials.csv").exists() or not (run_dir / "config.yaml").exists():
        raise PqfnError(f"{run_dir}: no trials.csv and config.yaml; expected a sweep results folder")
    cfg = load_config(run_dir / "config.yaml")
    rows = read_trials_csv(run_dir / "trials.csv")
    sel_file = run_dir / "selection.json"
    selection = Selection.from_dict(read_json(sel_file, "selection.json")) if sel_file.exists() else select(rows, cfg.selection)
    ds, holdout = _data(cfg, trains=False)
    audit = audit_sweep(cfg, run_dir, rows, selection, ds, holdout)
    for line in lines(audit):
        print(line)
    print(f"written: {write_audit(run_dir, audit)}")
    return 0


def cmd_dfi(a: argparse.Namespace) -> int:
    from pqfn.dfi import format_table, load_design, load_thresholds, plot_scores, score
    from pqfn.io import check_output_paths

    if a.plot:  # before the table is printed: a typo'd folder must not leave a half-done command
        check_output_paths(files={"--plot": Path(a.plot)})
    th = load_thresholds(Path(a.thresholds))
    design = load_design(Path(a.design))
    result = score(th, design)
    print(json.dumps(result.as_dict(), indent=2) if a.format == "json" else format_table(result))
    if a.plot:
        plot_scores(result, Path(a.plot))
        print(f"plot: {a.plot}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- predict, export
def _check_device(flag: str, device: str) -> None:
    """--device cuda on a machine without a usable GPU: one line naming the flag, before any work."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise PqfnError(f"{flag} cuda: no CUDA GPU is usable here (torch.cuda.is_available() is false); "
                            "use --device cpu or --device auto")


def cmd_predict(a: argparse.Namespace) -> int:
    from pqfn.bundle import load_bundle
    from pqfn.predict import check_outputs, classify, collect_inputs, summary_path, write_csv

    if a.batch < 1:
        raise PqfnError(f"--batch {a.batch}: expected a positive number of images per batch, e.g. --batch 64")
    _check_device("--device", a.device)
    out = Path(a.out)
    summary = summary_path(out)
    explain = Path(a.explain) if a.explain else None
    check_output_paths(folders={"--explain": explain}, files={"--out": out, "summary": summary}, create_parents=True)
    check_not_on_inputs({"--out": out, "summary": summary, "--explain": explain},
                        [("bundle", Path(a.bundle))] + [("input", Path(p)) for p in a.inputs])  # before any listing
    items, skipped = collect_inputs(a.inputs)
    # every output is checked before the bundle is loaded or an image decoded (pqfn.io, output-path rule)
    check_outputs(Path(a.bundle), a.inputs, items, out=out, summary=summary, explain=explain, overwrite=a.overwrite)
    bundle = load_bundle(a.bundle)
    res = classify(bundle, items, skipped, batch=a.batch, device=a.device, adjust=False if a.raw else None,
                   explain=explain, progress=True)
    write_csv(out, res.rows)
    counts = ", ".join(f"{c}={sum(r['predicted'] == c for r in res.rows)}" for c in bundle.classes)
    how = "prior-adjusted" if res.adjusted else "raw (no prior adjustment)"
    print(f"classified {len(res.rows)} images in {res.seconds:.1f} s ({res.images_per_s:.1f} images/s, decoding "
          f"included); probabilities {how}; predicted {counts}")
    acc = res.accuracy()
    if acc is not None:
        print(f"against the manifest labels: accuracy {acc['accuracy']:.3f}, balanced accuracy {acc['balanced_accuracy']:.3f}")
    print(f"predictions: {out}")
    if res.summary:
        write_csv(summary, res.summary)
        print(f"per-package summary: {summary}")
    else:
        print("no package ids (give a manifest with a package_id column): no per-package summary")
    if a.explain:
        print(f"Grad-CAM overlays: {a.explain}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from pqfn.export import check_opset, export_onnx

    check_opset(a.opset)
    out = export_onnx(a.bundle, Path(a.onnx), opset=a.opset, overwrite=a.overwrite)
    print(f"ONNX model: {out} (opset {a.opset}, dynamic batch); preprocessing: "
          f"{out.with_name(out.stem + '.preprocessing.json')}")
    return 0


def build_parser(extend: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The pqfn commands; `extend(subparsers)` adds more (tune_jobs.cli adds sweep, submit and cluster)."""
    p = argparse.ArgumentParser(prog="pqfn", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    if extend is not None:
        extend(sub)

    s = sub.add_parser("synth", help="generate a synthetic CSAM data set (images + manifest.csv)")
    s.add_argument("out_dir")
    s.add_argument("--ag", type=int, default=50, help="Ag-metallized packages (default 50)")
    s.add_argument("--nipdau", type=int, default=50, help="NiPdAu-metallized packages (default 50)")
    s.add_argument("--cu", type=int, default=40, help="bare Cu packages (default 40)")
    s.add_argument("--max-cycles", type=int, default=1000)
    s.add_argument("--cycle-step", type=int, default=100, help="a scan every N thermal cycles")
    s.add_argument("--image-size", type=int, default=400, help="pixels (400 ~ 20 um per pixel)")
    s.add_argument("--difficulty", type=float, default=1.0, help="1 = default; larger = noisier, fainter")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.add_argument("--preview", action="store_true", help="also write preview.png with examples of each class")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_synth)

    for name, func, hlp in [
        ("trial", cmd_trial, "run one cross-validated trial locally"),
        ("evaluate", cmd_evaluate, "train a configuration's fold models and evaluate them on held-out packages"),
    ]:
        t = sub.add_parser(name, help=hlp)
        t.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
        t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trial.epochs=3")
        t.add_argument("--overwrite", action="store_true", help="replace an existing results folder")
        if name in ("trial", "evaluate"):
            t.add_argument("--out", help="results folder (default: <output_dir>/<name>-%s)" % ("trial" if name == "trial" else "eval"))
        if name == "trial":
            t.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
        if name == "trial":
            t.add_argument("--no-wandb", action="store_true", help="do not log to W&B (same as wandb.mode=disabled)")
        if name == "evaluate":
            t.add_argument("--model", help="a folder with fold models (models.safetensors, oof.npz) from `pqfn trial` "
                           "or a sweep's trials/<id>/, instead of training them")
        t.set_defaults(func=func)

    b = sub.add_parser("bench", help="time pqfn's trial engine against a naive PyTorch DataLoader loop")
    b.add_argument("config", help="the data to use, e.g. configs/paper.yaml (the study's 140 synthetic packages)")
    b.add_argument("overrides", nargs="*", help="key.sub=value overrides applied before each setting")
    b.add_argument("--settings", nargs="+", default=["paper", "quickstart"], choices=["paper", "quickstart", "config"],
                   help="paper: 5 folds, 840 images, 100 px, batch 8; quickstart: 3 folds, 200 images, 64 px, "
                        "batch 8; config: the config's own trial block (default: paper quickstart)")
    b.add_argument("--epochs", type=int, default=3, help="epochs for both sides (default 3)")
    b.add_argument("--loader-workers", type=int, default=None,
                   help="DataLoader workers of the naive loop (default 0 on CPU, 4 on CUDA)")
    b.add_argument("--ablate", action="store_true",
                   help="also time the engine with each fast-path feature off (bf16, channels_last, parallel folds)")
    b.add_argument("--out", help="also write the figures to this JSON file")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("report", help="regenerate a sweep's tables and plots from its results folder")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)

    au = sub.add_parser("audit", help="hindsight: score every trial of a finished sweep on its held-out packages "
                        "(never used to select)")
    au.add_argument("run_dir")
    au.set_defaults(func=cmd_audit)

    d = sub.add_parser("dfi", help="CMx-ray design-for-inspection score of a package design")
    d.add_argument("thresholds")
    d.add_argument("design")
    d.add_argument("--format", choices=["table", "json"], default="table")
    d.add_argument("--plot", help="write C_n against the ratio with the design's parameters marked")
    d.set_defaults(func=cmd_dfi)

    pr = sub.add_parser("predict", help="classify new scans with a model bundle (probabilities, per-package summary)")
    pr.add_argument("bundle", help="a model bundle folder (bundle.json, model.safetensors)")
    pr.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or manifest CSVs")
    pr.add_argument("--out", default="predictions.csv",
                    help="predictions CSV (default predictions.csv); the summary goes to <stem>_packages.csv")
    pr.add_argument("--explain", metavar="DIR", help="write a Grad-CAM overlay PNG per image into DIR")
    pr.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    pr.add_argument("--raw", action="store_true", help="predict without the bundle's class-prior adjustment")
    pr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace this command's own earlier outputs (never an input, never another file)")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="export a model bundle to ONNX (dynamic batch, preprocessing note)")
    ex.add_argument("bundle", help="a model bundle folder")
    ex.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    ex.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace an ONNX file and preprocessing note that pqfn export wrote")
    ex.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None, extend: Callable[[Any], None] | None = None) -> int:
    parser = build_parser(extend)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options (`pqfn trial C --resume trial.epochs=3`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.showwarning = _warning_line
    try:
        return int(args.func(args) or 0)
    except PqfnError as e:
        print(f"pqfn: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, ... while writing: one line, not a traceback
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"pqfn: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (use --resume to continue)" if hasattr(args, "resume") else ""  # only commands that have it
        print(f"pqfn: interrupted; results written so far are kept{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
