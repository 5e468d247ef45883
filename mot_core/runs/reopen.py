"""Reopen a finished or running run from one of its checkpoints: ``mot eval`` and ``mot generate``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from mot_core.experiment.resolve import resolve_config
from mot_core.data import Vocabulary, fixed_batches
from mot_core import filesystems
from mot_core.errors import MotError
from mot_core.generate.api import generate_segments
from mot_core.generate.tasks import prompt_to_span, span_to_text
from mot_core.devices.device import autocast_for, resolve_device
from mot_core.model.transformer import MoTTransformer
from mot_core.plugin_api import EvaluationContext
from mot_core.training import checkpoint as ckpt
from mot_core.training.run_mirror import RunMirror, mirror_of
from mot_core.training.evaluation import describe_coverage, evaluate
from mot_core.experiment.build import Experiment, build_experiment, build_model, extras_sampler, model_args
from mot_core.experiment.tokenize import OpenedData, open_data, prepare_vocabulary, source_documents


def pulled(path: str | Path) -> tuple[Path, str | None]:
    """A run or checkpoint folder, or its URI on an object store -> (the local folder to read,
    the run folder's URI or None). A store's run is copied into its working copy first: its
    files and the checkpoint named (``.../checkpoints/step_0000006``) or its newest intact one."""
    text = str(path)
    mirror = mirror_of(text)
    if mirror is None:
        return filesystems.local_folder(text), None
    base, _, query = text.partition("?")
    head, _, last = base.rstrip("/").rpartition("/")
    if ckpt.is_checkpoint_name(last) and head.endswith("/checkpoints"):
        run_uri = head[:-len("/checkpoints")] + (f"?{query}" if query else "")
        return RunMirror(run_uri).pull(last, report=lambda line: print(line, file=sys.stderr)), run_uri
    found = mirror.pull(report=lambda line: print(line, file=sys.stderr))
    if found is None:
        raise MotError(f"{text} holds no checkpoint (checkpoints/step_* with a meta.json)")
    return mirror.local, text


def load_run(checkpoint: str | Path, with_data: bool = True) -> tuple[Experiment, Vocabulary, OpenedData | None, MoTTransformer, dict]:
    """Checkpoint folder (or run folder: its newest checkpoint), either of them maybe on an
    object store -> experiment, vocabulary, held-out data (the run's shards; None unless
    ``with_data``), model, meta."""
    checkpoint, run_uri = pulled(checkpoint)
    if not checkpoint.exists():
        raise MotError(f"checkpoint not found: {checkpoint}")
    if not (checkpoint / "meta.json").is_file():
        # A damaged newest checkpoint is reported (on stderr: stdout may be JSON), then skipped.
        latest = ckpt.latest_intact(checkpoint, report=lambda line: print(line, file=sys.stderr))
        if latest is None:
            raise MotError(f"{checkpoint} is neither a checkpoint nor a run folder with checkpoints")
        checkpoint = latest
    else:
        reason = ckpt.damage(checkpoint)
        if reason is not None:
            raise MotError(f"checkpoint {checkpoint} is damaged ({reason}); use another checkpoint of the run")
    meta = ckpt.read_meta(checkpoint)
    saved = (checkpoint / "config.yaml").read_text()
    # the front door, with the checkpoint's own config as the record of its shapes (a moved
    # pretrained folder is not read again)
    config = resolve_config(yaml.safe_load(saved) or {}, saved=saved)
    # The run is the folder this checkpoint sits in, wherever it was trained: a moved or copied
    # run reads its own tokenizers, not those at the run.dir recorded when it was trained.
    # A run on an object store is its URI (its shards are there; its working copy holds the rest).
    run_folder = run_uri or str(checkpoint.resolve().parent.parent)
    config = config.model_copy(update={"run": config.run.model_copy(update={"dir": run_folder})})
    exp = build_experiment(config)
    vocab = prepare_vocabulary(exp, check_fitted_on=False)
    data = open_data(exp, vocab, missing="memory", splits=("val",)) if with_data else None
    args = model_args(config, vocab)
    ckpt.check_compatible(meta["model_args"], args, checkpoint)
    model = build_model(args, vocab).to(resolve_device(config.run.device))
    model.load_state_dict(ckpt.load_weights(checkpoint))
    return exp, vocab, data, model.eval(), meta


def evaluate_checkpoint(path: str | Path, batches: int | None = None, samples: int = 0, full: bool = False,
                        report=print, sampling: str | None = None) -> dict[str, float]:
    """Token-level validation metrics, plus model-level ones (reconstruction, and with
    ``samples`` > 0 generation-based scores such as FID). ``full``: every held-out position
    (else ``batches``, default the run's ``train.eval_batches``), drawn by ``sampling`` (default
    the run's ``train.eval_sampling``). ``report`` gets the lines saying what was scored."""
    exp, _, data, model, meta = load_run(path)
    tcfg = exp.config.train
    device = model.embed.weight.device
    val = fixed_batches(data.val, tcfg.batch_size, tcfg.seq_len, None if full else batches or tcfg.eval_batches,
                        len(data.vocab.names), extras_sampler(exp, data.vocab), sampling or tcfg.eval_sampling)
    for line in describe_coverage(val, list(exp.sources), data.vocab.names):
        report(line)
    raw_val = [doc for name, source in exp.sources.items() for doc in source_documents(name, source, "val")]
    context = EvaluationContext(model, data.vocab, raw_val, device, samples=samples, seed=exp.config.run.seed,
                                span_sampler=prompt_to_span, text_sampler=span_to_text,
                                segment_generator=generate_segments)
    with torch.no_grad():
        metrics = evaluate(model, val, data.vocab, exp, device, autocast_for(device, tcfg.precision), context)
    return {"step": float(meta["step"]), **metrics}
