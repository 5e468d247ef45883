"""``python -m tools.cluster up|down|status``: the test suite's local multi-node Ray cluster
(``tests/cluster.py``) by hand, to try ``mot launch --address`` on worker nodes that share no
file system with this one.

    python -m tools.cluster up [--workers 2] [--cpus-per-worker 1] [--env KEY=VALUE ...]
    mot launch CONFIG --address 127.0.0.1:PORT       # the address `up` printed
    python -m tools.cluster down

``up`` starts the head (0 CPUs) and the worker nodes, waits until they joined, writes the
cluster's state (``--state``, default ``runs/cluster.json``) and exits: the nodes keep running
until ``down`` kills them (by the PIDs in the state file, never by name). Needs root.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from cluster import ClusterError, start_cluster, stop_detached  # noqa: E402

DEFAULT_STATE = "runs/cluster.json"


def up(args) -> int:
    state = Path(args.state)
    if state.exists():
        print(f"{state} exists: a cluster is up (python -m tools.cluster down first)", file=sys.stderr)
        return 1
    env = dict(item.split("=", 1) for item in args.env)
    try:
        cluster = start_cluster(args.workers, args.cpus_per_worker, env, args.head_cpus, hide=args.hide,
                                die_with_parent=False)
    except ClusterError as exc:
        print(exc, file=sys.stderr)
        return 1
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(cluster.state(), indent=1))
    workers = ", ".join(n.name for n in cluster.workers)
    print(f"Ray cluster up in {cluster.timings['up_s']:.1f} s: head ({args.head_cpus} CPUs) + {workers} at {cluster.address}")
    print(cluster.view.describe())
    print(f"join it: ray.init(address='{cluster.address}') or mot launch CONFIG --address {cluster.address}")
    print(f"(RAY_AUTH_MODE={cluster.env['RAY_AUTH_MODE']} on every node, and for a driver; "
          "stop it: python -m tools.cluster down)")
    return 0


def down(args) -> int:
    state = Path(args.state)
    if not state.exists():
        print(f"no {state}: no cluster up", file=sys.stderr)
        return 1
    killed = stop_detached(json.loads(state.read_text()))
    state.unlink()
    print(f"killed {', '.join(killed) or 'nothing (the nodes were gone)'}")
    return 0


def status(args) -> int:
    state = Path(args.state)
    if not state.exists():
        print(f"no {state}: no cluster up")
        return 1
    import ray

    data = json.loads(state.read_text())
    ray.init(address=data["address"], log_to_driver=False, logging_level="ERROR")
    try:
        for node in ray.nodes():
            names = [k for k in node["Resources"] if k == "head" or k.startswith("worker_")]
            print(f"{'alive' if node['Alive'] else 'dead '} {','.join(names):10} {node['NodeID']}")
    finally:
        ray.shutdown()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--head-cpus", type=int, default=0)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="for every node's Ray processes")
    parser.add_argument("--hide", action="append", default=[], metavar="DIR",
                        help="one more folder the worker nodes do not see")
    parser.add_argument("--state", default=DEFAULT_STATE)
    args = parser.parse_args(argv)
    return {"up": up, "down": down, "status": status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
