"""``make cluster-demo`` (``python -m tools.cluster.demo``): the cluster chain on this machine,
end to end, then everything torn down.

  1. an S3 server (SeaweedFS on loopback, ``tests/s3_server.py``) with a bucket ``mot-demo``;
  2. a Ray head and two worker nodes that share no file system with this one
     (``tests/cluster.py``; each worker node in its own mount namespace; needs root);
  3. ``mot data tokenize --address``: tokenize actors on both nodes write the shards to the bucket;
  4. ``mot launch --address``: 2 DDP workers, the run folder, shards and checkpoints in the bucket;
  5. ``mot eval``, ``mot generate`` and ``mot export`` of the ``s3://`` run, from this machine;
  6. ``mot sweep --address``: two trials, one per node, their folders and Ray Tune's in the bucket.

The config is ``examples/configs/text_mot.yaml`` (the Wikipedia articles shipped with gensim),
shortened to a few steps (``--steps``). Every command is printed before it runs; the first that
fails stops the chain with its exit code, and the server and the nodes are stopped either way.
The export and this machine's working copies of the runs stay in ``--out``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from cluster import ClusterError, local_cluster  # noqa: E402
from s3_server import s3_server  # noqa: E402

CONFIG = ROOT / "examples" / "configs" / "text_mot.yaml"
BUCKET = "mot-demo"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.cluster.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps of the launch (default 20)")
    parser.add_argument("--out", default="runs/cluster_demo", help="the export and the runs' working copies")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mot-demo-s3-") as store, s3_server(Path(store), buckets=(BUCKET,)) as server:
        print(f"S3 server (SeaweedFS) at {server.endpoint}, bucket {BUCKET}", flush=True)
        try:
            with local_cluster(workers=2, cpus_per_worker=1, extra_env=server.env()) as cluster:
                print(f"Ray cluster at {cluster.address}: a head (0 CPUs) and 2 worker nodes that see none of this "
                      "machine's files", flush=True)
                env = {**os.environ, **server.env(), **cluster.env, "RAY_DEDUP_LOGS": "0",
                       "MOT_RUN_CACHE": str(out / "working_copies")}
                return run_chain(cluster.address, env, out, args.steps, started)
        except ClusterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2


def run_chain(address: str, env: dict, out: Path, steps: int, started: float) -> int:
    run = f"s3://{BUCKET}/runs/text_mot"
    every = max(1, steps // 2)
    short = [f"run.dir={run}", f"train.steps={steps}", f"train.checkpoint_every={every}",
             f"train.eval_every={every}", "train.eval_batches=2", "train.progress=false"]
    commands = [
        ["data", "tokenize", str(CONFIG), *short, "--address", address],
        ["launch", str(CONFIG), *short, "--address", address, "--num-workers", "2", "launch.strategy=ddp"],
        ["eval", run, "--batches", "2"],
        ["generate", run, "--modality", "text", "--prompt", "The history of", "--max-tokens", "24", "--samples", "1",
         "--temperature", "0.8"],
        ["export", run, "--format", "hf", "--modality", "text", "--out", str(out / f"hf_{int(time.time())}")],
        ["sweep", str(CONFIG), *short[1:], f"train.steps={every}", f"data.dir={run}/tokens",  # the launch's shards
         "--grid", "train.lr=0.001,0.003",
         "--out", f"s3://{BUCKET}/sweeps/text_lr", "--address", address],
    ]
    for command in commands:
        print(f"\n$ mot {shlex.join(command)}", flush=True)
        result = subprocess.run([sys.executable, "-m", "mot_core.cli", *command], env=env, cwd=ROOT)
        if result.returncode != 0:
            print(f"\ncluster demo: `mot {command[0]}` failed (exit {result.returncode}); stopping the nodes and the "
                  "S3 server", file=sys.stderr)
            return result.returncode
    print(f"\ncluster demo: the chain ran in {time.monotonic() - started:.0f} s; the run is {run} and the sweep "
          f"s3://{BUCKET}/sweeps/text_lr (gone with the server); the export and the working copies are in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
