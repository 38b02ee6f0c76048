"""Guarded readers and the output-path check: whatever a user feeds in becomes one PqfnError line.

Every file a user can hand to pqfn (config and DFI YAML, manifests, trials.csv, cluster.json,
checkpoints) is read through one of these, so a binary, truncated, half-written or non-UTF-8 file
is reported as "<file>: <what is wrong>; expected <what>" instead of a traceback. Output folders
and files are checked by `check_output_paths` BEFORE any work starts (decoding, training, printing),
so a misplaced path fails in a second, not after the expensive part, and nothing is written.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqfn.errors import PqfnError


def plain(value: Any) -> Any:
    """numpy scalars -> Python values, so messages read 'P00' and 4, not np.str_('P00') and np.int64(4)."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    if isinstance(value, set | frozenset):
        return sorted((plain(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    return value


def strict_json(value: Any, **kw: Any) -> str:
    """JSON text that every JSON reader accepts: a NaN or infinite number (an undefined figure) is written as
    null, never as the NaN / Infinity that Python's json writes and strict readers (jq, JavaScript) refuse."""

    def clean(v: Any) -> Any:
        v = plain(v)
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, **kw)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def read_text(path: Path, what: str, error: type[PqfnError] = PqfnError) -> str:
    """A UTF-8 text file (a BOM is allowed). Missing, unreadable, binary or wrongly encoded -> `error`."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if b"\x00" in raw[:8192]:
        # NUL bytes never occur in YAML, CSV or JSON text; this is an image, an archive, a checkpoint...
        raise error(f"{path}: is a binary file, not a {what} (expected UTF-8 text)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(f"{path}: line {line}: byte 0x{raw[e.start]:02x} is not UTF-8 text; expected a {what} "
                    "saved as UTF-8") from None


def read_yaml(path: Path, what: str = "YAML file", error: type[PqfnError] = PqfnError) -> dict[str, Any]:
    """A YAML file holding a mapping at the top level (an empty file is an empty mapping)."""
    import yaml

    text = read_text(path, what, error)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', None) or _first_line(e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def read_json(path: Path, what: str = "JSON file", error: type[PqfnError] = PqfnError) -> Any:
    text = read_text(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
            raise error(f"{path}: ends early, at line {e.lineno} (it may be half-written); expected a {what}") from None
        raise error(f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); expected a {what}") from None


@dataclass(frozen=True)
class CsvTable:
    path: Path
    columns: list[str]
    rows: list[tuple[int, dict[str, str]]]  # (line number in the file, {column: cell})

    def __iter__(self) -> Iterator[tuple[int, dict[str, str]]]:
        return iter(self.rows)


def read_csv(path: Path, what: str, required: tuple[str, ...] = (), error: type[PqfnError] = PqfnError,
             expected: str = "") -> CsvTable:
    """A CSV with a header row. Every row must have exactly the header's number of cells.

    `required` columns must be in the header; `expected` describes the layout for the message.
    Blank lines are skipped. Line numbers count physical lines, as an editor shows them.
    """
    text = read_text(path, what, error)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # an unclosed quote is damage, not data
    try:
        header = next(reader, None)
        if header is None:
            raise error(f"{path}: is empty; expected a {what} with a header row" + (f" ({expected})" if expected else ""))
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise error(f"{path}: {what} lacks column(s) {missing}" + (f"; expected {expected}" if expected else ""))
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise error(f"{path}: column(s) {dup} appear more than once in the header")
        rows = []
        line = reader.line_num
        for cells in reader:
            start, line = line + 1, reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise error(f"{path} line {start}: {len(cells)} cell(s) where the header has {len(header)}; "
                            f"expected a {what} row (the file may be damaged or half-written)")
            rows.append((start, dict(zip(header, cells, strict=True))))
    except csv.Error as e:
        raise error(f"{path} line {reader.line_num}: not a valid CSV row ({e}); expected a {what}") from None
    return CsvTable(path, header, rows)


def load_checkpoint(path: Path, required: tuple[str, ...] = (), error: type[PqfnError] = PqfnError,
                    hint: str = "") -> dict[str, Any]:
    """A torch checkpoint (a dict). Truncated, zeroed or foreign files -> one `error` line naming the file.

    A run killed mid-write or a full disk leaves exactly such files; torch reports them as
    UnpicklingError, EOFError, RuntimeError (zip), KeyError and more, so every failure is caught.
    """
    import torch

    then = f"; {hint}" if hint else ""
    if not path.is_file():
        raise error(f"{path}: no checkpoint to resume from{then}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load fails in many ways on a damaged file; all mean the same
        raise error(f"{path}: damaged checkpoint, cannot be read ({type(e).__name__}: {_first_line(e)}); "
                    f"the run cannot resume from it{then}") from None
    if not isinstance(state, dict) or any(k not in state for k in required):
        lacks = [k for k in required if not isinstance(state, dict) or k not in state]
        raise error(f"{path}: not a pqfn checkpoint (lacks {lacks or 'a dict of state'}); the run cannot resume "
                    f"from it{then}")
    return state


# ---------------------------------------------------------------- output paths
def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_paths(folders: Mapping[str, Path | None] | None = None,
                       files: Mapping[str, Path | None] | None = None, *, create_parents: bool = False) -> None:
    """Check, before any work, that outputs can be written. Keys name the setting for the message.

    folders: {"output_dir": Path(...)}: must be a folder or creatable (no file on the way, writable).
    files: {"--plot": Path(...)}: its folder must already exist (a typo'd folder is not created
    silently; with create_parents, a creatable folder will do) and the path itself must not be a
    folder. None values are skipped.
    """
    for key, p in (folders or {}).items():
        if p is None:
            continue
        p = Path(p).expanduser()
        if p.exists() and not p.is_dir():
            raise PqfnError(f"{key} {p}: is a file, expected a folder")
        base = _nearest_existing(p.absolute())
        if not base.is_dir():
            raise PqfnError(f"{key} {p}: {base} is a file, so this folder cannot be created")
        if not os.access(base, os.W_OK | os.X_OK):
            raise PqfnError(f"{key} {p}: {base} is not writable")
    for key, p in (files or {}).items():
        if p is None:
            continue
        p = Path(p).expanduser()
        parent = p.absolute().parent
        if p.is_dir():
            raise PqfnError(f"{key} {p}: is a folder, expected a file name")
        if create_parents and not parent.exists():
            check_output_paths(folders={f"{key} {p}: folder": p.parent})
            continue
        if not parent.exists():
            raise PqfnError(f"{key} {p}: folder {p.parent} does not exist")
        if not parent.is_dir():
            raise PqfnError(f"{key} {p}: {p.parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PqfnError(f"{key} {p}: folder {p.parent} is not writable")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------- outputs never land on inputs
def _real(p: Path) -> Path:
    return Path(os.path.realpath(Path(p).expanduser()))  # symlinks followed: a link to a scan is that scan


def check_not_on_inputs(outputs: Mapping[str, Path | None], inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse, before any work and whatever --overwrite says, an output that is, contains or lies inside an input.

    outputs: {"--out": Path(...)} (the key names the flag or setting); inputs: (what, path) pairs, e.g.
    ("input folder", scans), ("manifest", list.csv), ("bundle", B), ("scan", file). An output inside an input
    folder would be read back as input next time (or overwrite it); one that contains an input would take it
    along when it is replaced.
    """
    ins = [(what, Path(p), _real(p)) for what, p in inputs]
    for key, out in outputs.items():
        if out is None:
            continue
        o = _real(out)
        for what, shown, i in ins:
            if o == i:
                how = "is"
            elif o.is_relative_to(i):
                how = "lies inside"
            elif i.is_relative_to(o):
                how = "contains"
            else:
                continue
            raise PqfnError(f"{key} {out}: {how} the {what} {shown}; an output never lands on an input "
                            "(whatever --overwrite says): choose another path")


# An output folder a pqfn command wrote holds this marker (JSON: {"command": ...}); --overwrite replaces a
# folder only when its marker names the same command, so it never deletes a folder it did not write.
MARKER = ".pqfn-output"


def write_marker(folder: Path, command: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MARKER, json.dumps({"command": command}) + "\n")


def written_by(folder: Path, command: str) -> bool:
    """Whether `folder` holds the marker of `command` (an unreadable marker is not a match)."""
    try:
        return json.loads((folder / MARKER).read_text()).get("command") == command
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(key: str, path: Path, overwrite: bool, *, mine: bool, what: str) -> None:
    """An existing output: refused without --overwrite; with it, replaced only when `mine` (the same command
    wrote it, as `what` says how it is recognised)."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not overwrite:
        raise PqfnError(f"{key} {path}: already exists; pass --overwrite to replace it")
    if not mine:
        raise PqfnError(f"{key} {path}: already exists and was not written by this command (expected {what}); "
                        "--overwrite replaces only its own earlier output: move it away or choose another path")


@contextlib.contextmanager
def replacing_folder(out: Path, *, keep_if: str | None = None) -> Iterator[Path]:
    """Write a new result into `out` while its old content (if any) waits aside; the old one is deleted only
    once the new one is complete. On failure (an exception, Ctrl-C) the new partial folder is removed and the
    old one put back; with no old one, the partial folder is kept only when it holds the file `keep_if` (a
    trial's checkpoint, which --resume continues). So a failed run leaves nothing that blocks its rerun."""
    old: Path | None = None
    if out.exists() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.replace(old)
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if old is not None:
            shutil.rmtree(out, ignore_errors=True)
            old.replace(out)
        elif keep_if is None or not (out / keep_if).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def swap_in_folder(staged: Path, out: Path) -> None:
    """Move a completed folder `staged` to `out`, replacing what is there only after the new one exists."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.replace(old)
    staged.replace(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- model files
def read_safetensors(path: Path, what: str, error: type[PqfnError] = PqfnError, hint: str = "") -> dict[str, Any]:
    """A safetensors file -> {name: tensor}. Missing, truncated, a torch pickle under this name, ... -> one line."""
    from safetensors.torch import load_file

    then = f"; {hint}" if hint else ""
    if path.is_dir():
        raise error(f"{path}: is a folder; expected {what} (a safetensors file){then}")
    if not path.is_file():
        raise error(f"{path}: no such file; expected {what}{then}")
    try:
        return load_file(str(path))
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        with path.open("rb") as f:
            head = f.read(2)
        if head == b"PK" or head[:1] == b"\x80":  # torch.save's zip, or a bare pickle
            raise error(f"{path}: is a torch.save (pickle) file, not safetensors; expected {what}{then}") from None
        raise error(f"{path}: damaged or not a safetensors file ({type(e).__name__}: {_first_line(e)}); "
                    f"expected {what}{then}") from None


def read_npz(path: Path, keys: tuple[str, ...], what: str, error: type[PqfnError] = PqfnError,
             hint: str = "") -> dict[str, Any]:
    """A numpy .npz holding `keys` -> {key: array}; missing, truncated or foreign files -> one line."""
    import numpy as np

    then = f"; {hint}" if hint else ""
    if not path.is_file():
        raise error(f"{path}: {'is a folder' if path.is_dir() else 'no such file'}; expected {what}{then}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise error(f"{path}: lacks {missing}; expected {what}{then}")
            return {k: z[k] for k in keys}
    except PqfnError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile, pickle and format errors all mean a damaged file
        raise error(f"{path}: damaged or not a .npz file ({type(e).__name__}); expected {what}{then}") from None
