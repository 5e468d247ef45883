"""One Ray Train worker of ``mot launch``: ``start_run`` with a data-parallel runtime whose
checkpoints go to Ray Train's storage (the sharded layout of
``mot_core.training.sharded_checkpoints``, one folder per checkpoint, filled by every worker)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from mot_core.config import RunConfig
from mot_core.devices.device import uses_bf16
from mot_core.errors import MotError
from mot_core.experiment.resolve import resolve_config
from mot_core.runs.start import start_run
from mot_core.training import storage
from mot_core.training.parallelism import DataParallel
from mot_core.training.runtime import PREPARED, Reporter, Runtime
from mot_core.training.sharded_checkpoints import ShardedStore, write_sharded


class RayTrainCheckpoints(ShardedStore):
    """Checkpoints in Ray Train's storage: ``<storage_path>/<name>/checkpoint_*``, a shared
    folder or an object-store URI. Each is written by every worker into a folder of its own
    that Ray uploads with ``ray.train.report``, which also carries the step's metrics."""

    def __init__(self, storage_path: str, name: str, run_dir: Path):
        super().__init__(run_dir)
        self.storage_path, self.name = storage_path, name

    def latest(self, report=print):
        """The newest intact checkpoint in storage. Not ``ray.train.get_checkpoint()``: Ray
        registers a reported checkpoint when its controller next polls the workers, so a worker
        killed in between leaves a complete checkpoint that Ray would not hand back."""
        import ray.train

        found = storage.intact_checkpoints(self.storage_path, self.name)
        self.refuse_newer_local_checkpoints(found, "`mot launch`")
        return ray.train.Checkpoint(found[-1][1]) if found else None

    def saved_config(self, handle) -> str:
        """The one file, read where the checkpoint is (no download of the checkpoint)."""
        try:
            with handle.filesystem.open_input_stream(f"{handle.path}/config.yaml") as stream:
                return stream.read().decode()
        except (OSError, ValueError) as exc:
            raise MotError(f"cannot read the config of {handle.path}: {str(exc).splitlines()[0]}") from None

    def save(self, step, model, optimizer, state, config_yaml, args, keep, record, parallel) -> str:
        import ray.train

        self.remember(step, model, optimizer, state, config_yaml, args)
        with tempfile.TemporaryDirectory(prefix="mot-ckpt-") as folder:
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
    """``train_loop_per_worker`` of the TorchTrainer. ``loop_config``: ``config`` (the driver's
    resolved config, as a dict), ``saved`` (the saved config of the checkpoint the run resumes
    from, or None), ``storage_path`` and ``name`` (where the run's checkpoints are), ``cwd``."""
    import ray.train
    import ray.train.torch

    # Relative paths in plugin options (data folders, tokenizer folders) mean what they meant
    # where `mot launch` was started: the same folder on every node of a shared file system.
    if not os.path.isdir(loop_config["cwd"]):
        raise MotError(f"the folder `mot launch` was started from, {loop_config['cwd']}, does not exist on this "
                       "worker's node; give absolute paths on a file system every node mounts")
    os.chdir(loop_config["cwd"])
    config = worker_config(loop_config)
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if config.launch.gpus_per_worker > 0 else torch.device("cpu")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    start_run(config, worker_runtime(config, device, context.get_world_rank(), context.get_world_size(),
                                     loop_config["storage_path"], loop_config["name"]))


def worker_config(loop_config: dict) -> RunConfig:
    """The config a worker runs: the driver's, through the front door again (with the resumed
    checkpoint's saved config, so nothing the driver read is read twice)."""
    return resolve_config(loop_config["config"], saved=loop_config["saved"])


def worker_runtime(config: RunConfig, device: torch.device, rank: int, world: int, storage_path: str,
                   name: str) -> Runtime:
    """A launch worker's runtime: data-parallel, checkpoints in Ray Train's storage, metrics to
    Ray Train; the driver prepared the data."""
    parallel = DataParallel(rank, world, config.launch.strategy, device, uses_bf16(device, config.train.precision),
                            config.launch.reshard_after_forward)
    return Runtime(device, RayTrainCheckpoints(storage_path, name, Path(config.run.dir)), parallel, RayTrainReports(),
                   data=PREPARED)


def _metrics(record: dict) -> dict:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
