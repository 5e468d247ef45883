"""The files a run writes as it trains (``metrics.jsonl``, the trackers' folders and state),
carried in its checkpoints when rank 0 trains on a node that does not see the run folder.

On a cluster without a shared disk, rank 0 writes them into a folder of its own on its node.
Each checkpoint it saves holds a copy (``run_files.tar``, one file: a checkpoint's listing
counts files); a worker group that resumes puts them back into its own folder first (the
metrics then read as one run, the trackers resume), and the ``mot launch`` driver puts the final
checkpoint's copy into its run folder at the end. They are small: a line per logged step, and
the trackers' event files.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

ARCHIVE = "run_files.tar"
# what a run folder holds besides what it trains into: tokenizers, shards, checkpoints, the lock
NOT_CARRIED = {"state", "tokens", "checkpoints", "distributed_checkpoints", "ray", "train.lock", "config.yaml"}


def pack(run_dir: Path, checkpoint: Path) -> None:
    """Copy the run's files from ``run_dir`` into ``checkpoint/run_files.tar``."""
    entries = [e for e in sorted(run_dir.iterdir()) if e.name not in NOT_CARRIED and not e.name.startswith(".")] \
        if run_dir.is_dir() else []
    with tarfile.open(checkpoint / ARCHIVE, "w") as archive:
        for entry in entries:
            archive.add(entry, arcname=entry.name)


def restore(checkpoint: Path, run_dir: Path) -> bool:
    """Put a checkpoint's copy of the run's files into ``run_dir``; False when it holds none."""
    source = checkpoint / ARCHIVE
    if not source.is_file():
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(source) as archive:
        archive.extractall(run_dir, filter="data")  # no absolute paths, links out of the folder, devices
    return True
