"""Read W&B offline run files (.wandb): LevelDB-log framing of protobuf Record messages.

wandb 0.31 writes them from its Go core and no longer ships a Python reader; the message
classes (wandb.proto.wandb_internal_pb2) are still shipped, so the framing is read here.

Why pqfn reads them: wandb-core buffers a run's records and writes them to the file every
x_transaction_log_flush_interval (15 s) or at finish, so a SIGKILLed trial loses its last
records. What the file holds is the only truth about which epochs an offline run has; a
restarted trial re-logs the rest from its checkpoint (wandb_log.TrialRun).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7  # ':W&B' + magic (2 bytes) + version (1 byte); each record: crc32, length, type


def records(path: Path) -> list[Any]:
    """Every complete record of the file; a tail cut by a killed writer is ignored."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    out, buf, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):
            break  # cut short: the writer was killed mid-record
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(payload)
        elif kind == 2:
            buf = payload
        elif kind == 3:
            buf += payload
        elif kind == 4:
            out.append(buf + payload)
    msgs = []
    for raw in out:
        m = pb.Record()  # type: ignore[attr-defined]  # generated protobuf module, no stubs
        try:
            m.ParseFromString(raw)
        except DecodeError:
            break
        msgs.append(m)
    return msgs


def written(path: Path) -> bool:
    """Whether the run file is complete: it holds the run's exit record. run.finish() only *tells* wandb-core
    the run is over (a message it does not wait on); the core writes its buffer and the exit record a moment
    later, so a reader right after finish() may find an empty file."""
    try:
        return any(m.WhichOneof("record_type") == "exit" for m in records(path))
    except (OSError, ValueError):
        return False


@dataclass
class ArtifactUse:
    """An Artifact record of a run: logged as its output, or (used) taken as its input."""

    name: str
    type: str
    digest: str
    used: bool  # use_artifact (online) or a draft logged use-after-commit (what pqfn writes offline)
    metadata: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # paths inside the Artifact
    local_paths: list[str] = field(default_factory=list)  # where `wandb sync` reads them from


@dataclass
class OfflineRun:
    dir: Path
    id: str = ""
    group: str = ""
    job_type: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[ArtifactUse] = field(default_factory=list)


def _items(items: Any) -> dict[str, Any]:
    """Protobuf items -> dict; a multi-part nested_key (['trials', 'nrows']) becomes nested dicts."""
    out: dict[str, Any] = {}
    for i in items:
        keys = [i.key] if i.key else list(i.nested_key)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = json.loads(i.value_json)
    return out


def read_run(path: Path) -> OfflineRun:
    run = OfflineRun(path.parent)
    for m in records(path):
        kind = m.WhichOneof("record_type")
        if kind == "run":
            run.id, run.group, run.job_type, run.name = m.run.run_id, m.run.run_group, m.run.job_type, m.run.display_name
            for item in m.run.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in m.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append(_items(m.history.item))
        elif kind == "summary":
            run.summary.update(_items(m.summary.update))
        elif kind == "artifact":
            a = m.artifact
            run.artifacts.append(ArtifactUse(
                a.name, a.type, a.digest, a.use_after_commit, json.loads(a.metadata) if a.metadata else {},
                [e.path for e in a.manifest.contents], [e.local_path for e in a.manifest.contents]))
        elif kind == "use_artifact":
            run.artifacts.append(ArtifactUse(m.use_artifact.name, m.use_artifact.type, "", True))
    return run


def offline_runs(sweep_dir: Path) -> list[OfflineRun]:
    """Every offline run folder (a resumed run writes one more folder with the same id), oldest first."""
    return [read_run(p) for p in sorted((sweep_dir / "wandb").glob("offline-run-*/run-*.wandb"))]


def epoch_steps(runs: list[OfflineRun]) -> dict[str, list[int]]:
    """Per run id, the steps of its per-epoch records across all its folders, in the order logged (a folder
    whose writer was killed before its first write holds no run: it is left out)."""
    out: dict[str, list[int]] = {}
    for r in runs:
        if not r.id:
            continue
        out.setdefault(r.id, []).extend(int(h["_step"]) for h in r.history if "gap/acc" in h)
    return out


def logged_steps(wandb_dir: Path, run_id: str, exclude: Path | None = None) -> set[int]:
    """The per-epoch steps that the offline folders of run_id under wandb_dir hold (exclude: the folder of the
    run being written now). Unreadable files count as holding nothing: an epoch is then logged again."""
    steps: set[int] = set()
    for f in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        if exclude is not None and f.parent.resolve() == exclude.resolve():
            continue
        try:
            steps.update(int(h["_step"]) for h in read_run(f).history if "_step" in h)
        except (OSError, ValueError):
            continue
    return steps
