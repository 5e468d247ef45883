"""Everything a training loop holds, built once before its first step: the model (whole, or its
shards), the optimizer and schedule, the data stream of this worker's rows, the validation
batches, and where a resumed run continues from.

``PreparedRun`` is what ``mot_core.runs.start_run`` hands over once every refusal has passed and
the tokenizers and shards are ready; ``build_state`` turns it into a ``TrainState``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mot_core.config import RunConfig, TrainSection
from mot_core.data import Batch, PackedStream, Vocabulary, fixed_batches
from mot_core.devices.device import autocast_for, describe_precision, seed_everything, use_deterministic_cpu
from mot_core.devices.host import host_memory_mb
from mot_core.errors import MotError
from mot_core.experiment.build import Experiment, build_model, extras_sampler
from mot_core.data.shards import Fingerprints
from mot_core.experiment.tokenize import open_data
from mot_core.hf.llama import LlamaCheckpoint, start_from_pretrained
from mot_core.model.transformer import ModelArgs, MoTTransformer, warm_start_from_dense
from mot_core.training import checkpoint as ckpt
from mot_core.training.evaluation import describe_coverage
from mot_core.training.parallelism import materialize, real_tensors
from mot_core.training.resume import apply_optimizer_settings
from mot_core.training.runtime import Runtime


@dataclass
class PreparedRun:
    """A run whose refusals all passed and whose tokenizers and shards are ready.

    ``latest``: the checkpoint it resumes from (a store's handle), or None; ``changes``: the
    settings that differ from that checkpoint's (each allowed to change); ``pretrained``: the
    ``model.init_from`` checkpoint a first start loads; ``config_yaml``: the resolved config
    that runs, as its ``config.yaml`` and every checkpoint record it."""

    config: RunConfig
    exp: Experiment
    vocab: Vocabulary
    args: ModelArgs
    config_yaml: str
    latest: Any | None = None
    changes: list[str] = field(default_factory=list)
    pretrained: LlamaCheckpoint | None = None
    fingerprints: dict[str, Fingerprints] | None = None  # each source's, computed once per start


class SkippedUpdates:
    """``train.on_nonfinite``: a NaN/inf loss or gradient stops the run (``stop``) or skips the
    update (``skip``) up to ``max_consecutive_skips`` in a row and ``max_total_skips`` in all."""

    def __init__(self, tcfg: TrainSection, total: int, run_dir):
        self.tcfg, self.total, self.run_dir = tcfg, total, run_dir
        self.consecutive = 0
        self.last_saved = 0
        # The newest checkpoint saved before the first skipped update of the current streak and
        # of this start: the weights may already be diverging while updates are still applied
        # between skips, so a checkpoint saved after a skip is no "good" one.
        self.good_before_streak: int | None = None
        self.good_before_first: int | None = None

    def check_loss(self, value: float, step: int) -> None:
        if not math.isfinite(value) and self.tcfg.on_nonfinite == "stop":
            raise MotError(
                f"loss is {value} at step {step}; stopped before it reached the weights "
                f"(last checkpoint: step {self.last_saved}; train.on_nonfinite=skip skips such steps instead)"
            )

    def check_gradient(self, grad_norm: float, step: int) -> bool:
        """True when the update may be applied; counts a skipped one (or stops the run)."""
        if math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        if self.tcfg.on_nonfinite == "stop":
            raise MotError(
                f"gradient norm is {grad_norm} at step {step}; stopped before it reached the weights "
                f"(last checkpoint: step {self.last_saved}; train.on_nonfinite=skip skips such steps instead)"
            )
        self.consecutive, self.total = self.consecutive + 1, self.total + 1
        if self.consecutive == 1:
            self.good_before_streak = self.last_saved
        if self.good_before_first is None:
            self.good_before_first = self.last_saved
        tcfg = self.tcfg
        over = ("consecutive", self.consecutive, tcfg.max_consecutive_skips) \
            if self.consecutive > tcfg.max_consecutive_skips else \
            ("total", self.total, tcfg.max_total_skips) if self.total > tcfg.max_total_skips else None
        if over is not None:
            kind, count, limit = over
            good = self.good_before_streak if kind == "consecutive" else self.good_before_first
            raise MotError(
                f"{count} {kind} updates skipped for a non-finite gradient at step {step} "
                f"(train.max_{kind}_skips={limit}): the run diverged; " + self._advice(good))
        return False

    def _advice(self, good: int | None) -> str:
        """Where to go on from: the newest checkpoint saved before the first skipped update,
        if the run still keeps it (retention may have dropped it)."""
        from mot_core.training.checkpoint import checkpoint_dir

        if good and checkpoint_dir(self.run_dir, good).is_dir():
            return (f"the last good checkpoint is step {good} (saved before the first skipped update) in "
                    f"{checkpoint_dir(self.run_dir, good)}: train from it with a lower train.lr, as a new run "
                    f"(model.warm_start={checkpoint_dir(self.run_dir, good)}) or by resuming a "
                    "copy of the run with its later checkpoints removed")
        if good:
            return (f"the last checkpoint saved before the first skipped update (step {good}) is no longer kept "
                    "(train.keep_checkpoints); start again with a lower train.lr")
        return "no checkpoint was saved before the first skipped update: start again with a lower train.lr"


@dataclass
class TrainState:
    """What the loop reads and updates. ``forward``: the model's forward as wrapped by the
    runtime (DDP, or the FSDP2-sharded model itself); ``step``: steps done."""

    model: MoTTransformer
    forward: Callable
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: PackedStream
    val_batches: list[Batch]
    vocab: Vocabulary
    sources: list[str]
    autocast: Callable
    skips: SkippedUpdates
    step: int = 0
    data_state: dict = field(default_factory=dict)  # the stream's position after the last finished step
    updating: bool = False  # between the update and the step's count: no consistent state to save
    reads_reported: bool = False  # the first step's line on what the object-store shards cost

    def object_store_reads(self) -> str | None:
        """What this process fetched from shards in an object store so far, as one line
        (bytes against the shards' size, and requests), or None when all shards are local."""
        remote = [s for s in self.stream.sources if getattr(s, "reads", None) is not None and not s.local]
        if not remote:
            return None
        fetched = sum(s.reads.bytes for s in remote)
        total = max(1, sum(s.shard_bytes for s in remote))
        requests = sum(s.reads.requests for s in remote)
        return (f"read {fetched / 1e6:.2f} MB of the {total / 1e6:.1f} MB of training shards in the object store "
                f"({100 * fetched / total:.2f}%) in {requests} requests")

    def trainable_modality_modules(self) -> list[torch.nn.Parameter]:
        """The parameters plugins own (adapters, heads) that train (read after each forward: a
        sharded model holds its gathered parameters only then)."""
        return [p for p in self.model.modality_modules.parameters() if p.requires_grad]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``. ``step`` is 0-based."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:  # frozen towers and rows: no optimizer state
            continue
        # norm gains and biases (of plugin-owned modules) are not decayed, matrices are
        (no_decay if "norm" in name or param.ndim < 2 else decay).append(param)
    if not decay and not no_decay:
        raise MotError("nothing would train: every tower and every vocabulary row is frozen (tower.trainable, "
                       "tower.vocab_rows_trainable); let one of them train")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters (CPU and CUDA); MoT holds a tower per modality,
    # so optimizer cost, unlike FLOPs, grows with the number of towers.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def build_state(run: PreparedRun, runtime: Runtime) -> TrainState:
    """Seed, open the shards, build (or shard) the model and load its starting weights, build
    the optimizer and the stream, and restore a checkpoint's state when the run resumes."""
    config, exp, vocab, tcfg = run.config, run.exp, run.vocab, run.config.train
    device, main = runtime.device, runtime.is_main
    seed_everything(config.run.seed)
    if device.type == "cpu":
        use_deterministic_cpu()
    data = open_data(exp, vocab, prints=run.fingerprints)
    if main:
        (exp.run_dir / "config.yaml").write_text(run.config_yaml)  # what runs from now on
    model, forward = _build_model(run, runtime)
    optimizer = build_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr_ratio)
    )
    sources = list(exp.source_weights)
    extras = extras_sampler(exp, vocab)
    stream = PackedStream([data.train[n] for n in sources], [exp.source_weights[n] for n in sources], tcfg.seq_len,
                          config.run.seed, lanes=tcfg.batch_size, owned=runtime.parallel.lanes(tcfg.batch_size),
                          extras=extras, weight_unit=config.mixture.weight_unit)
    val_batches = fixed_batches(data.val, tcfg.batch_size, tcfg.seq_len, tcfg.eval_batches, len(vocab.names), extras,
                                tcfg.eval_sampling)
    if main:
        print("\n".join(describe_coverage(val_batches, list(exp.sources), vocab.names)))
    state = TrainState(model, forward, optimizer, scheduler, stream, val_batches, vocab, sources,
                       autocast_for(device, tcfg.precision), SkippedUpdates(tcfg, 0, exp.run_dir))
    if run.latest is not None:
        meta, saved = runtime.store.load(run.latest, model, optimizer, run.args, runtime.parallel)
        scheduler.load_state_dict(saved["scheduler"])
        apply_optimizer_settings(optimizer, scheduler, tcfg)  # the config's lr, schedule, betas, decay
        stream.load_state_dict(saved["data"])
        state.step, state.skips.total = meta["step"], saved.get("skipped_updates", 0)
        if main:
            print(f"resuming from {runtime.store.name_of(run.latest)} (step {state.step})")
            if run.changes:
                print(f"changed on resume, in effect from step {state.step + 1}: {'; '.join(run.changes)}")
    state.data_state = stream.state_dict()
    state.skips.last_saved = state.step
    if main:
        _describe_start(run, runtime, state)
    return state


def _build_model(run: PreparedRun, runtime: Runtime) -> tuple[MoTTransformer, Callable]:
    """The model on the runtime's device with its starting weights (random, a warm start or a
    pretrained checkpoint; a resume loads its own later), wrapped for the runtime.

    A sharding worker whose weights all come from somewhere (its checkpoint, a warm start, a
    pretrained model) allocates only its own shards: the engine's parameters start on the meta
    device, and nothing holds the whole model (Bagel's users' start-up OOM)."""
    config, device, main = run.config, runtime.device, runtime.is_main
    held_before = host_memory_mb().get("anon", 0.0)
    torch.manual_seed(config.run.seed)
    first_start = run.latest is None
    sharded_start = runtime.parallel.shards_at_build and (
        not first_start or run.pretrained is not None or bool(config.model.warm_start))
    model = build_model(run.args, run.vocab, empty_core=sharded_start)
    if sharded_start:
        kept = real_tensors(model)
        forward = runtime.parallel.wrap(model)
        materialize(model, device, kept, model.reset_parameters)
    else:
        model = model.to(device)
    if first_start and config.model.warm_start:
        source = Path(config.model.warm_start)
        warm_start_from_dense(model, ckpt.LazyWeights(source))
        if main:
            print(f"warm start: copied {source} into every tower")
    if run.pretrained is not None:  # read by a first start only
        message = start_from_pretrained(model, run.pretrained, config, run.vocab)
        if main:
            print(message)
    if not sharded_start:
        forward = runtime.parallel.wrap(model)
    memory = host_memory_mb()
    if memory:
        # Allocated memory (RssAnon) is the measure: the resident peak also counts the pages of
        # memory-mapped checkpoints read, which the kernel drops first under pressure.
        who = f" on worker {runtime.rank}" if runtime.world > 1 else ""
        print(f"start-up: host memory {memory['anon']:,.0f} MB allocated{who} "
              f"({memory['anon'] - held_before:+,.0f} MB for the model: "
              f"{'its own shards, built on the meta device' if sharded_start else 'built whole'}; "
              f"resident peak {memory['peak']:,.0f} MB)", flush=True)
    return model, forward


def _describe_start(run: PreparedRun, runtime: Runtime, state: TrainState) -> None:
    """The data mix ahead, the model's size and cost, the runtime and the precision."""
    vocab, tcfg = run.vocab, run.config.train
    counts = state.model.parameter_counts()
    flops = state.model.flops_per_token(tcfg.seq_len)
    print(describe_mix(state.stream, state.sources, vocab.names))
    print(
        f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active_per_token'] / 1e6:.2f}M active per token, "
        f"{flops / 1e6:.1f} MFLOP per token per training step | "
        f"modalities: {', '.join(f'{n} ({vocab.modalities[n].vocab_size} ids)' for n in vocab.names)} | "
        f"{runtime.describe()} | precision: {describe_precision(runtime.device, tcfg.precision)}"
    )


def describe_mix(stream: PackedStream, sources: list[str], modalities: list[str], batches: int = 200) -> str:
    """The configured token shares next to those of the next ``batches`` batches of this
    process's rows (read from a copy of the stream: the run's own stream does not move)."""
    rows = len(stream.owned)
    batches = max(1, min(batches, 2_000_000 // (rows * stream.seq_len)))  # at most ~2M tokens of packing
    by_source, by_modality = stream.preview_shares(batches)
    parts = [f"{name} {100 * share:.1f}% (weight {100 * target:.1f}%, {length:.0f} tokens/doc)"
             for name, share, target, length in zip(sources, by_source, stream.target_shares, stream.mean_lengths)]
    kinds = ", ".join(f"{modalities[m]} {100 * share:.1f}%" for m, share in by_modality.items())
    return (f"data mix over the next {batches} batches (weights are shares of {stream.weight_unit}): {'; '.join(parts)} | "
            f"modalities: {kinds}")
