"""`pqfn submit CONFIG --address http://HOST:8265`: the sweep as a Ray Job on a running cluster.

The project folder is the job's working_dir; the entrypoint is `tune_jobs.sweep` (the same code
path as `pqfn sweep`), run by an explicit interpreter. W&B settings and key travel in the job's
runtime_env env_vars, taken from the submitter's environment, never from files. Relative
output/data paths are made absolute on the submitting machine, so results land where every
node (on one machine: the machine) can reach them, not in the job's temporary copy of the code.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pqfn.config import load_config
from pqfn.errors import PqfnError

ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".git", ".venv", "runs", "data", "wandb", "*.egg-info", "__pycache__", ".pytest_cache",
            ".mypy_cache", ".ruff_cache", ".pqfn-cluster"]
FORWARDED_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_BASE_URL")


def build_job(config: Path, overrides: list[str], python: str) -> dict[str, Any]:
    cfg = load_config(config, overrides)  # validate here: a bad config never reaches the cluster
    try:  # inside the project it travels with the working_dir; outside, the cluster must see the same path
        rel = config.resolve().relative_to(ROOT)
    except ValueError:
        rel = config.resolve()
    paths = {"output_dir": cfg.output_dir, "data.path": cfg.data.path}
    if cfg.data.cache_dir is not None:
        paths["data.cache_dir"] = cfg.data.cache_dir
    absolute = [f"{k}={Path(v).resolve()}" for k, v in paths.items()]
    entry = [python, "-m", "tune_jobs.sweep", str(rel), *overrides, *absolute, "--address", "auto"]
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {
        "name": cfg.name,
        "entrypoint": shlex.join(entry),
        "runtime_env": {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env_vars},
        "results": str((cfg.output_dir / cfg.name).resolve()),
    }


def default_python(address: str) -> str:
    """The interpreter of a local cluster started by `pqfn cluster up` at this address, else `python`."""
    from tune_jobs.cluster import read_state

    for folder in (Path(".pqfn-cluster"), *Path(".").glob("*/")):
        st = read_state(folder.resolve()) if folder.is_dir() else None
        if st and st["dashboard"].rstrip("/") == address.rstrip("/"):
            return str(st["python"])
    return "python"


def submit(config: Path, overrides: list[str], address: str, *, follow: bool, python: str | None,
           log: Any = print) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    job = build_job(config, overrides, python or default_python(address))
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection and auth problems, one line
        raise PqfnError(f"--address {address}: cannot reach the Ray dashboard ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); for token auth set "
                        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (see `pqfn cluster env`)") from None
    job_id = client.submit_job(
        entrypoint=job["entrypoint"], runtime_env=job["runtime_env"],
        submission_id=f"pqfn-{job['name']}-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    log(f"submitted job {job_id} to {address}")
    log(f"dashboard: {address.rstrip('/')}/#/jobs/{job_id}")
    log(f"results: {job['results']}")
    if not follow:
        log(f"follow it with: ray job logs --follow --address {address} {job_id}")
        return 0

    async def _tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(_tail())
    status = client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    log(f"job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1
