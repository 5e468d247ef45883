"""``mot launch``: the driver. Checks everything it can before a worker starts, prepares the
data once (tokenizers are fitted and every source tokenized into shards here, not raced by
workers), then runs a Ray Train ``TorchTrainer`` whose workers run ``ray_train.train_worker``.

Global batch: ``train.batch_size`` rows whatever the worker count; each worker builds and
trains on its ``batch_size / N`` rows of every batch (its lanes of the one deterministic
stream that ``mot train`` reads, see ``PackedStream``), reading only the documents of those
lanes, so loss curves of 1, 2 or 64 workers compare step for step.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from mot_core import filesystems
from mot_core.config import RunConfig
from mot_core.errors import MotError
from mot_core.experiment.nodes import leave_marker, named_paths, pack_state, remove_marker
from mot_core.experiment.resolve import Source, resolve_config
from mot_core.experiment.tokenize import data_root
from mot_core.runs.start import start_run
from mot_core.training import storage
from mot_core.training.run_mirror import mirror_of
from mot_core.training.runtime import Runtime
from mot_core.training.state import PreparedRun


@dataclass(frozen=True)
class LaunchPlan:
    num_workers: int
    gpus_per_worker: float
    address: str | None
    storage_path: str
    name: str


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """A one-line error unless something listens at ``address`` (``auto`` and ``local`` are
    Ray's own words and pass). Ray itself would retry for a minute, then raise a traceback."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise MotError(f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379, or ray://10.0.0.1:10001)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MotError(f"no Ray cluster reachable at {address} ({reason}); start one with `ray start --head` "
                       "on the head node, or leave out --address for a local cluster") from None


def launch_config(config: RunConfig, num_workers: int | None, gpus_per_worker: float | None) -> RunConfig:
    """The config with the command line's worker settings written into ``launch``, and
    ``run.dir`` and a local ``launch.storage_path`` absolute: workers run in Ray's own working
    folders (their working directory is set to this one where their node has it, for the
    relative paths inside plugin options; elsewhere every path the config names is checked)."""
    launch = config.launch.model_copy(update={
        k: v for k, v in {"num_workers": num_workers, "gpus_per_worker": gpus_per_worker}.items() if v is not None
    })
    run_dir = config.run.dir if filesystems.is_uri(config.run.dir) else str(Path(config.run.dir).resolve())
    storage_path = launch.storage_path or filesystems.join(run_dir, "ray")  # run.dir on a store: Ray's there too
    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    return config.model_copy(update={"launch": launch.model_copy(update={"storage_path": storage_path}),
                                     "run": config.run.model_copy(update={"dir": run_dir})})


def launch_store(config: RunConfig):
    """The run's checkpoints in Ray Train's storage (``config`` from ``launch_config``)."""
    from mot_core.distributed.ray_train import RayTrainCheckpoints

    run_dir = filesystems.local_folder(config.run.dir)
    return RayTrainCheckpoints(config.launch.storage_path, run_dir.name, run_dir)


def plan_launch(config: RunConfig, address: str | None) -> LaunchPlan:
    """Check the launch's own settings (``config`` from ``launch_config``); raises one-line
    ``MotError``s."""
    launch = config.launch
    if config.train.batch_size % launch.num_workers:
        raise MotError(f"train.batch_size={config.train.batch_size} is not divisible by {launch.num_workers} workers; "
                       "the global batch is split evenly (change one of them)")
    if launch.gpus_per_worker == 0 and config.run.device == "cuda":
        raise MotError("run.device is cuda but workers get no GPU; pass --gpus-per-worker 1 (or set run.device=auto)")
    if launch.gpus_per_worker and launch.gpus_per_worker != int(launch.gpus_per_worker) and launch.gpus_per_worker > 1:
        raise MotError(f"--gpus-per-worker {launch.gpus_per_worker}: use a whole number above 1")
    if address is not None:
        check_address(address)
    elif launch.gpus_per_worker:  # a local cluster has this machine's GPUs
        have = torch.cuda.device_count()
        if launch.num_workers * launch.gpus_per_worker > have:
            raise MotError(f"{launch.num_workers} workers x {launch.gpus_per_worker:g} GPUs but this machine has {have} "
                           "CUDA GPUs; lower --gpus-per-worker or --num-workers, or join a cluster with --address")
    run_dir = filesystems.local_folder(config.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise MotError(f"run.dir {run_dir} is a file; give a folder (it is created if missing)")
    storage.check_writable(launch.storage_path)
    return LaunchPlan(launch.num_workers, launch.gpus_per_worker, address, launch.storage_path, run_dir.name)


def check_resources(plan: LaunchPlan) -> None:
    """After joining the cluster: enough CPUs and GPUs for the workers, or Ray would wait for
    them forever."""
    import ray

    total = ray.cluster_resources()
    if plan.gpus_per_worker:
        per_node = max((n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if plan.gpus_per_worker > per_node:
            raise MotError(f"--gpus-per-worker {plan.gpus_per_worker:g} but no node of the cluster has more than "
                           f"{per_node:g} GPUs")
        need = plan.num_workers * plan.gpus_per_worker
        if need > total.get("GPU", 0):
            raise MotError(f"{plan.num_workers} workers x {plan.gpus_per_worker:g} GPUs = {need:g} GPUs, "
                           f"but the cluster has {total.get('GPU', 0):g}")
    if plan.num_workers > total.get("CPU", 0):
        raise MotError(f"{plan.num_workers} workers need a CPU each, but the cluster has {total.get('CPU', 0):g}; "
                       "use fewer workers or add nodes")


def launch(source: Source, overrides=(), num_workers: int | None = None, gpus_per_worker: float | None = None,
           address: str | None = None) -> tuple[RunConfig, dict]:
    """Run (or resume) training on Ray. Returns the config that ran and the final metrics Ray
    recorded. This process (the driver) starts the run as every run starts (``start_run``):
    its refusals before any worker starts, tokenizers fitted and every source tokenized once;
    then the workers start it in their own processes, train, and save to storage."""
    def saved(config: RunConfig) -> str | None:
        return launch_store(launch_config(config, num_workers, gpus_per_worker)).resumed_config()

    config = launch_config(resolve_config(source, overrides, saved=saved), num_workers, gpus_per_worker)
    plan = plan_launch(config, address)
    # the driver prepares the data, and keeps a run folder on an object store in step with its copy here
    driver = Runtime(torch.device("cpu"), launch_store(config), mirror=mirror_of(config.run.dir))
    metrics = start_run(config, driver, execute=lambda run, runtime: _fit(run, runtime, plan))
    return config, metrics


def _fit(run: PreparedRun, driver: Runtime, plan: LaunchPlan) -> dict:
    """The workers: a Ray Train ``TorchTrainer`` of ``plan.num_workers``, restarted from the last
    checkpoint after a failure (``fit_with_retries``); then the export of the last checkpoint as
    a ``mot train`` checkpoint in the run folder."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mot_core.distributed.ray_train import train_worker

    config = run.config
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=plan.address, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    markers = leave_markers(run)
    try:
        check_resources(plan)
        # an object store's file system as resolved here (the URI's query endpoint, storage.endpoint,
        # AWS_ENDPOINT_URL): Ray Train then reaches the same endpoint
        storage_filesystem, storage_path = (storage.resolved(plan.storage_path) if filesystems.is_uri(plan.storage_path)
                                            else (None, plan.storage_path))
        resources = {"CPU": 1, **({"GPU": plan.gpus_per_worker} if plan.gpus_per_worker else {})}

        def make_trainer():
            return TorchTrainer(
                train_worker,
                train_loop_config=worker_loop_config(run, driver, plan, markers),
                scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=bool(plan.gpus_per_worker),
                                             resources_per_worker=resources),
                run_config=RayRunConfig(
                    name=plan.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                    checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
                    # the driver restarts the group itself (fit_with_retries): Ray would retry
                    # an error that fails the same way on every attempt
                    failure_config=FailureConfig(max_failures=0),
                ),
            )

        if run.latest is not None:  # as a URI (a Ray checkpoint's path drops the scheme of s3://)
            print(f"resuming from {filesystems.join(plan.storage_path, plan.name, Path(run.latest.path).name)}")
        metrics = fit_with_retries(make_trainer, config.launch.max_failures)
    finally:
        for marker in markers.values():
            remove_marker(marker)
        if started_here:
            ray.shutdown()
    # The final weights and AdamW state, from the last checkpoint in storage into this run folder,
    # a block at a time: no worker gathers them, and no worker need see this folder.
    driver.store.export(config.train.keep_checkpoints)
    return metrics


def worker_loop_config(run: PreparedRun, driver: Runtime, plan: LaunchPlan, markers: dict[str, str]) -> dict:
    """What every worker receives (``ray_train.train_worker``): the driver's resolved config,
    the saved config of the checkpoint the run resumes from (the record of a pretrained model's
    shapes: on a resume, workers never read a moved pretrained folder; a first start reads it,
    as it loads its weights), where the checkpoints are, the folder relative paths mean
    something in, and what a node holding none of this machine's files needs
    (``experiment.nodes``): the files the config names, the markers left in ``data.dir`` and
    ``run.dir``, the tokenizers' saved state and the vocabulary's fingerprint."""
    dumped = run.config.model_dump(mode="json")
    vocabulary = next(iter(run.fingerprints.values())).vocabulary if run.fingerprints else None
    return {"config": dumped,
            "saved": driver.store.saved_config(run.latest) if run.latest is not None else None,
            "storage_path": plan.storage_path, "name": plan.name, "cwd": os.getcwd(),
            "paths": named_paths(dumped), "data_marker": markers["data"], "run_marker": markers["run"],
            "state": pack_state(run.exp.modalities), "vocabulary": vocabulary}


def leave_markers(run: PreparedRun) -> dict[str, str]:
    """Marker files in ``data.dir`` and ``run.dir``: a worker that sees the first reads the
    driver's shards; one that does not see the second keeps the run's files on its own node."""
    root = data_root(run.exp)
    return {"data": leave_marker(root if "://" in root else os.path.abspath(root)),
            "run": leave_marker(str(run.exp.run_dir.resolve()))}


def fit_with_retries(make_trainer, max_failures: int) -> dict:
    """Fit, and after a failure fit a new worker group that resumes from the newest intact
    checkpoint (the workers find it in storage), at most ``max_failures`` times (-1: no limit).
    A ``MotError`` from a worker (a missing file, a bad setting, the skip limit) fails the same
    way on every attempt: it ends the launch at once with its one line."""
    failures = 0
    while True:
        try:
            result = make_trainer().fit()
            error = getattr(result, "error", None)
        except Exception as exc:  # Ray wraps worker errors in its own
            error = exc
        if error is None:
            return dict(result.metrics or {})
        fatal = _mot_error(error)
        if fatal is not None:
            raise MotError(f"training on Ray failed: {fatal}")
        failures += 1
        if 0 <= max_failures < failures:
            tried = f" (after {failures} attempts)" if failures > 1 else ""
            raise MotError(f"training on Ray failed{tried}: {_root_cause(error)}")
        left = "no limit" if max_failures < 0 else f"{max_failures - failures + 1} left"
        print(f"worker group failed ({_root_cause(error)}); restarting it from the last checkpoint "
              f"(launch.max_failures: {left})", flush=True)


def _errors(exc: BaseException):
    """Every error nested in ``exc``: causes, contexts and each worker's failure."""
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
        for nested in (getattr(current, "cause", None), current.__cause__, current.__context__):
            if isinstance(nested, BaseException):
                stack.append(nested)


def _mot_error(exc: BaseException) -> str | None:
    return next((str(e) for e in _errors(exc) if isinstance(e, MotError)), None)


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost error a worker raised (a ``MotError`` message as is)."""
    fatal = _mot_error(exc)
    if fatal is not None:
        return fatal
    found = list(_errors(exc))[-1]
    lines = [line for line in str(found).splitlines() if line.strip()]
    return lines[-1] if lines else type(found).__name__
