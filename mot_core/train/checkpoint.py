"""Checkpoints: safetensors weights + everything needed to resume bit-for-bit.

Layout of ``<run_dir>/checkpoints/step_0000100/``:
    model.safetensors   weights
    trainer.pt          optimizer, scheduler, data-stream position, RNG states
    config.yaml         the resolved run config
    meta.json           step and model args

A checkpoint is written to a temporary folder and renamed into place, so a crash while
saving never leaves a half-written checkpoint that a resume would pick up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mot_core.errors import MotError

PREFIX = "step_"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    config_yaml: str,
    model_args: Any,
    keep: int,
) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    meta = {"step": step, "model_args": dataclasses.asdict(model_args)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise MotError(f"not a checkpoint (no meta.json): {path}")
    return json.loads(meta_file.read_text())


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    file = path / "model.safetensors"
    if not file.is_file():
        raise MotError(f"checkpoint has no model.safetensors: {path}")
    return load_file(str(file))


def load_trainer_state(path: Path) -> dict[str, Any]:
    # weights_only=False: the state holds RNG byte tensors and plain Python containers we wrote.
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)


def check_compatible(saved_args: dict[str, Any], current_args: Any, where: Path) -> None:
    current = json.loads(json.dumps(dataclasses.asdict(current_args)))
    # A field added after a checkpoint was written takes its default, the behaviour it had then.
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(current_args)
                                      if f.default is not dataclasses.MISSING}))
    saved = {**{k: v for k, v in defaults.items() if k not in saved_args}, **saved_args}
    diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise MotError(
            f"checkpoint {where} was trained with a different model ({'; '.join(diffs[:3])}); "
            "use a new run.dir or the original settings"
        )
