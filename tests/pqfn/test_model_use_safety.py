"""Using the model never destroys a user's files (issue 22): one test per class of the Build list.

Every test records the sha256 of the files that existed before (scans, manifests, bundles, fold models,
earlier results) and checks them after. Commands run in-process through the installed entry point
(tune_jobs.cli.main); an exception other than PqfnError escapes main and fails the test ("a traceback").
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import socket
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pqfn.bundle import _content_sha, _sha256
from pqfn.config import DataConfig
from pqfn.data import SkippedImagesWarning, load_dataset
from pqfn.ensemble import check_oof_fits, load_members, load_oof, save_members
from pqfn.errors import DataError, PqfnError, TrialError
from pqfn.io import MARKER, check_not_on_inputs, write_marker
from pqfn.model import build_model
from pqfn.predict import DuplicateInputsWarning, collect_inputs
from tests.pqfn.bundles import make_bundle
from tests.pqfn.cli_checks import fails
from tune_jobs.cli import main


def sha(root: Path) -> dict[str, str]:
    """sha256 of every file under root (or of root itself), by relative path."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "b")


def _scans(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 48), np.uint8)).save(root / f"P0{i}_c100.png")
    return root


def _bomb(path: Path, w: int = 20000, h: int = 20000) -> None:
    """A PNG whose header claims w x h pixels (a few hundred bytes on disk; PIL would need w*h bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(100)))
                     + chunk(b"IEND", b""))


def _config(tmp_path: Path, body: str = "") -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(f"name: safe\noutput_dir: {tmp_path / 'runs'}\nwandb: {{mode: disabled}}\n" + body)
    return p


def _fold_folder(folder: Path, n_rows: int = 10) -> Path:
    torch.manual_seed(0)
    save_members(folder, [build_model("resnet18") for _ in range(2)], np.arange(n_rows), np.zeros((n_rows, 4)))
    return folder


# ------------------------------------------------------------------ 1. outputs never land on inputs
def test_the_four_destructive_examples_are_refused_before_any_work(
        tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scans = _scans(tmp_path / "scans")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,package_id\nscans/P00_c100.png,P0\nscans/P01_c100.png,P0\n")
    run = _fold_folder(tmp_path / "run")
    (run / "config.yaml").write_text("name: safe\n")
    write_marker(run, "evaluate")  # even a folder evaluate wrote is never replaced when it is the input
    notes = tmp_path / "m.preprocessing.json"
    notes.write_text('{"my": "own notes"}')
    before = {p: sha(p) for p in (scans, manifest, run, notes, bundle)}

    # --explain onto the input scans (it used to overwrite every scan with its overlay, exit 0)
    fails(["predict", bundle, scans, "--out", tmp_path / "pred.csv", "--explain", scans], capsys,
          "--explain", str(scans), "is the input")
    fails(["predict", bundle, scans, "--out", tmp_path / "p.csv", "--explain", scans / "cams"], capsys, "lies inside")
    fails(["predict", bundle, scans, "--out", tmp_path / "p.csv", "--explain", tmp_path], capsys, "contains")
    # --out onto the input manifest, with --overwrite
    fails(["predict", bundle, manifest, "--out", manifest, "--overwrite"], capsys, "--out", "list.csv", "is the input")
    # --out onto a scan that a manifest lists (not itself an input on the command line)
    fails(["predict", bundle, manifest, "--out", scans / "P00_c100.png", "--overwrite"], capsys, "is the scan")
    fails(["predict", bundle, scans, "--out", bundle / "pred.csv"], capsys, "lies inside the bundle")
    # export next to a user's own m.preprocessing.json: refused without and with --overwrite
    fails(["export", bundle, "--onnx", tmp_path / "m.onnx"], capsys, "m.preprocessing.json", "already exists")
    fails(["export", bundle, "--onnx", tmp_path / "m.onnx", "--overwrite"], capsys, "m.preprocessing.json",
          "not written by this command")
    fails(["export", bundle, "--onnx", bundle / "m.onnx"], capsys, "--onnx", "lies inside the bundle")
    # evaluate --out onto the fold models it was asked to evaluate
    cfg = _config(tmp_path)
    fails(["evaluate", cfg, "--model", run, "--out", run, "--overwrite"], capsys, "--out", "is the --model folder")
    fails(["evaluate", cfg, "--model", run, "--out", run / "ev"], capsys, "lies inside the --model folder")
    # trial --resume --overwrite used to delete the folder, then find no checkpoint
    write_marker(run, "trial")
    fails(["trial", cfg, "--resume", "--overwrite", "--out", run], capsys, "--resume and --overwrite")
    write_marker(run, "evaluate")
    assert {p: sha(p) for p in before} == before
    assert not (tmp_path / "pred.csv").exists() and not (tmp_path / "m.onnx").exists()
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob(".*tmp"))


def test_overwrite_replaces_only_what_the_same_command_wrote(
        tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scans = _scans(tmp_path / "scans", n=2)
    out, cams = tmp_path / "pred.csv", tmp_path / "cams"
    args = ["predict", bundle, scans, "--out", out, "--explain", cams]
    assert main([str(a) for a in args]) == 0
    assert (cams / MARKER).is_file() and len(list(cams.glob("*.png"))) == 2
    capsys.readouterr()
    fails(args, capsys, str(out), "--overwrite")  # exists: refused without --overwrite
    assert main([str(a) for a in [*args, "--overwrite"]]) == 0  # its own output: replaced
    assert out.read_text().startswith("path,predicted,prob_A")
    capsys.readouterr()

    # a user's own CSV or folder at those paths is never replaced, whatever --overwrite says
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("a,b\n1,2\n")
    folder = tmp_path / "their-cams"
    folder.mkdir()
    (folder / "figure.png").write_bytes(b"not ours")
    (tmp_path / "dir.csv").mkdir()
    before = sha(tmp_path)
    fails(["predict", bundle, scans, "--out", theirs, "--overwrite"], capsys, str(theirs), "not written by this command")
    fails(["predict", bundle, scans, "--out", tmp_path / "x.csv", "--explain", folder, "--overwrite"], capsys,
          "--explain", MARKER)
    # --out onto a folder: refused by name (it used to fail with "dir.csv.tmp: Is a directory" under --overwrite)
    fails(["predict", bundle, scans, "--out", tmp_path / "dir.csv", "--overwrite"], capsys, "--out", "is a folder")
    assert sha(tmp_path) == before and not (tmp_path / "x.csv").exists()

    # export twice with --overwrite: its own two files are replaced
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", str(bundle), "--onnx", str(onnx_file)]) == 0
    assert main(["export", str(bundle), "--onnx", str(onnx_file), "--overwrite"]) == 0
    assert json.loads((tmp_path / "m.preprocessing.json").read_text())["model"] == "m.onnx"


def test_overwrite_puts_the_old_folder_back_when_the_new_run_fails(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, f"data: {{source: manifest, path: {tmp_path / 'missing.csv'}, cache_dir: {tmp_path / 'c'}}}\n")
    for command in ("trial", "evaluate"):
        old = tmp_path / f"old-{command}"
        old.mkdir()
        (old / "metrics.csv").write_text("epoch\n1\n")
        write_marker(old, command)
        before = sha(old)
        extra = ["--no-wandb"] if command == "trial" else []
        fails([command, cfg, "--out", old, "--overwrite", *extra], capsys, "missing.csv")
        assert sha(old) == before, command
        # a folder the command did not write (no marker) is refused, even with --overwrite
        (old / MARKER).unlink()
        fails([command, cfg, "--out", old, "--overwrite", *extra], capsys, "was not written by", MARKER)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_path_rule_unit(tmp_path: Path) -> None:
    (tmp_path / "scans").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "scans")
    with pytest.raises(PqfnError, match="is the input"):  # through a symlink, too
        check_not_on_inputs({"--explain": link}, [("input", tmp_path / "scans")])
    check_not_on_inputs({"--out": tmp_path / "scans-out.csv", "--explain": None}, [("input", tmp_path / "scans")])


# ------------------------------------------------------------------ 2. bundles and model files, validated on load
def _variant(src: Path, dest: Path, *, edit: object = None, weights: object = None) -> Path:
    """A copy of a bundle, changed and re-checksummed (what a hand edit with a fixed checksum gives)."""
    shutil.copytree(src, dest)
    info = json.loads((dest / "bundle.json").read_text())
    if callable(weights):
        weights(dest / "model.safetensors")
        info["files"]["model.safetensors"] = _sha256(dest / "model.safetensors")
    if callable(edit):
        edit(info)
    info.pop("content_sha256")
    info["content_sha256"] = _content_sha(info)
    (dest / "bundle.json").write_text(json.dumps(info))
    return dest


def test_damaged_bundles_are_one_line_naming_the_bundle(tmp_path: Path, bundle: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    scans = _scans(tmp_path / "scans", n=1)
    cases = {
        "no-preprocessing": (_variant(bundle, tmp_path / "b1", edit=lambda i: i.pop("preprocessing")), "preprocessing"),
        "torch-file": (_variant(bundle, tmp_path / "b2", weights=lambda p: torch.save({"w": torch.zeros(2)}, p)),
                       "torch.save"),
        "unknown-model": (_variant(bundle, tmp_path / "b3", edit=lambda i: i["architecture"].update(
            timm_model="resnet18_nope")), "resnet18_nope"),
        "wrong-type": (_variant(bundle, tmp_path / "b4", edit=lambda i: i["preprocessing"].update(resolution="32")),
                       "preprocessing.resolution"),
    }
    before = sha(tmp_path)
    for name, (folder, what) in cases.items():
        line = fails(["predict", folder, scans, "--out", tmp_path / "p.csv"], capsys, str(folder), what)
        assert "not a usable pqfn bundle" in line, name
        fails(["export", folder, "--onnx", tmp_path / "m.onnx"], capsys, str(folder), what)
    assert "trial.model" not in fails(["predict", tmp_path / "b3", scans, "--out", tmp_path / "p.csv"], capsys)
    (tmp_path / "b5").mkdir()
    (tmp_path / "b5" / "bundle.json").write_text('{"format": "pqfn-bund')  # truncated
    fails(["predict", tmp_path / "b5", scans, "--out", tmp_path / "p.csv"], capsys, "b5", "ends early")
    assert {k: v for k, v in sha(tmp_path).items() if k in before} == before


def test_fold_models_and_oof_are_read_through_the_guarded_reader(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    good = _fold_folder(tmp_path / "good")
    raw = (good / "models.safetensors").read_bytes()
    trunc = tmp_path / "trunc"
    shutil.copytree(good, trunc)
    (trunc / "models.safetensors").write_bytes(raw[: len(raw) // 3])
    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    torch.save({"member0.w": torch.zeros(2)}, pickled / "models.safetensors")
    cfg = _config(tmp_path)
    before = sha(tmp_path)
    fails(["evaluate", cfg, "--model", trunc, "--out", tmp_path / "e1"], capsys, str(trunc / "models.safetensors"),
          "damaged")
    fails(["evaluate", cfg, "--model", pickled, "--out", tmp_path / "e2"], capsys, "torch.save")
    line = fails(["evaluate", cfg, "--model", tmp_path / "nope.safetensors", "--out", tmp_path / "e3"], capsys,
                 "--model", "nope.safetensors", "no such folder")
    assert "nope.safetensors/models.safetensors" not in line
    fails(["evaluate", cfg, "--model", good / "models.safetensors", "--out", tmp_path / "e4"], capsys, "is a file")
    assert sha(tmp_path) == before  # nothing written: no e1..e4 left to block a rerun

    with pytest.raises(TrialError, match="oof.npz"):
        (good / "oof.npz").write_bytes(b"PK\x03\x04 half")
        load_oof(good)
    np.savez(good / "oof.npz", index=np.arange(3), logits=np.zeros((3, 2)))
    with pytest.raises(TrialError, match=r"logits \(3, 2\)"):
        load_oof(good)
    assert len(load_members(_fold_folder(tmp_path / "g2"), "resnet18").members) == 2


def test_oof_of_another_data_set_is_refused(tmp_path: Path, tiny_data_cfg: DataConfig,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = _fold_folder(tmp_path / "run", n_rows=5000)  # written for a data set of 5000 images
    dc = tiny_data_cfg
    cfg = _config(tmp_path, f"data: {{path: {dc.path}, cache_dir: {dc.cache_dir}, decode_size: {dc.decode_size}, "
                            f"test_fraction: {dc.test_fraction}, synthetic: {dc.synthetic.model_dump(mode='json')}}}\n"
                            "trial: {resolution: 32, folds: 2, device: cpu}\n")
    before = sha(run)
    fails(["evaluate", cfg, "--model", run, "--out", tmp_path / "ev"], capsys, str(run / "oof.npz"), "another data set")
    assert sha(run) == before and not (tmp_path / "ev").exists()  # the failed run leaves nothing behind
    with pytest.raises(TrialError, match="not in this data set's search pool"):
        check_oof_fits(run, np.array([0, 1, 1]), 10, np.arange(10))


def test_truncated_evaluation_json_under_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("name: r\n")
    (run / "trials.csv").write_text("trial_id,status,val/acc\nt1,completed,0.5\n")
    (run / "final" / "evaluation.json").write_text('{"trial_id": "t1", "accur')
    before = sha(run)
    fails(["report", run], capsys, str(run / "final" / "evaluation.json"), "ends early")
    assert sha(run) == before  # nothing rewritten before the damaged file was found


# ------------------------------------------------------------------ 3. flags and third-party noise
def test_flags_are_checked_first_and_name_the_flag(tmp_path: Path, bundle: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    scans = _scans(tmp_path / "scans", n=1)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    before = sha(tmp_path)
    for batch in ("0", "-1"):
        fails(["predict", bundle, scans, "--out", tmp_path / "p.csv", "--batch", batch], capsys, f"--batch {batch}")
    fails(["predict", bundle, scans, "--out", tmp_path / "p.csv", "--explain", notes], capsys, "--explain", "is a file")
    if not torch.cuda.is_available():
        fails(["predict", bundle, scans, "--out", tmp_path / "p.csv", "--device", "cuda"], capsys, "--device cuda")
    code = main(["export", str(bundle), "--onnx", str(tmp_path / "m.onnx"), "--opset", "99"])
    cap = capsys.readouterr()
    assert code == 2 and cap.out == "" and cap.err.count("\n") == 1 and "--opset 99" in cap.err, cap.err
    assert sha(tmp_path) == before


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed on exit: nothing listens there


def test_sweep_address_is_checked_before_the_folder_and_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    fails(["sweep", cfg, "--address", "http://127.0.0.1:8265"], capsys, "http://127.0.0.1:8265", "pqfn submit")
    port = _refused_port()
    fails(["sweep", cfg, "--address", f"127.0.0.1:{port}"], capsys, f"127.0.0.1:{port}", "nothing answers")
    fails(["sweep", cfg, "--address", "nonsense"], capsys, "--address nonsense", "HOST:PORT")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ 4. decompression bombs
def test_images_too_large_to_decode_are_listed(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scans = _scans(tmp_path / "scans", n=2)
    _bomb(scans / "huge.png")
    _bomb(scans / "P09_c100.png", 10000, 10000)  # between PIL's warning and error thresholds
    before = sha(scans)
    assert main(["predict", str(bundle), str(scans), "--out", str(tmp_path / "p.csv")]) == 0
    err = capsys.readouterr().err
    warns = [ln for ln in err.splitlines() if ln.startswith("pqfn: warning")]
    assert len(warns) == 1 and "huge.png" in warns[0] and "P09_c100.png" in warns[0] and "pixel limit" in warns[0], err
    assert "DecompressionBomb" not in err and "Traceback" not in err
    with open(tmp_path / "p.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert sha(scans) == before

    classes = tmp_path / "classes"
    for i, c in enumerate("ABCD"):
        (classes / c).mkdir(parents=True)
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(classes / c / f"P0{i}_c100.png")
    _bomb(classes / "A" / "P05_c100.png")
    dc = DataConfig(source="folders", path=classes, package_regex=r"(P\d+)_", decode_size=16, cache_dir=tmp_path / "c")
    with pytest.warns(SkippedImagesWarning, match="P05_c100.png.*pixel limit"):
        assert len(load_dataset(dc, log=False)) == 4
    with pytest.raises(DataError, match="data.strict.*P05_c100.png"):
        load_dataset(dc.model_copy(update={"strict": True}), cache=False, log=False)


# ------------------------------------------------------------------ 5. inputs that cannot be used are named
def test_unusable_inputs_are_named(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "notes.txt").write_text("x")
    gone = tmp_path / "gone.csv"
    gone.write_text("path\nmissing/a.png\nmissing/b.png\n")
    out = tmp_path / "p.csv"
    fails(["predict", bundle, empty, "--out", out], capsys, str(empty), "empty")
    fails(["predict", bundle, texts, "--out", out], capsys, str(texts), "no image files", "notes.txt")
    fails(["predict", bundle, gone, "--out", out], capsys, str(gone), "none of the 2 path(s)", "missing/a.png")
    assert not out.exists()


def test_duplicates_and_symlink_loops_are_reported_once(tmp_path: Path, bundle: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    scans = _scans(tmp_path / "scans", n=2)
    (scans / "loop.png").symlink_to(scans / "loop.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,package_id\nscans/P00_c100.png,P0\nscans/P01_c100.png,P0\nscans/P01_c100.png,P0\n")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        items, skipped = collect_inputs([manifest, scans])
    dup = [str(w.message) for w in rec if issubclass(w.category, DuplicateInputsWarning)]
    assert len(items) == 2 and len(dup) == 1 and "3 scan(s)" in dup[0], dup
    assert skipped == [f"{scans / 'loop.png'} (symlink loop or broken link)"]

    out = tmp_path / "p.csv"
    assert main(["predict", str(bundle), str(manifest), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert sum(ln.startswith("pqfn: warning") for ln in err.splitlines()) == 1 and "more than once" in err
    with open(tmp_path / "p_packages.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["n_scans"] == "2"  # the repeated row is not counted twice
