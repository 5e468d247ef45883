"""The front door's first half: the only way from a config to the ``RunConfig`` a run runs.

    a YAML file, or a dict (a sweep trial's settings, a launch worker's copy, a saved config)
      + ``key=value`` overrides (OmegaConf's dotlist, merged over it)
      -> plugin tower defaults (each plugin's ``mot_tower_defaults`` hook, under the user's keys)
      -> validation (pydantic, ``extra=forbid``: one line naming the key for every problem)
      -> pretrained shapes (``model.init_from``'s config.json on a run's first start; the run's
         saved config when it resumes, so a moved pretrained folder does not stop a resume)
      -> the ``storage`` settings made the process's (``mot_core.filesystems.configure``)

``mot config show``, ``mot train`` (in one process or a process group), ``mot launch`` (driver
and workers), ``mot sweep`` trials, ``mot bench``, ``mot plugins check``, ``mot eval`` and
``mot generate`` all resolve through ``resolve_config``, so one YAML file is one run whichever
command runs it. Every step is idempotent: resolving a resolved config gives it back.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mot_core import filesystems
from mot_core.config import RunConfig, load_raw_config, merge_overrides, validate_config
from mot_core.hf.llama import with_pretrained_shapes
from registry import Registry, get_registry

Source = str | Path | Mapping[str, Any]
SavedConfig = str | Callable[[RunConfig], str | None] | None
"""A resumed run's saved config (YAML), or a function from the validated config to it (the
entry point's checkpoint store knows where it is), or None (a first start)."""


def resolve_config(source: Source, overrides: Sequence[str] = (), saved: SavedConfig = None,
                   registry: Registry | None = None) -> RunConfig:
    """``source`` (a YAML path or a config dict) + ``overrides`` -> the validated ``RunConfig``.
    Raises a one-line ``MotError`` for anything wrong with it."""
    if isinstance(source, Mapping):
        # a dict is taken as it is (its interpolations were resolved when it was made); only
        # overrides go through OmegaConf
        raw = merge_overrides(dict(source), overrides) if overrides else copy.deepcopy(dict(source))
    else:
        raw = load_raw_config(source, overrides)
    config = validate_config(apply_tower_defaults(raw, registry))
    # the storage settings hold for the process that runs this config: a launch worker, a sweep
    # trial and a Ray Data tokenize task resolve the driver's config here too
    filesystems.configure(config.storage.endpoint, config.storage.region)
    return with_pretrained_shapes(config, saved(config) if callable(saved) else saved)


def apply_tower_defaults(raw: dict[str, Any], registry: Registry | None = None) -> dict[str, Any]:
    """Fill ``mixture.modalities.<name>.tower`` with plugin defaults under the user's keys."""
    registry = registry or get_registry()
    modalities = (raw.get("mixture") or {}).get("modalities") or {}
    if isinstance(modalities, dict):
        for name, entry in modalities.items():
            entry = entry if isinstance(entry, dict) else {}
            defaults = registry.tower_defaults(name)
            if defaults:
                entry["tower"] = {**defaults, **(entry.get("tower") or {})}
                modalities[name] = entry
    return raw
