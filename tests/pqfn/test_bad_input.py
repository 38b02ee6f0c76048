"""Nothing a user can feed pqfn ends in a traceback: one error line naming the file, key or image,
a non-zero exit, and every file that was already there left byte-identical (issue 14, one test per class).

Commands run in-process through pqfn.cli.main; an exception other than PqfnError escapes main and
fails the test, which is exactly "a traceback".
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pqfn.data as data_mod
from pqfn.config import Config, DataConfig, with_overrides
from pqfn.data import SkippedImagesWarning, load_dataset
from pqfn.errors import ConfigError, DataError, PqfnError
from pqfn.io import check_output_paths
from tests.pqfn.cli_checks import fails
from tune_jobs.cli import main

ROOT = Path(__file__).resolve().parents[2]
TH = ROOT / "configs/dfi/cowos-thresholds.yaml"
DESIGN = ROOT / "configs/dfi/cowos-design.yaml"
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"  # what a mis-pointed path usually holds
LATIN1 = "path,label\nsc\xe8ne_1.png,A\n".encode("latin-1")  # an Excel export in the local code page


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _config(tmp_path: Path, body: str = "", name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"name: bad\noutput_dir: {tmp_path / 'runs'}\n" + body)
    return p


def _scans(root: Path) -> Path:
    """Class folders with one small scan each, package id in the file name."""
    for i, c in enumerate("ABCD"):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(root / c / f"P0{i}_c100.png")
    return root


# ------------------------------------------------------------------ 1. damaged checkpoint on --resume
def _checkpoints(tmp_path: Path) -> dict[str, bytes]:
    good = tmp_path / "good.pt"
    torch.save({"epoch": 1, "history": [], "config": {}, "learners": [torch.zeros(64)]}, good)
    raw = good.read_bytes()
    torch.save([1, 2, 3], tmp_path / "list.pt")
    return {"truncated": raw[: len(raw) // 2], "empty": b"", "garbage": b"hello world " * 20,
            "zeros": bytes(4096), "pickle-junk": b"\x80\x04junk", "not-a-dict": (tmp_path / "list.pt").read_bytes()}


def test_damaged_checkpoint_resume_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path)
    monkeypatch.setattr(data_mod, "load_dataset", lambda *a, **k: pytest.fail("data decoded before the checkpoint"))
    for kind, blob in _checkpoints(tmp_path).items():
        out = tmp_path / kind
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(blob)
        (out / "metrics.csv").write_text("epoch,fold\n1,mean\n")
        before = snapshot(out)
        line = fails(["trial", cfg, "--resume", "--out", out, "--no-wandb"], capsys, str(out / "checkpoint.pt"))
        assert ("damaged checkpoint" in line or "not a pqfn checkpoint" in line) and "--overwrite" in line, line
        assert snapshot(out) == before


# ------------------------------------------------------------------ 2. binary / non-UTF-8 text files
def test_binary_and_non_utf8_where_yaml_or_csv_is_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bin.yaml").write_bytes(BINARY)
    (tmp_path / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    before = snapshot(tmp_path)
    assert "binary file" in fails(["trial", tmp_path / "bin.yaml", "--no-wandb"], capsys, "bin.yaml")
    assert "line 1" in fails(["trial", tmp_path / "latin.yaml", "--no-wandb"], capsys, "latin.yaml", "UTF-8")
    fails(["dfi", tmp_path / "bin.yaml", DESIGN], capsys, "bin.yaml")  # DFI thresholds
    fails(["dfi", TH, tmp_path / "latin.yaml"], capsys, "latin.yaml")  # DFI design
    assert snapshot(tmp_path) == before

    for name, blob in [("bin.csv", BINARY), ("latin.csv", LATIN1), ("ragged.csv", b"path,label\nx.png,A,extra\n")]:
        (tmp_path / name).write_bytes(blob)
        cfg = _config(tmp_path, f"data: {{source: manifest, path: {tmp_path / name}, cache_dir: {tmp_path / 'c'}}}\n",
                      name=f"{name}.yaml")
        fails(["trial", cfg, "--no-wandb", "--out", tmp_path / "o"], capsys, name)

    run = tmp_path / "run"  # pqfn report on a results folder whose trials.csv is binary
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n")
    (run / "trials.csv").write_bytes(BINARY)
    before = snapshot(run)
    fails(["report", run], capsys, "trials.csv", "binary")
    assert snapshot(run) == before


# ------------------------------------------------------------------ 3. files where folders are needed
def test_files_where_folders_are_needed_fail_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("I am a file")
    before = snapshot(tmp_path)
    cfg = _config(tmp_path, name="o.yaml")
    cfg.write_text(f"name: o\noutput_dir: {blocker}\n")
    fails(["trial", cfg, "--no-wandb"], capsys, "output_dir", str(blocker), "is a file")
    fails(["trial", cfg, "--no-wandb", "--out", blocker], capsys, "--out", "is a file, expected a folder")
    fails(["evaluate", cfg, "--out", blocker], capsys, "--out", "is a file")

    # data.cache_dir is a file: refused before a single image is decoded
    monkeypatch.setattr(data_mod, "decode_image", lambda *a, **k: pytest.fail("decoded before the cache check"))
    scans = _scans(tmp_path / "scans")
    cache_cfg = _config(tmp_path, f"data: {{source: folders, path: {scans}, cache_dir: {blocker}}}\n", name="cache.yaml")
    fails(["trial", cache_cfg, "--no-wandb", "--out", tmp_path / "t"], capsys, "data.cache_dir", str(blocker))

    # --plot into a folder that does not exist: refused before the table is printed
    code = main(["dfi", str(TH), str(DESIGN), "--plot", str(tmp_path / "nodir" / "x.png")])
    cap = capsys.readouterr()
    assert code == 2 and cap.out == "" and "--plot" in cap.err and "nodir" in cap.err and len(cap.err.splitlines()) == 1
    fails(["dfi", TH, DESIGN, "--plot", tmp_path], capsys, "--plot", "is a folder")
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before

    with pytest.raises(PqfnError, match="data.path"):  # the synthetic set cannot be generated into a file
        load_dataset(DataConfig(path=blocker, cache_dir=tmp_path / "c2"), log=False)
    check_output_paths(folders={"output_dir": tmp_path / "new" / "deeper"}, files={"--plot": tmp_path / "ok.png"})


# ------------------------------------------------------------------ 4. half-written cluster.json
def test_half_written_cluster_state(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tune_jobs.submit import default_python

    cases = {
        "half": b'{\n  "pids": [1234, 1235],\n  "gcs_address": "127.0.0.1:6390",\n  "dashb',
        "binary": BINARY,
        "empty": b"",
        "wrong": json.dumps({"pids": [1], "dashboard": "http://127.0.0.1:8265"}).encode(),
    }
    for name, blob in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cluster.json").write_bytes(blob)
        before = snapshot(folder)
        line = fails(["cluster", "env", "--dir", folder], capsys, str(folder / "cluster.json"))
        assert "pqfn cluster up" in line
        fails(["cluster", "down", "--dir", folder], capsys, "cluster.json")
        assert snapshot(folder) == before
    assert "half-written" in fails(["cluster", "env", "--dir", tmp_path / "half"], capsys)
    assert "token_path" in fails(["cluster", "env", "--dir", tmp_path / "wrong"], capsys)

    # `pqfn submit` looks for local cluster state in the working folder: a damaged file there is skipped
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="half/cluster.json"):
        assert default_python("http://127.0.0.1:8265") == "python"


# ------------------------------------------------------------------ 5. malformed trials.csv
@pytest.mark.parametrize(("text", "match"), [
    ("trial_id,status,val/acc\nt1,completed,0.5\nt2,completed,0.4,0.1\n", r"line 3: 4 cell\(s\)"),
    ("trial_id,status,val/acc\nt1,completed,abc\n", "line 2: column val/acc: 'abc' is not a number"),
    ("trial_id,status,val/acc\nt1,finished,0.5\n", "line 2: status 'finished'"),
    ("trial_id,val/acc\nt1,0.5\n", r"lacks column\(s\) \['status'\]"),
    ("", "is empty"),
    ('trial_id,status,error\nt1,failed,"unterminated\n', "line 2: not a valid CSV row"),  # cut mid-quote
])
def test_malformed_trials_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, match: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n")
    (run / "trials.csv").write_text(text)
    before = snapshot(run)
    line = fails(["report", run], capsys, str(run / "trials.csv"))
    assert re.search(match, line), line
    assert snapshot(run) == before


# ------------------------------------------------------------------ 6. DFI numeric overflow
def test_dfi_extreme_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t.yaml").write_text("steepness: 400\nparameters:\n  a: {threshold: 1, weight: 0.5}\n"
                                     "  b: {threshold: 1, weight: 0.5, direction: smaller_is_better}\n")
    (tmp_path / "d.yaml").write_text("parameters: {a: 10, b: 1.0e-3}\n")  # 10**400 and 1000**400 overflow a float
    assert main(["dfi", str(tmp_path / "t.yaml"), str(tmp_path / "d.yaml"), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cmx_ray"] == pytest.approx(1.0) and all(p["score"] == pytest.approx(1.0) for p in out["parameters"])

    (tmp_path / "far.yaml").write_text("parameters: {a: 1.0e+300, b: 1}\n")  # ratio 1e300 / 1e-300 -> inf
    (tmp_path / "t2.yaml").write_text("parameters:\n  a: {threshold: 1.0e-300, weight: 0.5}\n  b: {threshold: 1, weight: 0.5}\n")
    fails(["dfi", tmp_path / "t2.yaml", tmp_path / "far.yaml"], capsys, "far.yaml", "parameters.a")
    (tmp_path / "inf.yaml").write_text("steepness: .inf\nparameters:\n  a: {threshold: 1, weight: 1}\n")
    fails(["dfi", tmp_path / "inf.yaml", tmp_path / "d.yaml"], capsys, "inf.yaml", "steepness")
    (tmp_path / "w.yaml").write_text("normalize: true\nparameters:\n  a: {threshold: 1, weight: 1.0e+308}\n"
                                     "  b: {threshold: 1, weight: 1.0e+308}\n")
    fails(["dfi", tmp_path / "w.yaml", tmp_path / "d.yaml"], capsys, "w.yaml", "weights")


# ------------------------------------------------------------------ 7. package_regex that matches nothing
def test_package_regex_that_matches_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    scans = _scans(tmp_path / "scans")
    monkeypatch.setattr(data_mod, "decode_image", lambda *a, **k: pytest.fail("decoded before the regex check"))
    cfg = _config(tmp_path, f"data: {{source: folders, path: {scans}, package_regex: 'pkg-(\\d+)', "
                            f"cache_dir: {tmp_path / 'c'}}}\n")
    line = fails(["trial", cfg, "--no-wandb", "--out", tmp_path / "o"], capsys, "data.package_regex", "P00_c100.png")
    assert "pkg-" in line
    monkeypatch.undo()

    Image.fromarray(np.zeros((20, 20), np.uint8)).save(scans / "D" / "scan-without-id.png")
    dc = DataConfig(source="folders", path=scans, package_regex=r"(?P<package>P\d+)_", decode_size=16,
                    cache_dir=tmp_path / "c")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = load_dataset(dc, log=False)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "1 of 5" in msgs[0] and "scan-without-id.png" in msgs[0], msgs
    assert "set data.package_regex" not in msgs[0]  # it is set: never advise setting it
    assert list(ds.package_ids[:4]) == ["P00", "P01", "P02", "P03"]


# ------------------------------------------------------------------ 8. messages suggest only flags that exist
def test_messages_suggest_only_existing_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "evaluation.json").write_text("{}")
    line = fails(["evaluate", cfg, "--out", out], capsys, "--overwrite")
    assert "--resume" not in line  # evaluate has no --resume

    import pqfn.dfi

    def interrupted(*a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pqfn.dfi, "load_thresholds", interrupted)
    assert main(["dfi", str(TH), str(DESIGN)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err


# ------------------------------------------------------------------ 9. search.space values; numpy reprs
def test_bad_search_space_value_names_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, "search:\n  space:\n    trial.resolution: {choice: [32, 4]}\n")
    line = fails(["trial", cfg, "--no-wandb"], capsys, str(cfg), "search.space.trial.resolution", "value 4")
    assert "override" not in line
    cfg.write_text("search:\n  space:\n    trial.optimizer.lr: {loguniform: [1.0e-4, 100]}\n")
    fails(["trial", cfg, "--no-wandb"], capsys, str(cfg), "search.space.trial.optimizer.lr.loguniform", "100")

    with pytest.raises(ConfigError) as e:  # a search point from the sweep is not a command-line override
        with_overrides(Config(), {"trial.resolution": np.int64(4)})
    assert "override" not in str(e.value) and "np." not in str(e.value) and "trial.resolution=4" in str(e.value)


def test_messages_print_plain_values_not_numpy_reprs(tmp_path: Path) -> None:
    from pqfn.splits import split_test

    scans = _scans(tmp_path / "scans")
    rows = "\n".join(f"{c}/P0{i}_c100.png,{c},P0{i}" for i, c in enumerate("ABCD"))
    (scans / "train.csv").write_text("path,label,package_id\n" + rows + "\n")
    (scans / "test.csv").write_text("path,label,package_id\nA/P00_c100.png,A,P00\n")
    dc = DataConfig(source="manifest", path=scans / "train.csv", test_manifest=scans / "test.csv", decode_size=16,
                    cache_dir=tmp_path / "c")
    with pytest.raises(DataError) as e:
        split_test(load_dataset(dc, log=False), 0.2, 0)
    assert "P00" in str(e.value) and "np.str_" not in str(e.value)


# ------------------------------------------------------------------ 10. non-image files in class folders
def test_non_image_files_are_skipped_corrupt_images_warned(tmp_path: Path) -> None:
    scans = _scans(tmp_path / "scans")
    (scans / "A" / "notes.txt").write_text("scanned on the old CSAM")
    (scans / "B" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (scans / "C" / "P09_c100.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    dc = DataConfig(source="folders", path=scans, package_regex=r"(P\d+)_", decode_size=16, cache_dir=tmp_path / "c")
    with pytest.warns(SkippedImagesWarning) as rec:
        ds = load_dataset(dc, log=False)
    msgs = [str(w.message) for w in rec if issubclass(w.category, SkippedImagesWarning)]
    assert len(msgs) == 1 and "P09_c100.png" in msgs[0] and "notes.txt" not in msgs[0] and "DS_Store" not in msgs[0]
    assert len(ds) == 4

    empty = tmp_path / "only-notes"
    (empty / "A").mkdir(parents=True)
    (empty / "A" / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no image files.*readme.md"):
        load_dataset(DataConfig(source="folders", path=empty, cache_dir=tmp_path / "c"), log=False)


# ------------------------------------------------------------------ more instances of classes 2 and 3
def test_synth_into_a_file_and_predict_on_a_binary_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "afile"
    f.write_bytes(b"keep me")
    fails(["synth", f], capsys, "out_dir", str(f))
    assert f.read_bytes() == b"keep me"
    from pqfn.predict import collect_inputs

    bad = tmp_path / "scans.csv"
    bad.write_bytes(bytes(range(128, 256)))
    with pytest.raises(DataError, match="scans.csv"):
        collect_inputs([bad])


def test_damaged_out_of_fold_file_is_one_line(tmp_path: Path) -> None:
    from pqfn.ensemble import load_oof
    from pqfn.errors import TrialError

    (tmp_path / "oof.npz").write_bytes(b"half")
    with pytest.raises(TrialError, match="oof.npz"):
        load_oof(tmp_path)
