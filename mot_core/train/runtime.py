"""Where the training loop runs: one process (``mot train``) or one worker of a data-parallel
group (``mot launch``, see ``mot_core.cluster``). The loop in ``trainer.py`` is the same for
both; a runtime supplies what differs: wrapping the model, the worker's rows of each global
batch, sums across workers, gradient clipping, and where checkpoints go.
"""

from __future__ import annotations

import abc
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mot_core.train import checkpoint as ckpt


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Runtime(abc.ABC):
    """The hooks the training loop calls. The defaults are those of one process holding the
    whole model; data-parallel workers override them. Checkpoint storage is each runtime's own."""

    rank = 0
    world = 1

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        """Prints, writes metrics.jsonl and the run's config."""
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> Callable:
        """Prepare ``model`` for training (replicate or shard it); returns the callable that runs
        its forward pass. Called before the optimizer is built."""
        return model

    shards_at_build = False
    """True for a worker that shards the model (FSDP2): when its weights are loaded anyway
    (a checkpoint, a warm start, a pretrained model) it builds the engine's parameters on the
    meta device and allocates only its own shards."""

    missing_data = "tokenize"
    """What ``open_data`` does with sources not tokenized yet: ``tokenize`` them, or (a worker,
    which reads what its driver wrote) ``error``."""

    def lanes(self, batch_size: int) -> range:
        """The rows of every global batch this worker builds and trains on (its stream lanes)."""
        return range(batch_size)

    def gather_stream_state(self, state: dict) -> dict:
        """Every worker's stream lanes in one state (a collective where there are several)."""
        return state

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all workers (every worker gets it)."""
        return tensor

    def clip_grad_norm(self, parameters, max_norm: float) -> float:
        """Clip the global gradient norm to ``max_norm``; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))

    # checkpoints: a handle is whatever ``latest`` returns and ``load`` accepts
    @abc.abstractmethod
    def latest(self) -> Any | None:
        """The newest intact checkpoint to resume from, or None."""

    @abc.abstractmethod
    def saved_config(self, handle: Any) -> str:
        """The resolved config (YAML) the checkpoint was written with."""

    @abc.abstractmethod
    def load(self, handle: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, args: Any
             ) -> tuple[dict, dict]:
        """Check that the checkpoint was written for a model of ``args``, then restore weights,
        optimizer state and this process's RNG state in place; returns (meta, trainer state),
        the trainer state holding ``scheduler`` and ``data``."""

    @abc.abstractmethod
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
             config_yaml: str, args: Any, keep: int, record: dict) -> str:
        """Write a checkpoint of ``step`` (``state``: scheduler and data state; ``record``: the
        step's metrics); returns where it went."""

    def report(self, record: dict) -> None:
        """Metrics of a logged step that is not checkpointed (to a cluster's dashboard)."""

    def describe(self) -> str:
        return f"device: {self.device}"


class LocalRuntime(Runtime):
    """``mot train``: checkpoints in ``<run.dir>/checkpoints`` (see ``checkpoint.py``)."""

    def __init__(self, device: torch.device, run_dir: Path):
        super().__init__(device)
        self.run_dir = run_dir

    def latest(self) -> Path | None:
        return ckpt.latest_intact(self.run_dir)

    def saved_config(self, handle: Path) -> str:
        return (handle / "config.yaml").read_text()

    def load(self, handle: Path, model, optimizer, args) -> tuple[dict, dict]:
        meta = ckpt.read_meta(handle)
        ckpt.check_compatible(meta["model_args"], args, handle)
        model.load_state_dict(ckpt.load_weights(handle))
        state = ckpt.load_trainer_state(handle)
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        else:  # written by ``mot launch``: keyed by parameter name, whatever the sharding was
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state["optimizer_by_name"],
                                     options=StateDictOptions(full_state_dict=True))
        set_rng_state(state["rng"])
        return meta, state

    def save(self, step, model, optimizer, state, config_yaml, args, keep, record) -> str:
        full = {"optimizer": optimizer.state_dict(), **state, "rng": rng_state()}
        return str(ckpt.save_checkpoint(self.run_dir, step, model, full, config_yaml, args, keep))
