"""``mot eval``: rebuild a run from a checkpoint's own config and score its held-out data."""

from __future__ import annotations

from pathlib import Path

import torch

from mot_core.data import fixed_batches
from mot_core.evaluate import evaluate
from mot_core.plugin_api import EvaluationContext
from mot_core.tools_cli import load_run
from mot_core.trainer import autocast_for


def evaluate_checkpoint(path: Path, batches: int | None = None, samples: int = 0) -> dict[str, float]:
    """Token-level validation metrics, plus model-level ones (reconstruction, and with
    ``samples`` > 0 generation-based scores such as FID)."""
    exp, _, data, model, meta = load_run(path)
    tcfg = exp.config.train
    device = model.embed.weight.device
    val = fixed_batches(data.val, tcfg.batch_size, tcfg.seq_len, batches or tcfg.eval_batches, len(data.vocab.names))
    context = EvaluationContext(model, data.vocab, data.raw_val, device, samples=samples, seed=exp.config.run.seed)
    with torch.no_grad():
        metrics = evaluate(model, val, data.vocab, exp, device, autocast_for(device, tcfg.precision), context)
    return {"step": float(meta["step"]), **metrics}
