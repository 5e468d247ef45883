"""A continuous time-series modality: real-valued patches in, a Gaussian forecast out.

The binned ``timeseries`` modality turns every value into a token. This one keeps the values
real: a window is cut into patches of ``patch_size`` consecutive values, and each patch is ONE
position of the sequence, carrying a real vector, not a token id.

    "Yearly sunspot numbers from 1700 to 1763:"  <series>  [x1..x8] [x9..x16] ... [x57..x64]
     text tokens (shared embedding, text tower)  marker     continuous positions (patches)

- Tokenizer: values go through the fixed ``sign(x) log1p(|x|)`` transform of the binned
  modality, then are standardised with the mean and spread of the training values (fitted once
  per run, saved in ``state_dir``). Values after the last whole patch are dropped.
- The ``<series>`` marker is the modality's one token id: text predicts it through the shared
  LM head (so the model learns when a series starts), and its hidden state predicts the first
  patch.
- Input adapter (``PatchAdapter``): a linear map of a patch to ``model.dim``; the MoT engine
  applies it to this modality's contiguous slice of the batch, then the patches run through
  this modality's own tower.
- Output head (``GaussianPatchHead``): a linear map of a hidden state to the mean and log-scale
  of a diagonal Gaussian over the NEXT patch.
- Loss (``gaussian_patch_nll``): the Gaussian negative log-likelihood of the next patch, in
  nats per value; with ``learn_scale: false`` the scale is fixed at 1 and the loss is half the
  squared error plus a constant (plain regression).
- Generation (autoregressive): after a caption and the marker, the marker's hidden state gives
  the Gaussian of the first patch; a patch is drawn from it and appended, its hidden state gives
  the next one, and so on (``mot generate --modality timeseries_patches --max-tokens N``: N
  patches). A prompt may also end with a series, which is then continued.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field

from mot_core.errors import MotError
from mot_core.plugin_api import (
    ContinuousSegment, Evaluator, Loss, Modality, ModalitySlice, PluginOptions, SamplingParams, SpanRunner, ValueSpan,
)
from mot_timeseries.modality import (
    as_series, from_log_space, read_fitted_state, read_series_file, to_log_space, write_fitted_state, write_series_csv,
)

NORMALIZER_FILE = "normalizer.json"
SERIES_MARKER = 0  # the modality's one token id: "a series starts here"
LOG_SCALE_RANGE = (-7.0, 5.0)  # a predicted log standard deviation is clamped here when sampling


class PatchOptions(PluginOptions):
    patch_size: int = Field(8, ge=1, le=1024, description="values per continuous position")


class PatchAdapter(nn.Module):
    """(V, patch_size) standardised patches -> (V, dim)."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(patch_size, dim)

    def forward(self, values: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.proj(values)


class ZeroLinearHead(nn.Module):
    """(n, dim) hidden states -> (n, out) through a linear map that starts at zero."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.proj = nn.Linear(dim, out)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class GaussianPatchHead(ZeroLinearHead):
    """(n, dim) hidden states -> (n, 2 * patch_size): mean and log-scale of the next patch.
    Starts at mean 0, scale 1: the standard normal the standardised values follow."""

    def __init__(self, dim: int, patch_size: int):
        super().__init__(dim, 2 * patch_size)


class TimeSeriesPatches(Modality):
    """A 1-D real-valued series as continuous patches (causal next-patch forecasting)."""

    name = "timeseries_patches"
    Options = PatchOptions
    default_loss = "gaussian_patch_nll"
    default_evaluators = ("timeseries_patch_forecast",)

    def __init__(self, options: PatchOptions, state_dir: Path):
        super().__init__(options, state_dir)
        self.mean: float | None = None  # of the log-space training values
        self.scale: float | None = None

    @property
    def _file(self) -> Path:
        return self.state_dir / NORMALIZER_FILE

    def prepare(self, train_payloads: Iterable[Any]) -> None:
        """Reload the saved standardisation, or fit it on the training series and save it."""
        wanted = self.options.model_dump()
        saved = read_fitted_state(self._file, wanted, "timeseries_patches normalizer")
        if saved is not None:
            self.mean, self.scale = float(saved["mean"]), float(saved["scale"])
            return
        series = [to_log_space(as_series(p)) for p in train_payloads]
        if not series:
            raise MotError("the timeseries_patches modality has no training series to fit its normalizer on")
        values = np.concatenate(series)
        self.mean, self.scale = float(values.mean()), float(max(values.std(), 1e-6))
        write_fitted_state(self._file, wanted, {"mean": self.mean, "scale": self.scale})

    @property
    def vocab_size(self) -> int:
        return 1  # the series marker

    @property
    def input_dim(self) -> int:
        return self.options.patch_size

    def _require_normalizer(self) -> tuple[float, float]:
        if self.mean is None or self.scale is None:
            raise RuntimeError("TimeSeriesPatches.prepare() must run before encoding")
        return self.mean, self.scale

    def encode(self, payload: Any) -> ContinuousSegment:
        """(L,) real values -> the marker, then L // patch_size patches (patch_size,) each."""
        mean, scale = self._require_normalizer()
        size = self.options.patch_size
        standardised = (to_log_space(as_series(payload)) - mean) / scale
        whole = standardised.size // size * size
        patches = torch.from_numpy(standardised[:whole].reshape(-1, size).astype(np.float32))
        return ContinuousSegment.of_values(patches, prefix=(SERIES_MARKER,))

    def encode_prompt(self, payload: Any) -> ContinuousSegment:
        """A series to continue: the marker, then its LAST whole patches (values before them
        that do not fill a patch are dropped, so the forecast starts right after the series)."""
        mean, scale = self._require_normalizer()
        size = self.options.patch_size
        standardised = (to_log_space(as_series(payload)) - mean) / scale
        if standardised.size < size:
            raise MotError(f"timeseries_patches: a series to continue needs at least patch_size={size} values, "
                           f"got {standardised.size}")
        tail = standardised[standardised.size % size:]
        patches = torch.from_numpy(tail.reshape(-1, size).astype(np.float32))
        return ContinuousSegment.of_values(patches, prefix=(SERIES_MARKER,))

    def decode_values(self, patches: torch.Tensor) -> np.ndarray:
        """(V, patch_size) standardised patches -> (V * patch_size,) values in real units."""
        mean, scale = self._require_normalizer()
        flat = torch.as_tensor(patches, dtype=torch.float64).reshape(-1).cpu().numpy()
        return from_log_space(flat * scale + mean)

    def build_adapter(self, dim: int) -> nn.Module:
        return PatchAdapter(self.options.patch_size, dim)

    def build_head(self, dim: int) -> nn.Module:
        return GaussianPatchHead(dim, self.options.patch_size)

    # -- generation ------------------------------------------------------------------------
    def value_span(self) -> ValueSpan:
        """A generated series starts with the marker and runs as long as asked (no end marker)."""
        return ValueSpan(begin=SERIES_MARKER, length=None, end=None)

    def sample_values(self, runner: SpanRunner, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        """One patch at a time: the marker's hidden state (``runner.prompt_output()``) gives
        the Gaussian of the first patch, exactly as the loss trained it; each drawn patch is
        appended and its hidden state gives the next. A draw is ``mean + temperature * sigma *
        noise`` (temperature 0: the mean). With guidance the means mix as ``u + s (c - u)``.
        Returns (B, runner.count, patch_size) standardised patches."""
        rows, guided = runner.rows, runner.guided
        out = runner.prompt_output()  # (R, 2 * patch_size)
        patches = []
        for _ in range(runner.count):
            mean, log_scale = out.float().chunk(2, dim=-1)
            if guided:
                mean = mean[rows:] + params.cfg_scale * (mean[:rows] - mean[rows:])
            scale = log_scale[:rows].clamp(*LOG_SCALE_RANGE).exp()
            noise = torch.randn(mean.shape, generator=generator, device=mean.device)
            patch = mean + params.temperature * scale * noise  # (B, patch_size)
            patches.append(patch)
            step = torch.cat([patch, patch]) if guided else patch
            out = runner.append(step[:, None])[:, -1]
        return torch.stack(patches, dim=1)

    def values_to_payloads(self, values: torch.Tensor) -> list[np.ndarray]:
        """(B, count, patch_size) standardised patches -> B series in real units."""
        return [self.decode_values(row) for row in values]

    def read_payload(self, path: Path) -> np.ndarray:
        """A series to continue (``mot generate --prompt-file``): numbers in a text file."""
        return read_series_file(path)

    def write_payloads(self, payloads: list, path: Path, captions: list[str] | None = None) -> Path:
        """Generated series as CSV, one per line: the prompt, then the values."""
        return write_series_csv(payloads, path, captions)


class GaussianPatchOptions(PluginOptions):
    learn_scale: bool = Field(True, description="false: unit variance, i.e. squared-error regression")
    min_log_scale: float = Field(-7.0, le=0, description="floor of the predicted log standard deviation")


class GaussianPatchNLL(Loss):
    """Negative log-likelihood of the next patch under the head's diagonal Gaussian, in nats
    per value: ``0.5 z^2 + log sigma + 0.5 log(2 pi)`` averaged over the patch, ``z = (x - mu)
    / sigma``. Valid where the next position is a patch of the same modality."""

    name = "gaussian_patch_nll"
    Options = GaussianPatchOptions

    def per_token(self, model: torch.nn.Module, hidden: torch.Tensor, batch: ModalitySlice):
        """hidden: (n, dim) -> losses (n,), valid (n,)."""
        if batch.head is None or batch.next_values is None or batch.has_next_value is None:
            raise MotError("loss 'gaussian_patch_nll' needs a continuous modality with an output head")
        out = batch.head(hidden).float()
        mean, log_scale = out.chunk(2, dim=-1)
        opts: GaussianPatchOptions = self.options
        log_scale = log_scale.clamp(min=opts.min_log_scale) if opts.learn_scale else torch.zeros_like(mean)
        z = (batch.next_values.float() - mean) * torch.exp(-log_scale)
        nll = 0.5 * z.pow(2) + log_scale + 0.5 * math.log(2 * math.pi)
        return nll.mean(dim=-1), batch.has_next_value


class PatchForecastEvaluator(Evaluator):
    """``loss``: mean nats per value over every next-patch prediction; ``bits_per_value``: the
    same in bits (a differential entropy of standardised values: 2.05 bits, 1.42 nats, for a
    standard normal guess; lower is better and may go below 0)."""

    name = "timeseries_patch_forecast"

    def reset(self) -> None:
        self.nats, self.predictions = 0.0, 0

    def update(self, losses: torch.Tensor, valid: torch.Tensor, local_targets: torch.Tensor) -> None:
        self.nats += float(losses[valid].double().sum())
        self.predictions += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if not self.predictions:
            return {}
        loss = self.nats / self.predictions
        return {"loss": loss, "bits_per_value": loss / math.log(2)}
