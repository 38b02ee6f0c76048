"""`pqfn submit` without a cluster: transient Ray Jobs answers are retried for a bounded time, every
path key of the config travels absolute. The Ray Jobs client is replaced by a scripted fake (the
real one is exercised end to end in tests/cluster/test_local_cluster.py)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

import tune_jobs.submit as submit_mod
from pqfn.config import PATH_KEYS
from pqfn.errors import PqfnError
from tune_jobs.cli import main

NO_AGENT = "Request failed with status code 500: No available agent to submit job, please try again later.."


class FakeClock:
    """time.monotonic and time.sleep for with_retries: sleeping advances the clock, instantly."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class ScriptedClient:
    """JobSubmissionClient that refuses the connection `refuse` times, then answers `answers` in turn."""

    refuse = 0
    answers: list[BaseException | str] = []
    calls: list[dict[str, Any]] = []

    def __init__(self, address: str) -> None:
        if ScriptedClient.refuse:
            ScriptedClient.refuse -= 1
            raise ConnectionError(f"Failed to connect to Ray at address: {address}.")

    def submit_job(self, **kw: Any) -> str:
        ScriptedClient.calls.append(kw)
        answer = ScriptedClient.answers.pop(0) if ScriptedClient.answers else kw["submission_id"]
        if isinstance(answer, BaseException):
            raise answer
        return answer


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    import ray.job_submission

    clock = FakeClock()
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", ScriptedClient)
    monkeypatch.setattr(submit_mod, "_sleep", clock.sleep)
    monkeypatch.setattr(submit_mod, "_clock", clock.monotonic)
    ScriptedClient.refuse, ScriptedClient.answers, ScriptedClient.calls = 0, [], []
    return clock


def _config(tmp_path: Path) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text("name: s\noutput_dir: runs\ndata: {path: data/x, cache_dir: ~/cache, test_manifest: t.csv}\n"
                 "trial: {pretrained: w.safetensors}\n")
    return p


def test_submit_retries_refused_and_no_agent_then_succeeds(tmp_path: Path, fake: FakeClock,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    ScriptedClient.refuse = 1  # right after `pqfn cluster up`: the dashboard is not listening yet
    ScriptedClient.answers = [RuntimeError(NO_AGENT), RuntimeError(NO_AGENT)]
    assert main(["submit", str(_config(tmp_path)), "--address", "http://127.0.0.1:8265", "--python", "py"]) == 0
    out = capsys.readouterr().out
    assert "submitted job pqfn-s-" in out and "retrying for up to 60 s" in out
    assert len(ScriptedClient.calls) == 3 and len({c["submission_id"] for c in ScriptedClient.calls}) == 1
    assert fake.sleeps == [0.5, 0.5, 1.0]  # backoff restarts per step: connect once, then submit twice


def test_submit_gives_up_after_the_budget_with_one_line(tmp_path: Path, fake: FakeClock,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ScriptedClient.answers = [RuntimeError(NO_AGENT)] * 100
    assert main(["submit", str(_config(tmp_path)), "--address", "http://127.0.0.1:8265", "--python", "py"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "after 60 s" in err[0] and "No available agent" in err[0]
    assert 59 <= fake.now <= 61 and max(fake.sleeps) == 5.0


def test_permanent_errors_are_not_retried(tmp_path: Path, fake: FakeClock) -> None:
    ScriptedClient.answers = [RuntimeError("Request failed with status code 400: bad runtime_env.")]
    with pytest.raises(PqfnError, match="did not accept the job.*status code 400"):
        submit_mod.submit(_config(tmp_path), [], "http://127.0.0.1:8265", follow=False, python="py", log=lambda s: None)
    assert fake.sleeps == [] and len(ScriptedClient.calls) == 1


def test_a_retry_that_finds_its_own_job_counts_as_submitted(tmp_path: Path, fake: FakeClock) -> None:
    ScriptedClient.answers = [RuntimeError("Request failed with status code 503: upstream"),
                              RuntimeError("Job with submission_id pqfn-s-x already exists.")]
    assert submit_mod.submit(_config(tmp_path), [], "http://127.0.0.1:8265", follow=False, python="py",
                             log=lambda s: None) == 0
    assert len(ScriptedClient.calls) == 2


def test_every_path_key_travels_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job = submit_mod.build_job(_config(tmp_path), [], "py")
    args = dict(a.split("=", 1) for a in shlex.split(job["entrypoint"]) if "=" in a)
    assert set(PATH_KEYS) <= set(args)  # output_dir, data.path, data.cache_dir, data.test_manifest, trial.pretrained
    assert all(Path(args[k]).is_absolute() and "~" not in args[k] for k in PATH_KEYS)
    assert args["data.test_manifest"] == str(tmp_path.resolve() / "t.csv")
    assert job["results"] == str(tmp_path.resolve() / "runs" / "s")


def test_real_jobs_client_against_a_server_that_is_still_starting(fake: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real JobSubmissionClient's exceptions, from a local HTTP server: refused, 503, 500 'No available agent'."""
    import json
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import ray

    monkeypatch.undo()  # the real client this time; only the clock stays fake
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setattr(submit_mod, "_sleep", fake.sleep)
    monkeypatch.setattr(submit_mod, "_clock", fake.monotonic)
    script = {"GET": [503], "POST": [500, 500]}  # then 200

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str, ok: dict[str, str]) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            code = script[method].pop(0) if script[method] else 200
            body = json.dumps(ok).encode() if code == 200 else b"No available agent to submit job, please try again later."
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._answer("GET", {"ray_version": ray.__version__, "version": "x", "ray_commit": "x"})

        def do_POST(self) -> None:  # noqa: N802
            self._answer("POST", {"job_id": "j", "submission_id": "pqfn-t"})

        def log_message(self, *a: Any) -> None:
            pass

    with socket.socket() as s:  # a port nobody listens on yet: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"http://127.0.0.1:{port}"
    with pytest.raises(PqfnError, match="connecting.*still failed after 1 s"):
        submit_mod.with_retries(lambda: JobSubmissionClient(address), "connecting", address, budget_s=1, log=lambda s: None)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = submit_mod.with_retries(lambda: JobSubmissionClient(address), "connecting", address, log=lambda s: None)
        job = submit_mod.with_retries(lambda: client.submit_job(entrypoint="true", submission_id="pqfn-t"),
                                      "submitting", address, log=lambda s: None)
    finally:
        server.shutdown()
        server.server_close()
    assert job == "pqfn-t" and script == {"GET": [], "POST": []}
