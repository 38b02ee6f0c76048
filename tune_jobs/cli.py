"""The installed `pqfn` command: pqfn.cli's commands plus the ones that need Ray (sweep, submit, cluster)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pqfn import cli as pqfn_cli
from pqfn.errors import PqfnError

# The Ray modules are imported by the commands that need them: `pqfn synth`, `pqfn predict` and the other
# pqfn.cli commands start without Ray, torch and timm (about 6 s of imports on a 2-core machine).


def cmd_sweep(a: argparse.Namespace) -> int:
    from tune_jobs.sweep import main as sweep_main

    argv = [a.config, *a.overrides]
    if a.address:
        argv += ["--address", a.address]
    if a.resume:
        argv.append("--resume")
    if a.overwrite:
        argv.append("--overwrite")
    return sweep_main(argv)


def cmd_submit(a: argparse.Namespace) -> int:
    from tune_jobs.submit import submit

    return submit(Path(a.config), a.overrides, a.address, follow=a.follow, python=a.python)


def cmd_cluster(a: argparse.Namespace) -> int:
    from tune_jobs import cluster

    folder = Path(a.dir)
    if a.action == "up":
        st = cluster.up(folder, workers=a.workers, cpus_per_node=a.cpus_per_node, gpus_per_node=a.gpus_per_node,
                        port=a.port, dashboard_port=a.dashboard_port)
        print(f"local Ray cluster up: {st['nodes']} nodes, GCS {st['gcs_address']}, dashboard {st['dashboard']}")
        print(f"token: {st['token_path']} (load it into your shell with: eval \"$(pqfn cluster env --dir {a.dir})\")")
        print(f"submit: pqfn submit configs/quickstart.yaml --address {st['dashboard']} --follow")
        print(f"stop:   pqfn cluster down --dir {a.dir}")
    elif a.action == "down":
        pids = cluster.down(folder)
        print(f"stopped the local cluster's process groups {pids}")
    else:
        state = cluster.read_state(folder.resolve())
        if state is None:
            raise PqfnError(f"{folder}: no local cluster state; run `pqfn cluster up --dir {a.dir}` first")
        for k, v in cluster.auth_env(Path(state["token_path"])).items():
            print(f"export {k}={v}")
        print(f"export RAY_ADDRESS={state['dashboard']}")
    return 0


def add_ray_commands(sub: Any) -> None:
    t = sub.add_parser("sweep", help="run a sweep on Ray Tune (embedded local Ray by default)")
    t.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trial.epochs=3")
    t.add_argument("--overwrite", action="store_true", help="replace an existing results folder")
    t.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    t.add_argument("--address", help="a running Ray cluster (default: start a private local one)")
    t.set_defaults(func=cmd_sweep)

    sb = sub.add_parser("submit", help="submit a sweep to a running Ray cluster as a Ray Job")
    sb.add_argument("config")
    sb.add_argument("overrides", nargs="*")
    sb.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    sb.add_argument("--follow", action="store_true", help="stream the logs; exit 0 only if the job SUCCEEDED")
    sb.add_argument("--python", default=None,
                    help="the cluster's Python interpreter for the entrypoint (default: this one for a local "
                         "cluster started by `pqfn cluster up`, else `python`)")
    sb.set_defaults(func=cmd_submit)

    cl = sub.add_parser("cluster", help="a local multi-node Ray cluster on this machine (up, down, env)")
    cl.add_argument("action", choices=["up", "down", "env"])
    cl.add_argument("--dir", default=".pqfn-cluster", help="state, token and logs (default .pqfn-cluster)")
    cl.add_argument("--workers", type=int, default=1)
    cl.add_argument("--cpus-per-node", type=int, default=1)
    cl.add_argument("--gpus-per-node", type=int, default=0,
                    help="GPUs per node, each node its own (disjoint CUDA_VISIBLE_DEVICES slices of this machine's GPUs)")
    cl.add_argument("--port", type=int, default=6390, help="GCS port of the head")
    cl.add_argument("--dashboard-port", type=int, default=8265)
    cl.set_defaults(func=cmd_cluster)


def main(argv: list[str] | None = None) -> int:
    return pqfn_cli.main(argv, extend=add_ray_commands)


if __name__ == "__main__":
    sys.exit(main())
