"""``mot launch``: the ``mot train`` loop on a Ray cluster (DDP or FSDP2 workers)."""

from __future__ import annotations

import argparse
from mot_core import filesystems
from mot_core.cli.common import non_negative_float, positive_int


def cmd_launch(ns: argparse.Namespace) -> int:
    from mot_core.distributed.launch import launch

    config, _ = launch(ns.config, ns.overrides, ns.num_workers, ns.gpus_per_worker, ns.address)
    run_dir = config.run.dir
    print(f"done: metrics in {filesystems.join(run_dir, 'metrics.jsonl')}, the final checkpoint in "
          f"{filesystems.join(run_dir, 'checkpoints')}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "launch", help="train a run on a Ray cluster: data-parallel workers (DDP or FSDP2), checkpoints in shared storage",
        description="Runs the same training loop as `mot train` in N Ray Train workers. The global batch "
        "(train.batch_size) is the same for any N. Without --address a local Ray cluster is started.",
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. launch.strategy=ddp train.steps=100")
    p.add_argument("--num-workers", type=positive_int, default=None, help="workers (default: launch.num_workers)")
    p.add_argument("--gpus-per-worker", type=non_negative_float, default=None,
                   help="GPUs per worker; 0 trains on CPUs with gloo (default: launch.gpus_per_worker)")
    p.add_argument("--address", default=None, help="join a running Ray cluster, e.g. 10.0.0.1:6379 or auto")
    p.set_defaults(func=cmd_launch)
