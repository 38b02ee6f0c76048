"""`pqfn submit CONFIG --address http://HOST:8265`: the sweep as a Ray Job on a running cluster.

The project folder is the job's working_dir; the entrypoint is `tune_jobs.sweep` (the same code
path as `pqfn sweep`), run by an explicit interpreter. W&B settings and key travel in the job's
runtime_env env_vars, taken from the submitter's environment, never from files. Every path key
of the config (pqfn.config.PATH_KEYS) is made absolute on the submitting machine, so results land
where every node (on one machine: the machine) can reach them, not in the job's temporary copy of
the code. Transient answers of a cluster that is still starting (connection refused, "No available
agent to submit job, please try again later") are retried with backoff for a bounded time.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pqfn.config import PATH_KEYS, absolutize_paths, get_dotted, load_config
from pqfn.errors import PqfnError

T = TypeVar("T")
RETRY_S = 60.0  # how long a cluster that is still starting gets before `pqfn submit` gives up
_sleep, _clock = time.sleep, time.monotonic  # looked up at call time, so tests can run the backoff instantly

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
    resolved = absolutize_paths(cfg)  # the same helper as the sweep driver's: one list of path keys
    absolute = [f"{k}={get_dotted(resolved, k)}" for k in PATH_KEYS if get_dotted(resolved, k) is not None]
    entry = [python, "-m", "tune_jobs.sweep", str(rel), *overrides, *absolute, "--address", "auto"]
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {
        "name": cfg.name,
        "entrypoint": shlex.join(entry),
        "runtime_env": {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env_vars},
        "results": str(resolved.output_dir / cfg.name),
    }


def default_python(address: str) -> str:
    """The interpreter of a local cluster started by `pqfn cluster up` at this address, else `python`."""
    from tune_jobs.cluster import read_state

    for folder in (Path(".pqfn-cluster"), *Path(".").glob("*/")):
        try:
            st = read_state(folder.resolve()) if folder.is_dir() else None
        except PqfnError as e:  # another folder's damaged cluster.json must not stop this submission
            warnings.warn(f"ignoring it: {e}", stacklevel=2)
            continue
        if st and st["dashboard"].rstrip("/") == address.rstrip("/"):
            return str(st["python"])
    return "python"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def is_transient(e: BaseException) -> bool:
    """An answer of a Ray cluster that is still starting, worth asking again (seen right after `cluster up`)."""
    import requests

    if isinstance(e, ConnectionError | requests.ConnectionError | requests.Timeout):
        return True  # Ray turns a refused connection into the builtin ConnectionError; requests' own is an OSError
    if isinstance(e, requests.HTTPError) and e.response is not None and e.response.status_code in (500, 502, 503, 504):
        return True  # the dashboard's version check while its modules load
    text = str(e)
    return ("No available agent" in text or "try again later" in text
            or re.search(r"status code (502|503|504)\b", text) is not None)


def with_retries(call: Callable[[], T], what: str, address: str, *, budget_s: float = RETRY_S,
                 log: Callable[[str], None] = print, sleep: Callable[[float], None] | None = None,
                 clock: Callable[[], float] | None = None) -> T:
    """call(), again with backoff (0.5 s doubling to 5 s) while it fails transiently, for at most budget_s."""
    sleep, clock = sleep or _sleep, clock or _clock
    deadline = clock() + budget_s
    delay = 0.5
    while True:
        try:
            return call()
        except Exception as e:
            if not is_transient(e):
                raise
            left = deadline - clock()
            if left <= 0:
                raise PqfnError(f"--address {address}: {what} still failed after {budget_s:.0f} s of retries "
                                f"({type(e).__name__}: {_first_line(e)}); check that the cluster is up (`ray status`, "
                                "its dashboard) and submit again") from None
            if delay == 0.5:
                log(f"{what}: the cluster is not ready yet ({_first_line(e)}); retrying for up to {budget_s:.0f} s")
            sleep(min(delay, left))
            delay = min(2 * delay, 5.0)


def submit(config: Path, overrides: list[str], address: str, *, follow: bool, python: str | None,
           log: Any = print, retry_s: float = RETRY_S) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    job = build_job(config, overrides, python or default_python(address))
    try:
        client = with_retries(lambda: JobSubmissionClient(address), "connecting to the Ray dashboard", address,
                              budget_s=retry_s, log=log)
    except PqfnError:
        raise
    except Exception as e:  # noqa: BLE001 - connection and auth problems, one line
        raise PqfnError(f"--address {address}: cannot reach the Ray dashboard ({type(e).__name__}: "
                        f"{_first_line(e)}); for token auth set "
                        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (see `pqfn cluster env`)") from None
    # One id for every attempt: a retried request can never start the sweep twice.
    submission_id = f"pqfn-{job['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    tried = False

    def _submit() -> str:
        nonlocal tried
        try:
            return str(client.submit_job(entrypoint=job["entrypoint"], runtime_env=job["runtime_env"],
                                         submission_id=submission_id))
        except Exception as e:
            if tried and "already exists" in str(e):  # an earlier attempt did reach the cluster
                return submission_id
            raise
        finally:
            tried = True

    try:
        job_id = with_retries(_submit, "submitting the job", address, budget_s=retry_s, log=log)
    except PqfnError:
        raise
    except Exception as e:  # noqa: BLE001 - the cluster's refusal (package upload, auth, runtime_env), one line
        raise PqfnError(f"--address {address}: the cluster did not accept the job ({type(e).__name__}: "
                        f"{_first_line(e)})") from None
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
