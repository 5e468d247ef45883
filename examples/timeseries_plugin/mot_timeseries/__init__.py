"""mot-timeseries: an example third-party plugin for mot-framework.

Registered through the entry point ``timeseries = "mot_timeseries"`` of the ``mot.plugins``
group; the framework calls the ``@hookimpl`` functions below when it builds a run.
"""

from mot_timeseries.datasource import TimeSeriesCSV
from mot_timeseries.denoised import SeriesDenoising, TimeSeriesDenoised
from mot_timeseries.evaluator import ForecastEvaluator
from mot_timeseries.modality import TimeSeries
from mot_timeseries.patches import GaussianPatchNLL, PatchForecastEvaluator, TimeSeriesPatches
from registry import hookimpl

__version__ = "0.1.0"


@hookimpl
def mot_modalities():
    return [TimeSeries, TimeSeriesPatches, TimeSeriesDenoised]


@hookimpl
def mot_losses():
    return [GaussianPatchNLL, SeriesDenoising]


@hookimpl
def mot_datasets():
    return [TimeSeriesCSV]


@hookimpl
def mot_evaluators():
    return [ForecastEvaluator, PatchForecastEvaluator]


@hookimpl
def mot_tower_defaults(modality):
    # Short sequences over a 256-id vocabulary do not show the attention-logit growth that
    # qk-norm guards against in large image vocabularies, so the plain tower is recommended.
    # A YAML file or command-line override (mixture.modalities.timeseries.tower.qk_norm) wins.
    if modality in ("timeseries", "timeseries_patches", "timeseries_denoised"):
        return {"qk_norm": False}
    return None
