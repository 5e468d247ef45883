"""``mot eval``: rebuild a run from a checkpoint's own config and score its held-out data."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from mot_core import checkpoint as ckpt
from mot_core.config import validate_config
from mot_core.data import fixed_batches
from mot_core.errors import MotError
from mot_core.evaluate import evaluate
from mot_core.experiment import build_experiment, model_args, prepare_data
from mot_core.model import MoTTransformer
from mot_core.trainer import autocast_for, resolve_device


def evaluate_checkpoint(path: Path, batches: int | None = None) -> dict[str, float]:
    if not path.exists():
        raise MotError(f"checkpoint not found: {path}")
    if not (path / "meta.json").is_file():
        found = ckpt.list_checkpoints(path)
        if not found:
            raise MotError(f"{path} is neither a checkpoint nor a run folder with checkpoints")
        path = found[-1]
    meta = ckpt.read_meta(path)
    config = validate_config(yaml.safe_load((path / "config.yaml").read_text()))
    exp = build_experiment(config)
    data = prepare_data(exp)  # reloads the tokenizers saved in the run
    args = model_args(config, data.vocab)
    ckpt.check_compatible(meta["model_args"], args, path)
    device = resolve_device(config.run.device)
    model = MoTTransformer(args).to(device)
    model.load_state_dict(ckpt.load_weights(path))
    tcfg = config.train
    val = fixed_batches(data.val, tcfg.batch_size, tcfg.seq_len, batches or tcfg.eval_batches, len(data.vocab.names))
    with torch.no_grad():
        metrics = evaluate(model, val, data.vocab, exp, device, autocast_for(device, tcfg.precision))
    return {"step": float(meta["step"]), **metrics}
