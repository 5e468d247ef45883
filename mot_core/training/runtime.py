"""Where the training loop runs, composed of three parts:

- **parallelism**: one process holding the whole model (``SingleProcess``), or one worker of
  a data-parallel group, DDP or FSDP2 (``parallelism.DataParallel``): wrapping the model, the
  worker's rows of each global batch, sums over workers, gradient clipping;
- **checkpoint store**: where checkpoints are found, written and read: a run folder's
  ``checkpoints/`` (``LocalCheckpoints``, ``mot train``), sharded checkpoints in a folder
  (``sharded_checkpoints.ShardedFolderCheckpoints``, ``mot train --process-group``) or in Ray
  Train's storage (``mot_core.distributed.ray_train``, ``mot launch``);
- **reporter**: where metrics go besides ``metrics.jsonl`` and the trackers (Ray Train, Ray Tune).

The loop (``loop.py``) is the same for every combination; ``mot_core.runs.start_run`` starts it.
"""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mot_core import filesystems
from mot_core.errors import MotError
from mot_core.training import checkpoint as ckpt
from mot_core.training.run_mirror import RunMirror, mirror_of


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Parallelism(abc.ABC):
    """How this process shares the model and the global batch with others."""

    rank = 0
    world = 1
    shards_at_build = False
    """True for a worker that shards the model (FSDP2): when its weights are loaded anyway
    (a checkpoint, a warm start, a pretrained model) it builds the engine's parameters on the
    meta device and allocates only its own shards."""

    @property
    def is_main(self) -> bool:
        """Prints, writes metrics.jsonl, the run's config and the trackers."""
        return self.rank == 0

    @abc.abstractmethod
    def wrap(self, model: torch.nn.Module) -> Callable:
        """Prepare ``model`` for training (replicate or shard it); returns the callable that runs
        its forward pass. Called before the optimizer is built."""

    def lanes(self, batch_size: int) -> range:
        """The rows of every global batch this worker builds and trains on (its stream lanes)."""
        per = batch_size // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    def gather_stream_state(self, state: dict) -> dict:
        """Every worker's stream lanes in one state (a collective where there are several)."""
        return state

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all workers (every worker gets it)."""
        return tensor

    def clip_grad_norm(self, parameters, max_norm: float) -> float:
        """Clip the global gradient norm to ``max_norm``; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))

    def barrier(self) -> None:
        """Wait for every worker (after one of them prepared what the others read)."""

    def verdict_of_rank_0(self, error: str | None) -> str | None:
        """Rank 0's refusal (a ``MotError`` message), or None, on every rank: a collective, so
        that ranks waiting for rank 0 stop with its one line instead of waiting forever."""
        return error

    def describe(self) -> str:
        return ""


class SingleProcess(Parallelism):
    """``mot train``: one process, the whole model, every row of the batch."""

    def wrap(self, model: torch.nn.Module) -> Callable:
        return model


class CheckpointStore(abc.ABC):
    """Where a run's checkpoints live. A handle is whatever ``latest`` returns and ``load``
    accepts (a folder, or a Ray Train checkpoint)."""

    @abc.abstractmethod
    def latest(self, report: Callable[[str], None] = print) -> Any | None:
        """The newest intact checkpoint to resume from, or None (a damaged newer one is
        reported through ``report``). A one-line ``MotError`` when the run folder holds the
        checkpoints of another way of training, which this one would overwrite."""

    def name_of(self, handle: Any) -> str:
        """A checkpoint as messages name it (a folder, or a storage URI)."""
        return str(handle)

    @abc.abstractmethod
    def saved_config(self, handle: Any) -> str:
        """The resolved config (YAML) the checkpoint was written with."""

    def resumed_config(self) -> str | None:
        """The saved config of the checkpoint a start would resume from, or None on a first
        start (what the front door reads a pretrained model's shapes from on a resume)."""
        handle = self.latest(report=lambda line: None)
        return None if handle is None else self.saved_config(handle)

    @abc.abstractmethod
    def load(self, handle: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, args: Any,
             parallel: Parallelism) -> tuple[dict, dict]:
        """Check that the checkpoint was written for a model of ``args``, then restore weights,
        optimizer state and this process's RNG state in place; returns (meta, trainer state),
        the trainer state holding ``scheduler`` and ``data``."""

    @abc.abstractmethod
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
             config_yaml: str, args: Any, keep: int, record: dict, parallel: Parallelism) -> str:
        """Write a checkpoint of ``step`` (``state``: scheduler and data state; ``record``: the
        step's metrics); returns where it went."""

    def finish(self, keep: int, parallel: Parallelism) -> None:
        """After the last step: what a run's end leaves behind besides its checkpoints (the
        sharded stores export the final weights as a ``mot train`` checkpoint)."""


class Reporter:
    """Metrics for a cluster's dashboard or a sweep's scheduler; by default nowhere."""

    def report(self, record: dict) -> None:
        """A logged step that is not checkpointed."""

    def saved(self, record: dict) -> None:
        """A checkpointed step (after the store wrote it)."""


PREPARE, WAIT_FOR_RANK_0, PREPARED = "prepare", "wait for rank 0", "prepared"
"""Who prepares a run's data (``Runtime.data``): this process (``mot train``, a process group's
rank 0, the ``mot launch`` driver, a sweep trial), rank 0 of this process's group (the other
ranks of a process group wait for its verdict), or a process that ran before this one started
(``mot launch``'s workers: the driver did)."""


@dataclass
class Runtime:
    """What the loop runs in. ``data``: who holds the run folder's lock, fits tokenizers and
    writes shards before training (``PREPARE``: this process; ``WAIT_FOR_RANK_0``;
    ``PREPARED``); the others read what it wrote."""

    device: torch.device
    store: CheckpointStore
    parallel: Parallelism = field(default_factory=SingleProcess)
    reporter: Reporter = field(default_factory=Reporter)
    data: str = PREPARE
    # a launch worker on a node that does not see run.dir: its own folder for the run's files
    run_dir: Path | None = None
    driver_vocabulary: str | None = None  # the vocabulary fingerprint the driver's shards were written with
    # run.dir on an object store: the store's copy, pulled at the start and pushed after every
    # checkpoint and at the end by the process that holds the run's lock (``run_mirror``)
    mirror: RunMirror | None = None

    @property
    def prepares_data(self) -> bool:
        return self.data == PREPARE

    @property
    def rank(self) -> int:
        return self.parallel.rank

    @property
    def world(self) -> int:
        return self.parallel.world

    @property
    def is_main(self) -> bool:
        return self.parallel.is_main

    def save(self, step: int, model, optimizer, state: dict, config_yaml: str, args, keep: int, record: dict) -> str:
        where = self.store.save(step, model, optimizer, state, config_yaml, args, keep, record, self.parallel)
        if self.mirror is not None and self.prepares_data:
            self.mirror.push()
        self.reporter.saved(record)
        return where

    def describe(self) -> str:
        return ", ".join(filter(None, [self.parallel.describe(), f"device: {self.device.type}"]))


class LocalCheckpoints(CheckpointStore):
    """``mot train``'s checkpoints: ``<run.dir>/checkpoints`` (see ``checkpoint.py``)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def latest(self, report: Callable[[str], None] = print) -> Path | None:
        found = ckpt.latest_intact(self.run_dir, report=report)
        other = ckpt.newest_of_other_layouts(self.run_dir)
        if other is not None and (found is None or other[0] > ckpt.step_of(found)):
            step, who = other
            mine = "none of `mot train`" if found is None else f"`mot train`'s newest is step {ckpt.step_of(found)}"
            raise MotError(f"{self.run_dir} holds a checkpoint of step {step} from {who} and {mine}: starting here "
                           f"would lose those steps; continue it with {who}, warm-start from it (model.warm_start), "
                           "or use a new run.dir")
        return found

    def saved_config(self, handle: Path) -> str:
        return (handle / "config.yaml").read_text()

    def resumed_config(self) -> str | None:
        return ckpt.newest_saved_config(self.run_dir)  # without hashing the weights twice per start

    def load(self, handle: Path, model, optimizer, args, parallel) -> tuple[dict, dict]:
        meta = ckpt.read_meta(handle)
        ckpt.check_compatible(meta["model_args"], args, handle)
        model.load_state_dict(ckpt.load_weights(handle))
        state = ckpt.load_trainer_state(handle)
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        else:  # exported by a sharded run: keyed by parameter name, whatever the sharding was
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state["optimizer_by_name"],
                                     options=StateDictOptions(full_state_dict=True))
        set_rng_state(state["rng"])
        return meta, state

    def save(self, step, model, optimizer, state, config_yaml, args, keep, record, parallel) -> str:
        full = {"optimizer": optimizer.state_dict(), **state, "rng": rng_state()}
        return str(ckpt.save_checkpoint(self.run_dir, step, model, full, config_yaml, args, keep))


def local_runtime(device: torch.device, run_dir: str, reporter: Reporter | None = None) -> Runtime:
    """``mot train``'s runtime (and a sweep trial's, with its reporter); ``run_dir``: ``run.dir``,
    a folder or an object-store URI (kept in step with its working copy here)."""
    return Runtime(device, LocalCheckpoints(filesystems.local_folder(run_dir)), reporter=reporter or Reporter(),
                   mirror=mirror_of(run_dir))
