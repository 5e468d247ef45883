"""The hooks a plugin may implement. One module, one docstring per hook (pytest/datasette style).

A plugin is a module (or object) with functions decorated by ``@registry.hookimpl``, exposed
through the ``mot.plugins`` entry-point group::

    [project.entry-points."mot.plugins"]
    timeseries = "mot_timeseries"

Hooks run when a run is built, never inside ``forward()``. Each returns classes (not
instances): the engine instantiates them with the options validated from the run config.
"""

import pluggy

PROJECT = "mot"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def mot_modalities():
    """Modalities this plugin adds: a list of ``mot_core.plugin_api.Modality`` subclasses.

    Each owns a tokenizer/encoder and a range of the global vocabulary (its embedding rows and
    output-head rows), and names its default loss and evaluators."""


@hookspec
def mot_losses():
    """Training objectives: a list of ``mot_core.plugin_api.Loss`` subclasses
    (autoregressive next-token, diffusion, ...), chosen per modality in the mixture."""


@hookspec
def mot_tower_defaults(modality):
    """Tower settings this plugin recommends for ``modality`` (a name), or None.

    Returns a dict of ``mixture.modalities.<name>.tower`` keys, e.g. ``{"qk_norm": True}`` or
    ``{"ffn": {"type": "moe", "experts": 4}}`` (``ffn``, ``group`` and ``qk_norm`` are the keys).
    Precedence: built-in defaults < these < the YAML file < command-line overrides."""


@hookspec
def mot_evaluators():
    """Evaluators: a list of ``mot_core.plugin_api.Evaluator`` subclasses, referenced by
    name from a modality's ``default_evaluators`` or ``mixture.modalities.<name>.evaluators``."""


@hookspec
def mot_datasets():
    """Data sources: a list of ``mot_core.plugin_api.DataSource`` subclasses, referenced by
    name under ``mixture.datasets``, each yielding real documents with a held-out split."""
