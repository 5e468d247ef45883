"""The front door's second half: the one way a run starts, from a resolved ``RunConfig`` (see
``mot_core.experiment.resolve``) and the runtime it trains in.

    start_run(config, runtime)
      experiment     the plugins' modalities, losses, evaluators and sources built from the config
      lock           one trainer per run folder (held by the process that prepares the data)
      refusals       everything that can refuse the run, before anything is written: the run
                     folder, trackers, device settings, the model's shape, a resume's changes
                     against its checkpoint, a shared tokenizer fitted on other data, a
                     pretrained checkpoint that does not fit the model, the memory it needs
      tokenizers     fitted (a first start) or reloaded; a first start from ``model.init_from``
                     keeps the checkpoint's metadata files (``mot_core.hf.metadata``)
      shards         every source tokenized once (the parts still missing)
      loop           training (``mot_core.training.loop``), or for the ``mot launch`` driver the
                     worker group that trains

``mot train``, ``mot train --process-group``, ``mot launch`` (driver and workers), ``mot sweep``
trials and ``mot bench step-match`` start their runs here. A refused resume leaves the run folder
as it was, byte for byte; a first start refused before its shards are written leaves no run
folder behind (or, in a folder that was there, what the folder held).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable

from mot_core import filesystems
from mot_core.config import RunConfig
from mot_core.devices.device import (
    choose_cpu_precision, describe_precision, resolve_device, seed_everything, use_deterministic_cpu,
)
from mot_core.errors import MotError
from mot_core.experiment.build import Experiment, build_experiment, check_model_shape, model_args
from mot_core.experiment.resolve import Source, resolve_config
from mot_core.experiment.nodes import this_node
from mot_core.experiment.tokenize import data_root, describe_skipped, fingerprints, prepare_vocabulary, tokenize_locally
from mot_core.hf.llama import check_tensors, check_vocabulary, read_checkpoint
from mot_core.hf.metadata import FOLDER as KEPT_FOLDER, keep_source_files
from mot_core.training import checkpoint as ckpt
from mot_core.training.loop import train_loop
from mot_core.training.memory import check_config_fits, check_training_fits
from mot_core.training.resume import resume_changes
from mot_core.training.run_mirror import mirror_of
from mot_core.training.runtime import WAIT_FOR_RANK_0, LocalCheckpoints, Runtime, local_runtime
from mot_core.training.state import PreparedRun
from mot_core.training.trackers import check_trackers

Execute = Callable[[PreparedRun, Runtime], dict]


def resolve_local_config(source: Source, overrides=()) -> RunConfig:
    """The config ``mot train`` runs from ``source`` and ``overrides``: resolved with the saved
    config of the checkpoint it would resume from in its run folder, if any (what ``mot config
    show`` and the ``mot data`` commands show and use too)."""
    return resolve_config(source, overrides, saved=local_saved_config)


def local_saved_config(config: RunConfig) -> str | None:
    """The saved config of the newest intact checkpoint in ``config``'s run folder, or None
    (none, or only those of another way of training: ``start_run`` says so in one line)."""
    mirror = mirror_of(config.run.dir)
    try:
        if mirror is not None:  # read in the store, nothing copied yet
            return mirror.newest_saved_config()
        return LocalCheckpoints(Path(config.run.dir)).resumed_config()
    except MotError:
        return None


def train_locally(config: RunConfig, reporter=None) -> dict:
    """``mot train``: ``config`` in this process, its checkpoints in its run folder."""
    return start_run(config, local_runtime(resolve_device(config.run.device), config.run.dir, reporter))


def start_run(config: RunConfig, runtime: Runtime, execute: Execute | None = None) -> dict:
    """Start (or resume) the run of ``config`` in ``runtime``; returns what ``execute`` returns
    (default: train here, ``train_loop``, and return the last step's metrics).

    The process that prepares the data (``runtime.data``) locks the run folder, checks every
    refusal, fits or reloads the tokenizers and writes the shards; in a process group the other
    ranks then receive its verdict (so a refusal is the same one line on every rank) and reload
    what it wrote. A launch worker finds the data prepared by its driver."""
    exp = build_experiment(config, run_dir=runtime.run_dir)
    trains_here = execute is None
    refuse_before_the_folder(exp, runtime, trains_here)
    created = not exp.run_dir.exists()
    lock = ckpt.RunLock(exp.run_dir) if runtime.prepares_data else None
    pushes = runtime.mirror is not None and runtime.prepares_data
    try:
        run, refusal, found = None, None, None
        if runtime.prepares_data:
            try:
                if pushes:  # under the lock: the store's run into its working copy
                    runtime.mirror.pull()
                found = _entries(exp.run_dir)
                run = prepare(exp, runtime, trains_here)
            except MotError as exc:
                if created:  # a refused first start: nothing of it stays
                    lock.release()
                    lock = None
                    shutil.rmtree(exp.run_dir, ignore_errors=True)
                elif found is not None:
                    # A folder that was there keeps only what it held: tokenizers saved for a
                    # refused start would refuse the corrected one as changed options.
                    _remove_all_but(exp.run_dir, found)
                refusal = str(exc)
            if refusal is None:
                try:
                    write_shards(run)
                except MotError as exc:
                    refusal = str(exc)
        if runtime.data == WAIT_FOR_RANK_0 or (runtime.prepares_data and runtime.world > 1):
            refusal = runtime.parallel.verdict_of_rank_0(refusal)  # the others wait for the data here
        if refusal is not None:
            raise MotError(refusal)
        run = run or prepare(exp, runtime, trains_here)
        check_driver_vocabulary(run, runtime)
        return (execute or train_loop)(run, runtime)
    except OSError as exc:  # metrics, config or state files: the disk, not the code
        raise ckpt.storage_error(exc, Path(exc.filename or exp.run_dir), "training") from None
    finally:
        try:
            if pushes and exp.run_dir.is_dir():  # a crash too: what it saved reaches the store
                push_at_the_end(runtime.mirror, failing=sys.exc_info()[1])
        finally:
            if lock is not None:
                lock.release()


def _entries(run_dir: Path) -> set[Path]:
    """The entries of the run folder and of its ``state/`` (the tokenizers' folders)."""
    state = run_dir / "state"
    return {*(run_dir.iterdir() if run_dir.is_dir() else ()), *(state.iterdir() if state.is_dir() else ())}


def _remove_all_but(run_dir: Path, found: set[Path]) -> None:
    """Remove the entries of ``_entries`` that are not in ``found`` (those a refused start wrote)."""
    for entry in sorted(_entries(run_dir) - found, key=lambda path: len(path.parts), reverse=True):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def push_at_the_end(mirror, failing: BaseException | None) -> None:
    """The run's last push. When the run is failing already, a failed push is one more line on
    stderr and the run's own error is the one raised (the store then lacks what this copy holds
    since its last push; the next start here sends it)."""
    try:
        mirror.push()
    except MotError as exc:
        if failing is None:
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)


def check_driver_vocabulary(run: PreparedRun, runtime: Runtime) -> None:
    """A launch worker reads the shards its driver wrote: its tokenizers must be the driver's,
    or every id it trains on would be another token."""
    expected = runtime.driver_vocabulary
    if expected is None:
        return
    for prints in (run.fingerprints or {}).values():
        if prints.vocabulary != expected:
            raise MotError(f"{this_node()} builds another vocabulary than the `mot launch` driver (its tokenizers "
                           "differ): the shards would be read as other tokens; the tokenizers' state must reach every "
                           "node")


def refuse_before_the_folder(exp: Experiment, runtime: Runtime, trains_here: bool) -> None:
    """What can refuse the run before its folder is created or locked."""
    config = exp.config
    if exp.run_dir.exists() and not exp.run_dir.is_dir():
        raise MotError(f"run.dir {exp.run_dir} is a file; give a folder (it is created if missing)")
    if runtime.is_main:
        check_trackers(config.train.loggers)  # the trackers' packages (the main process logs)
    check_model_shape(config)
    filesystems.check_reachable(data_root(exp), "data.dir")  # shards in an object store: before tokenizers are fitted
    if trains_here:
        if config.model.attention_backend == "flex" and runtime.device.type == "cpu":  # before torch warns
            raise MotError("attention backend 'flex' has no backward pass on CPU in this torch; train with "
                           "model.attention_backend=sdpa (flex works on CPU for eval and generation)")
        describe_precision(runtime.device, config.train.precision)  # a bad MOT_CPU_BF16 is one line
        # the sizes, arithmetically, before tokenizers are fitted or the folder is made (the
        # vocabulary rows come in prepare's check)
        check_config_fits(config, runtime.device, _shards(runtime), runtime.world)


def _shards(runtime: Runtime) -> int:
    """The workers the training state is split over (FSDP2 builds the model sharded)."""
    return runtime.world if runtime.parallel.shards_at_build else 1


def prepare(exp: Experiment, runtime: Runtime, trains_here: bool) -> PreparedRun:
    """The refusals that read the run folder and the data, then the tokenizers (fitted on a
    first start, which is the one write before the last refusal: what a refused start wrote is
    removed by ``start_run``), then a first start's copy of its ``init_from`` folder's metadata."""
    config = exp.config
    latest = runtime.store.latest(report=print if runtime.is_main else (lambda line: None))
    if latest is not None and config.run.resume == "never":
        raise MotError(f"{exp.run_dir} already holds checkpoints; use run.resume=auto to continue or a new run.dir")
    config_yaml = exp.resolved_yaml()
    # Settings that may not change on resume are refused here, before the run folder changes.
    changes = resume_changes(runtime.store.saved_config(latest), config_yaml, str(latest)) if latest is not None else []
    init = config.model.init_from
    pretrained = read_checkpoint(init.path) if latest is None and init is not None else None
    if pretrained is not None:  # before the tokenizers are saved: a refused checkpoint leaves the folder as it was
        if KEPT_FOLDER in config.mixture.modalities:
            raise MotError(f"a modality is named '{KEPT_FOLDER}', the folder of <run.dir>/state that keeps the "
                           "model.init_from checkpoint's files; give the modality another name")
        check_tensors(pretrained, config.model)
    if latest is None and config.model.warm_start:
        ckpt.LazyWeights(Path(config.model.warm_start))  # its file is there and readable
    seed_everything(config.run.seed)  # tokenizer fits draw from the run's seed, deterministically on a CPU
    if trains_here and runtime.device.type == "cpu":
        use_deterministic_cpu()
    vocab = prepare_vocabulary(exp, check_fitted_on=runtime.prepares_data)
    args = model_args(config, vocab)
    if pretrained is not None:
        check_vocabulary(pretrained, vocab.modalities[init.modality].vocab_size, init.modality, init.path)
    if trains_here:  # before tokenizing or allocating
        check_training_fits(args, runtime.device, _shards(runtime), -(-config.train.batch_size // runtime.world),
                            config.train.seq_len)
        if config.train.precision == "auto" and runtime.device.type == "cpu" and runtime.world == 1:
            # one process: its own step decides (ranks of a distributed run must agree: fp32 there)
            choose_cpu_precision(args, config.train.batch_size, config.train.seq_len)
    if runtime.prepares_data:
        removed = ckpt.clean_leftovers(exp.run_dir)
        if removed:
            print(f"removed leftovers of an interrupted checkpoint save: {', '.join(removed)}")
        if pretrained is not None:  # what `mot export` writes back; the folder may be gone by then
            keep_source_files(pretrained.folder, exp.run_dir)
    return PreparedRun(config, exp, vocab, args, config_yaml, latest, changes, pretrained, fingerprints(exp, vocab))


def write_shards(run: PreparedRun) -> None:
    """Tokenize every source's missing parts into shards (``mot data tokenize`` ran first, or
    an earlier start did: then nothing is left to do)."""
    try:
        written = tokenize_locally(run.exp, run.vocab, progress=True, prints=run.fingerprints)
    except OSError as exc:  # the shards' folder, not the run folder
        raise filesystems.write_failure(exc, data_root(run.exp), "data.dir", "writing the shards") from None
    for name, counts in written.items():
        print(f"tokenized {name}: {counts['documents']:,} documents, {counts['tokens']:,} tokens in "
              f"{counts['shards']} shards{describe_skipped(counts)}", flush=True)
