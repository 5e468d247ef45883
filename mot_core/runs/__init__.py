"""Runs: the one way a run starts (``mot_core.runs.start.start_run``, the front door's second
half), and a trained run reopened (``reopen``: ``mot eval``, ``mot generate``; ``export``:
``mot export``).

``open_run`` opens a trained run from a plugin's own script (a sampler, an analysis, a notebook):

    from mot_core.plugin_api import RawSegment, SamplingParams
    from mot_core.runs import open_run

    run = open_run("runs/timeseries_patches_text_mot")   # a run folder (its newest intact
                                                         # checkpoint) or one checkpoint folder
    run.step, run.vocab.names, run.modalities["timeseries_patches"].options
    series = run.generate([[RawSegment("text", "Yearly sunspot numbers from 1700 to 1763:")]],
                          "timeseries_patches", SamplingParams(temperature=0.8), max_tokens=8)

The model is in eval mode on the run's device with the checkpoint's weights; the modalities are
prepared from the run folder's own tokenizers, as ``mot eval`` and ``mot generate`` open them.
``generate`` is ``mot_core.generate.api.generate_segments``: the same entry point as ``mot
generate`` and evaluators. (A plugin's modules themselves keep to ``mot_core.plugin_api``;
an evaluator gets the same call as ``EvaluationContext.generate``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mot_core.config import RunConfig
from mot_core.data import Vocabulary
from mot_core.plugin_api import Modality, RawSegment, SamplingParams
from mot_core.runs.start import start_run  # the front door's second half

__all__ = ["Run", "open_run", "start_run"]


@dataclass
class Run:
    """An opened checkpoint. ``model``: the ``MoTTransformer`` (eval mode); ``vocab``: the
    global vocabulary (``vocab.offsets[name]`` is a modality's first global id)."""

    step: int
    config: RunConfig
    vocab: Vocabulary
    model: torch.nn.Module

    @property
    def modalities(self) -> dict[str, Modality]:
        """The run's prepared modalities by name, in vocabulary order."""
        return dict(self.vocab.modalities)

    def generate(self, prompts: list[list[RawSegment]], modality: str, params: SamplingParams = SamplingParams(),
                 max_tokens: int = 64, seed: int = 0) -> list[Any]:
        """One payload of ``modality`` per prompt (a list of ``RawSegment``s), as ``mot
        generate`` makes it: see ``mot_core.generate.api.generate_segments``."""
        from mot_core.generate.api import generate_segments

        return generate_segments(self.model, self.vocab, prompts, modality, params, max_tokens=max_tokens, seed=seed)


def open_run(path: str | Path) -> Run:
    """A run folder (its newest intact checkpoint) or a checkpoint folder -> ``Run``.
    Raises ``MotError`` (one line) for a missing, damaged or incompatible checkpoint."""
    from mot_core.runs.reopen import load_run

    exp, vocab, _, model, meta = load_run(path, with_data=False)
    return Run(step=int(meta["step"]), config=exp.config, vocab=vocab, model=model)
