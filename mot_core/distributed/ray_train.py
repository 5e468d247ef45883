"""One Ray Train worker of ``mot launch``: ``start_run`` with a data-parallel runtime whose
checkpoints go to Ray Train's storage (the sharded layout of
``mot_core.training.sharded_checkpoints``, one folder per checkpoint, filled by every worker)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from mot_core import filesystems
from mot_core.config import RunConfig
from mot_core.devices.device import uses_bf16
from mot_core.errors import MotError
from mot_core.experiment.resolve import resolve_config
from mot_core.runs.start import start_run
from mot_core.experiment.nodes import check_marker, check_named_paths, sees, unpack_state
from mot_core.training import run_files, storage
from mot_core.training.parallelism import DataParallel
from mot_core.training.runtime import PREPARED, Reporter, Runtime
from mot_core.training.sharded_checkpoints import ShardedStore, write_sharded


class RayTrainCheckpoints(ShardedStore):
    """Checkpoints in Ray Train's storage: ``<storage_path>/<name>/checkpoint_*``, a shared
    folder or an object-store URI. Each is written by every worker into a folder of its own
    that Ray uploads with ``ray.train.report``, which also carries the step's metrics. The
    workers export nothing at the end (``finish``): the driver does, after they finish
    (``export``), into its own run folder, reading the last checkpoint from storage."""

    def __init__(self, storage_path: str, name: str, run_dir: Path, carries_run_files: bool = False):
        super().__init__(run_dir, carries_run_files)
        self.storage_path, self.name = storage_path, name

    def intact(self) -> list[tuple[int, str]]:
        return storage.intact_checkpoints(self.storage_path, self.name)

    def handle(self, where: str):
        """A checkpoint's URI (from ``intact``) as Ray's checkpoint, on the file system resolved
        here: the URI's own endpoint (its query, storage.endpoint, AWS_ENDPOINT_URL), not the one
        Ray would guess from the URI."""
        import ray.train

        filesystem, path = storage.resolved(where)
        checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
        checkpoint.uri = where  # how messages name it (Ray's path drops the scheme)
        return checkpoint

    def latest(self, report=print):
        """The newest intact checkpoint in storage. Not ``ray.train.get_checkpoint()``: Ray
        registers a reported checkpoint when its controller next polls the workers, so a worker
        killed in between leaves a complete checkpoint that Ray would not hand back."""
        found = self.intact()
        self.refuse_newer_local_checkpoints(found, "`mot launch`")
        return self.handle(found[-1][1]) if found else None

    def name_of(self, handle) -> str:
        """The checkpoint's URI (``s3://bucket/...``, or a folder), not Ray's repr of it."""
        return getattr(handle, "uri", None) or str(handle)

    def saved_config(self, handle) -> str:
        """The one file, read where the checkpoint is (no download of the checkpoint)."""
        try:
            with handle.filesystem.open_input_stream(f"{handle.path}/config.yaml") as stream:
                return stream.read().decode()
        except (OSError, ValueError) as exc:
            raise MotError(f"cannot read the config of {handle.path}: {str(exc).splitlines()[0]}") from None

    def save(self, step, model, optimizer, state, config_yaml, args, keep, record, parallel) -> str:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="mot-ckpt-") as folder:
            if self.carries_run_files and parallel.is_main:
                run_files.pack(self.run_dir, Path(folder))
            write_sharded(Path(folder), step, model, optimizer, state, config_yaml, args, parallel, shared=False)
            ray.train.report(_metrics(record), checkpoint=ray.train.Checkpoint.from_directory(folder))
        return f"checkpoint of step {step} (reported to Ray Train)"


class RayTrainReports(Reporter):
    """Logged steps to Ray Train (its dashboard, the driver's result). A checkpointed step was
    reported with its checkpoint already: ``ray.train.report`` is a barrier that every worker
    calls the same number of times."""

    def report(self, record: dict) -> None:
        import ray.train

        ray.train.report(_metrics(record))


def train_worker(loop_config: dict) -> None:
    """``train_loop_per_worker`` of the TorchTrainer. ``loop_config`` (``launch.worker_loop_config``):
    ``config`` (the driver's resolved config, as a dict), ``saved`` (the saved config of the
    checkpoint the run resumes from, or None), ``storage_path`` and ``name`` (where the run's
    checkpoints are), ``cwd``, and what a node holding none of the driver's files needs
    (``experiment.nodes``): ``paths``, ``data_marker``, ``run_marker``, ``state``, ``vocabulary``."""
    import ray.train
    import ray.train.torch

    # Relative paths in plugin options (data folders, tokenizer folders) mean what they meant
    # where `mot launch` was started, where that folder exists (a shared file system)
    if os.path.isdir(loop_config["cwd"]):
        os.chdir(loop_config["cwd"])
    check_named_paths(loop_config["paths"])
    check_marker(loop_config["data_marker"], "data.dir")
    config = worker_config(loop_config)
    own_folder = None
    if not sees(loop_config["run_marker"]):  # the driver's run folder is not on this node
        own_folder = Path(tempfile.mkdtemp(prefix="mot-run-"))
        unpack_state(loop_config["state"], own_folder)
    # the driver's folder (its working copy of a run.dir on an object store), where this node has it
    driver_folder = Path(loop_config["run_marker"]).parent
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if config.launch.gpus_per_worker > 0 else torch.device("cpu")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    runtime = worker_runtime(config, device, context.get_world_rank(), context.get_world_size(),
                             loop_config["storage_path"], loop_config["name"], own_folder, driver_folder)
    runtime.driver_vocabulary = loop_config["vocabulary"]
    start_run(config, runtime)


def worker_config(loop_config: dict) -> RunConfig:
    """The config a worker runs: the driver's, through the front door again (with the resumed
    checkpoint's saved config, so nothing the driver read is read twice)."""
    return resolve_config(loop_config["config"], saved=loop_config["saved"])


def worker_runtime(config: RunConfig, device: torch.device, rank: int, world: int, storage_path: str,
                   name: str, own_folder: Path | None = None, driver_folder: Path | None = None) -> Runtime:
    """A launch worker's runtime: data-parallel, checkpoints in Ray Train's storage, metrics to
    Ray Train; the driver prepared the data. ``own_folder``: this node's folder for the run's
    files, where it does not see ``run.dir`` (rank 0's metrics then travel in the checkpoints)."""
    parallel = DataParallel(rank, world, config.launch.strategy, device, uses_bf16(device, config.train.precision),
                            config.launch.reshard_after_forward)
    run_dir = own_folder or driver_folder or filesystems.local_folder(config.run.dir)
    store = RayTrainCheckpoints(storage_path, name, run_dir, carries_run_files=own_folder is not None)
    return Runtime(device, store, parallel, RayTrainReports(), data=PREPARED, run_dir=run_dir)


def _metrics(record: dict) -> dict:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
