"""What a resumed run may change, and making the changes take effect.

A run continues from a checkpoint with the config it is started with, not the one it was
checkpointed with. Settings of the optimisation and of the loop may change and take effect from
the resumed step (a diverged run continues with a lower learning rate); settings that define the
model, its vocabulary or its data stream may not: the start is refused with one line naming the
key, before anything in the run folder is written. The run's ``config.yaml`` and every later
checkpoint then record exactly what runs.
"""

from __future__ import annotations

from typing import Any

import torch
import yaml

from mot_core.errors import MotError

# Dotted keys (or prefixes ending in '.') that may differ from the checkpoint's config.
CHANGEABLE = (
    "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.weight_decay", "train.beta1", "train.beta2",
    "train.grad_clip", "train.steps", "train.eval_every", "train.eval_batches", "train.eval_sampling", "train.eval_at_start",
    "train.checkpoint_every",
    "train.keep_checkpoints", "train.log_every", "train.progress", "train.on_nonfinite", "train.max_consecutive_skips",
    "train.max_total_skips", "train.precision",
    "train.loggers", "train.tracker.",  # where metrics are sent: a tracker added on resume is backfilled
    "run.dir", "run.device", "run.resume",  # where the run lives and runs, not what it is
    "model.warm_start", "model.init_from.path",  # read only by a run's first start
    "model.activation_checkpointing", "model.attention_backend",  # memory and kernels: the same maths
    "launch.", "sweep.", "storage.",  # where the shards and checkpoints are reached, not what they hold
    "data.dir", "data.fit_sample_documents", "data.encode_batch_documents",  # shards are checked by fingerprint
)
CHANGEABLE_IN_MODALITIES = ("loss_weight", "evaluators", "evaluator_options")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def _changeable(key: str) -> bool:
    if any(key == c or (c.endswith(".") and key.startswith(c)) for c in CHANGEABLE):
        return True
    parts = key.split(".")
    return parts[:2] == ["mixture", "modalities"] and len(parts) > 3 and parts[3] in CHANGEABLE_IN_MODALITIES


def resume_changes(saved_yaml: str, current_yaml: str, where: str) -> list[str]:
    """The settings that differ from the checkpoint's (``key: old -> new``), all of them
    changeable; a one-line ``MotError`` naming the first one that is not."""
    saved_data, current_data = yaml.safe_load(saved_yaml) or {}, yaml.safe_load(current_yaml) or {}
    _refuse_other_members(saved_data, current_data, where)
    saved, current = _flatten(saved_data), _flatten(current_data)
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if old == new:
            continue
        if old == "<unset>" and new == schema_default(key):
            continue  # a setting added since the checkpoint was saved, at its default: what ran then
        if not _changeable(key):
            raise MotError(
                f"{key} was {old!r} when {where} was saved and is {new!r} now; it cannot change when a run resumes "
                "(it defines the model, its vocabulary or its data stream): use the original value, or a new run.dir "
                "(model.warm_start copies the weights)"
            )
        if key != "run.dir":
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


_NO_DEFAULT = object()


def schema_default(key: str) -> Any:
    """The run config schema's default of a dotted key (``data.on_bad_record`` -> "error"), or a
    sentinel equal to nothing for a key without one (plugin options, a required setting)."""
    import typing

    from pydantic_core import PydanticUndefined

    from mot_core.config import RunConfig

    model: Any = RunConfig
    parts = key.split(".")
    for index, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return _NO_DEFAULT
        field = fields[part]
        if index == len(parts) - 1:
            if field.default_factory is not None:
                return field.default_factory()
            return _NO_DEFAULT if field.default is PydanticUndefined else field.default
        annotation = field.annotation
        model = annotation if hasattr(annotation, "model_fields") else next(
            (a for a in typing.get_args(annotation) if hasattr(a, "model_fields")), None)
    return _NO_DEFAULT


def _refuse_other_members(saved: dict, current: dict, where: str) -> None:
    """A dataset or modality added or dropped, named as such (rather than by the first of its
    keys that differs)."""
    for section, singular in (("modalities", "modality"), ("datasets", "dataset")):
        old = set(((saved.get("mixture") or {}).get(section) or {}))
        new = set(((current.get("mixture") or {}).get(section) or {}))
        added, dropped = sorted(new - old), sorted(old - new)
        if added or dropped:
            what = f"adds the {singular} '{added[0]}'" if added else f"drops the {singular} '{dropped[0]}'"
            raise MotError(
                f"mixture.{section}: the config {what}, which {where} was saved {'without' if added else 'with'}; "
                f"the {section} cannot change when a run resumes (they define its vocabulary and data stream): use "
                "the original mixture, or a new run.dir (model.warm_start copies the weights)"
            )


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                             tcfg) -> None:
    """The config's learning rate, schedule, betas and weight decay in place of those the
    optimizer and scheduler states restored (they hold the values of the checkpointed run).
    The first group is the decayed one (``build_optimizer``)."""
    scheduler.base_lrs = [tcfg.lr] * len(optimizer.param_groups)
    for index, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = tcfg.lr
        group["lr"] = tcfg.lr * scheduler.lr_lambdas[index](scheduler.last_epoch)
        group["betas"] = (tcfg.beta1, tcfg.beta2)
        if index == 0:
            group["weight_decay"] = tcfg.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
