"""Continuous modalities and plugin-owned modules.

- Packing: continuous values and next-value targets travel with their positions through
  document packing (documents cut at row ends), in the order the model's slices expect.
- The model: each modality's adapter sees exactly its own values; each loss reaches only its
  own tower's last-layer weights and its own adapter/head.
- Per-segment loss reduction.
- The example plugin's ``timeseries_patches`` modality, installed as a package outside the
  core: trained next to text by ``mot train``, evaluated by ``mot eval``, weights in the
  checkpoint; and, in process, a run with loss extras drawn at batch time resumes exactly.
- Bad input from a plugin: one-line errors naming the modality, exit 2.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import PLUGIN_SOURCE, fail_at_batch, run_mot, use_registry
from mot_core.cli import main
from mot_core.data import IGNORE, PackedStream, Vocabulary, collate
from mot_core.data.packing import collate
from mot_core.errors import MotError
from mot_core.model.transformer import ModalityModules, ModelArgs, MoTTransformer
from mot_core.plugin_api import ContinuousSegment, Modality, ModalitySlice, RawDocument, RawSegment
from mot_core.training.evaluation import continuous_inputs, forward_losses, reduce_losses
from registry import hookimpl
from registry.manager import build_registry

# --------------------------------------------------------------------------------------------
# Two small modalities: words (ids) and a "ramp" whose values name their document and index
# --------------------------------------------------------------------------------------------


class _Words(Modality):
    name = "words"

    def prepare(self, train_payloads):
        pass

    @property
    def vocab_size(self):
        return 20

    def encode(self, payload):
        return torch.tensor(payload, dtype=torch.long)


class _Ramp(Modality):
    """Payload (doc, n): a begin marker, then n values [doc, i, 1]: each value says where it
    came from, so the test can see where packing put it."""

    name = "ramp"

    def prepare(self, train_payloads):
        pass

    @property
    def vocab_size(self):
        return 1

    @property
    def input_dim(self):
        return 3

    def encode(self, payload):
        doc, n = payload
        values = torch.tensor([[doc, i, 1.0] for i in range(n)])
        return ContinuousSegment.of_values(values, prefix=(0,))

    def build_adapter(self, dim):
        return _RecordingAdapter(3, dim)

    def build_head(self, dim):
        return torch.nn.Linear(dim, 3)


class _RecordingAdapter(torch.nn.Module):
    def __init__(self, size, dim):
        super().__init__()
        self.proj = torch.nn.Linear(size, dim)
        self.seen: list[torch.Tensor] = []

    def forward(self, values, extras):
        self.seen.append(values.detach().clone())
        return self.proj(values)


def ramp_vocab() -> Vocabulary:
    return Vocabulary({"words": _Words(None, Path(".")), "ramp": _Ramp(None, Path("."))})


def ramp_documents(count: int = 6) -> list[RawDocument]:
    """Document d: words [d+1, d+2], a ramp of 3 + d values, then word 7."""
    return [
        RawDocument((RawSegment("words", [d + 1, d + 2]), RawSegment("ramp", (d, 3 + d)), RawSegment("words", [7])))
        for d in range(count)
    ]


def test_values_and_next_value_targets_follow_their_positions_through_packing():
    vocab = ramp_vocab()
    docs = vocab.tokenize(ramp_documents(), "test")
    first = docs[0]
    # words 1 2 | marker v v v | word 7: the marker's and values' next-token targets are
    # IGNORE where the next position is a value; the last value predicts word 7.
    assert first.is_value.tolist() == [False, False, False, True, True, True, False]
    assert first.next_ids.tolist() == [2, 20, IGNORE, IGNORE, IGNORE, 7, IGNORE]
    assert first.next_value_index.tolist() == [-1, -1, 0, 1, 2, -1, -1]

    stream = PackedStream([docs], [1.0], seq_len=5, seed=0, shuffle=False)  # cuts documents
    batch = collate([stream.next_row() for _ in range(4)], 2)  # one lane's rows continue its documents
    ramp = vocab.index("ramp")
    flat_value = batch.is_value.reshape(-1)
    # Values arrive in batch order: the k-th continuous position holds the k-th value.
    expected = []
    for d in range(len(docs)):
        expected += [[d, i, 1.0] for i in range(3 + d)]
    n_values = int(flat_value.sum())
    assert batch.plan.num_values(ramp) == n_values
    torch.testing.assert_close(batch.values[ramp], torch.tensor(expected[:n_values]))

    # The slice lists ramp's token positions (markers) first, then its values, in batch order.
    start, end = batch.plan.bounds(ramp)
    piece = batch.modality_slices(vocab)["ramp"][2]
    assert piece.num_values == n_values and len(piece) == end - start
    order = batch.plan.order[start:end]
    assert not flat_value[order[: len(piece) - n_values]].any() and flat_value[order[len(piece) - n_values :]].all()
    # Next-value targets: each position predicts the value at the next position of its
    # document, across row ends too (rows continue documents in order here).
    total = batch.num_tokens
    expected_has = torch.zeros(total, dtype=torch.bool)
    expected_has[:-1] = flat_value[1:]
    expected_next = torch.zeros(total, 3)
    for k, p in enumerate(torch.nonzero(flat_value).squeeze(1).tolist()):
        if p > 0:
            expected_next[p - 1] = batch.values[ramp][k]
    known = order != total - 1  # the batch's last position predicts into the next batch
    assert torch.equal(piece.has_next_value[known], expected_has[order][known])
    torch.testing.assert_close(piece.next_values[known], expected_next[order][known])
    # Segments: a new id exactly where the segment changes inside a row; none shared by rows.
    for row in range(batch.segment.shape[0]):
        seg, mod, document = batch.segment[row], batch.modality[row], batch.document[row]
        changes = seg[1:] != seg[:-1]
        assert torch.equal(changes, (mod[1:] != mod[:-1]) | (document[1:] != document[:-1]))
    per_row = [set(r.tolist()) for r in batch.segment]
    assert all(not (a & b) for i, a in enumerate(per_row) for b in per_row[i + 1 :])


def test_adapter_sees_exactly_its_values_and_output_is_checked():
    vocab = ramp_vocab()
    stream = PackedStream([vocab.tokenize(ramp_documents(), "test")], [1.0], seq_len=6, seed=1, lanes=3)
    batch = stream.next_batch(2)
    args = ModelArgs(vocab_size=vocab.size, num_modalities=2, dim=16, n_layers=1, n_heads=2, max_seq_len=16)
    ramp = _Ramp(None, Path("."))
    adapter = ramp.build_adapter(16)
    model = MoTTransformer(args, {"ramp": ModalityModules(1, adapter, ramp.build_head(16))})
    model(batch.tokens, batch.positions, batch.modality, batch.plan, batch.layout, continuous=continuous_inputs(batch))
    torch.testing.assert_close(adapter.seen[-1], batch.values[1])
    assert {n for n, _ in model.named_parameters() if n.startswith("modality_modules.")} == {
        "modality_modules.ramp.adapter.proj.weight", "modality_modules.ramp.adapter.proj.bias",
        "modality_modules.ramp.head.weight", "modality_modules.ramp.head.bias",
    }
    counts = model.parameter_counts()
    owned = sum(p.numel() for p in model.modality_modules.parameters())
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    plain = MoTTransformer(args).parameter_counts()
    assert counts["active_per_token"] == plain["active_per_token"] + owned

    wrong = _Lin(3, 17)
    model = MoTTransformer(args, {"ramp": ModalityModules(1, wrong, owner="plugin 'ramps'")})
    with pytest.raises(MotError, match=r"plugin 'ramps': modality 'ramp': its input adapter returned \(\d+, 17\), "
                                       r"expected \(\d+, model.dim=16\)"):
        model(batch.tokens, batch.positions, batch.modality, batch.plan, batch.layout, continuous=continuous_inputs(batch))

    class Raising(torch.nn.Module):
        def forward(self, values, extras):
            raise IndexError("patch 7 is missing\nsecond line")

    model = MoTTransformer(args, {"ramp": ModalityModules(1, Raising(), owner="plugin 'ramps'")})
    with pytest.raises(MotError, match=r"^plugin 'ramps': modality 'ramp': its input adapter raised IndexError: "
                                       r"patch 7 is missing$"):
        model(batch.tokens, batch.positions, batch.modality, batch.plan, batch.layout, continuous=continuous_inputs(batch))


def test_dense_baseline_with_an_adapter_matches_mot_with_nothing_untied():
    """The unrouted (dense) path puts adapter outputs back in original order."""
    vocab = ramp_vocab()
    batch = PackedStream([vocab.tokenize(ramp_documents(), "test")], [1.0], seq_len=6, seed=2, lanes=2).next_batch(2)
    args = ModelArgs(vocab_size=vocab.size, num_modalities=2, dim=16, n_layers=2, n_heads=2, max_seq_len=16,
                     untie_ffn=False, untie_attention=False, untie_norm=False)
    torch.manual_seed(0)
    model = MoTTransformer(args, {"ramp": ModalityModules(1, _Lin(3, 16))})
    out = model(batch.tokens, batch.positions, batch.modality, batch.plan, batch.layout, continuous=continuous_inputs(batch))
    # Literal: embed every position in original order, overwrite value positions by the adapter.
    flat = batch.tokens.reshape(-1)
    h = model.embed(flat).clone()
    h[batch.is_value.reshape(-1)] = model.modality_modules["ramp"].adapter(batch.values[1], {})
    for layer in model.layers:
        h = layer(h, _ctx(model, batch))
    expected = model.final_norm(batch.plan.sort(h), batch.plan)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


class _Lin(torch.nn.Module):
    def __init__(self, size, dim):
        super().__init__()
        self.proj = torch.nn.Linear(size, dim)

    def forward(self, values, extras):
        return self.proj(values)


def _ctx(model, batch):
    from mot_core.model.block import ForwardContext

    cos, sin = model.rope.tables(batch.positions)
    return ForwardContext(None, batch.modality, *batch.tokens.shape, cos, sin, model.backend,
                          model.mask_cache.get(model.backend, batch.layout))


def test_reduce_losses_per_token_and_per_segment():
    losses = torch.tensor([1.0, 3.0, 5.0, 2.0, 10.0, float("nan")])
    valid = torch.tensor([True, True, True, True, True, False])
    piece = ModalitySlice(0, 0, torch.zeros(6, dtype=torch.long), segment=torch.tensor([4, 4, 4, 9, 2, 2]))
    total, count = reduce_losses(losses, valid, piece, "token")
    assert float(total / count) == pytest.approx(21 / 5)
    total, count = reduce_losses(losses, valid, piece, "segment")
    assert int(count) == 3 and float(total / count) == pytest.approx((3.0 + 2.0 + 10.0) / 3)


# --------------------------------------------------------------------------------------------
# The example plugin's continuous modality
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patches_plugin():
    """mot_timeseries imported from its source folder, plus a test plugin with a loss that
    draws extras at batch time (noise and a per-segment timestep) and reduces per segment,
    and an adapter that reads them: the path a diffusion loss takes."""
    sys.path.insert(0, str(PLUGIN_SOURCE))
    try:
        import mot_timeseries
        from mot_timeseries import patches

        yield mot_timeseries, patches
    finally:
        sys.path.remove(str(PLUGIN_SOURCE))


def _noisy_plugin(patches, defect: str | None = None):
    class NoisyAdapter(torch.nn.Module):
        def __init__(self, size, dim):
            super().__init__()
            self.proj = torch.nn.Linear(size, dim + (defect == "adapter_dim"))

        def forward(self, values, extras):
            t = extras["timestep"][:, None]
            return self.proj(values * (1 - t) + extras["noise"] * t)

    class NoisyPatches(patches.TimeSeriesPatches):
        name = "noisy_patches"
        default_loss = "noisy_patch_nll"

        def encode(self, payload):
            segment = super().encode(payload)
            values = segment.values
            if defect == "wrong_shape":
                values = torch.cat([values, values[:, :1]], dim=1)
            elif defect == "int_dtype":
                values = values.long()
            elif defect == "nan":
                values = values.clone()
                values[-1, 0] = float("nan")
            return ContinuousSegment(segment.ids, values)

        def build_adapter(self, dim):
            return NoisyAdapter(self.options.patch_size, dim)

    class NoisyPatchNLL(patches.GaussianPatchNLL):
        name = "noisy_patch_nll"
        reduction = "segment"

        def sample_extras(self, piece, generator):
            segments = torch.unique(piece.segment, return_inverse=True)[1]
            per_segment = torch.rand(int(segments.max()) + 1, generator=generator) * 0.5
            noise = torch.randn(len(piece), self._size(piece), generator=generator)
            return {"timestep": per_segment[segments], "noise": noise}

        @staticmethod
        def _size(piece):
            return piece.values.shape[1] if piece.values is not None else piece.next_values.shape[1]

    class Plugin:
        @hookimpl
        def mot_modalities(self):
            return [NoisyPatches]

        @hookimpl
        def mot_losses(self):
            return [NoisyPatchNLL]

    return Plugin()


def _patch_config(run_dir: Path, modality: str, **train) -> dict:
    return {
        "run": {"dir": str(run_dir), "device": "cpu", "seed": 0},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
        "train": {"steps": 6, "batch_size": 2, "seq_len": 64, "warmup_steps": 1, "eval_every": 3,
                  "eval_batches": 2, "checkpoint_every": 3, "log_every": 1, "progress": False, **train},
        "mixture": {
            "modalities": {"text": {"options": {"vocab_size": 300}}, modality: {"options": {"patch_size": 4}}},
            "datasets": {"timeseries_csv": {"options": {"window": 32, "stride": 16, "modality": modality}}},
        },
    }


def test_installed_continuous_plugin_trains_evaluates_and_checkpoints_its_modules(plugin_site, tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "patches.yaml"
    config.write_text(yaml.safe_dump(_patch_config(run_dir, "timeseries_patches")))
    result = run_mot(plugin_site, tmp_path, "train", str(config))
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    for key in ("loss/text", "loss/timeseries_patches", "val/timeseries_patches/loss", "val/timeseries_patches/bits_per_value"):
        assert key in final and math.isfinite(final[key]), f"{key} missing or not finite in {final}"
    # The zero-initialised head starts at a standard normal guess: 0.5 E[z^2] + 0.5 log(2 pi).
    assert records[0]["loss/timeseries_patches"] == pytest.approx(0.5 * 1.0 + 0.5 * math.log(2 * math.pi), abs=0.6)

    weights = load_file(str(run_dir / "checkpoints" / "step_0000006" / "model.safetensors"))
    owned = {k for k in weights if k.startswith("modality_modules.timeseries_patches.")}
    assert owned == {
        "modality_modules.timeseries_patches.adapter.proj.weight", "modality_modules.timeseries_patches.adapter.proj.bias",
        "modality_modules.timeseries_patches.head.proj.weight", "modality_modules.timeseries_patches.head.proj.bias",
    }
    assert weights["modality_modules.timeseries_patches.adapter.proj.weight"].shape == (32, 4)
    assert weights["modality_modules.timeseries_patches.head.proj.weight"].abs().sum() > 0  # it trained

    result = run_mot(plugin_site, tmp_path, "eval", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    for key in ("val/timeseries_patches/loss", "val/text/loss"):
        assert scored[key] == pytest.approx(final[key], rel=1e-5)


@pytest.fixture
def noisy_registry(patches_plugin, monkeypatch):
    package, patches = patches_plugin

    def install(defect: str | None = None):
        registry = build_registry((package, _noisy_plugin(patches, defect)))
        use_registry(monkeypatch, lambda: registry)
        return registry

    return install


def _read(run_dir: Path) -> list[dict]:
    keep = ("step", "loss", "loss/text", "loss/noisy_patches", "grad_norm", "val/noisy_patches/loss", "val/text/loss")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_run_with_batch_time_extras_resumes_exactly(noisy_registry, tmp_path, monkeypatch):
    noisy_registry()
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump(_patch_config(tmp_path / "full", "noisy_patches")))
    assert main(["train", str(full)]) == 0
    expected = _read(tmp_path / "full")
    assert all("loss/noisy_patches" in r for r in expected)

    crashed = tmp_path / "crashed.yaml"
    crashed.write_text(yaml.safe_dump(_patch_config(tmp_path / "crashed", "noisy_patches")))
    fail_at_batch(monkeypatch, 5, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", str(crashed)])
    assert main(["train", str(crashed)]) == 0
    assert _read(tmp_path / "crashed") == expected


def test_each_loss_reaches_only_its_own_tower_and_modules(noisy_registry, tmp_path):
    """Backward of one modality's loss alone: the other modality's last-layer towers (output
    projection, FFN, norms) and its own modules get exactly zero gradient; its own get some."""
    from mot_core.config import validate_config
    from mot_core.data import fixed_batches
    from mot_core.experiment.build import build_experiment, build_model, extras_sampler, model_args
    from mot_core.experiment.tokenize import open_data, prepare_vocabulary

    noisy_registry()
    config = validate_config(_patch_config(tmp_path / "g", "noisy_patches"))
    exp = build_experiment(config)
    data = open_data(exp, prepare_vocabulary(exp), missing="memory")
    torch.manual_seed(0)
    model = build_model(model_args(config, data.vocab), data.vocab)
    with torch.no_grad():  # a trained-looking head: zeros would hide gradient paths
        for p in model.modality_modules.parameters():
            p.normal_(0, 0.1)
    batch = fixed_batches(data.val, 2, 64, 1, 2, extras_sampler(exp, data.vocab))[0]
    names = data.vocab.names
    last = f"layers.{config.model.n_layers - 1}"
    for name in names:
        model.zero_grad(set_to_none=True)
        losses, valid, piece = forward_losses(model, batch, data.vocab, exp)[name]
        total, count = reduce_losses(losses, valid, piece, exp.losses[name].reduction)
        (total / count).backward()
        mine, other = names.index(name), 1 - names.index(name)
        for param in (f"{last}.wo.weight", f"{last}.ffn.w13.weight", f"{last}.ffn.w2.weight",
                      f"{last}.ffn_norm.weight", "final_norm.weight"):
            grad = dict(model.named_parameters())[param].grad
            assert torch.all(grad[other] == 0), f"{name} loss reached the other tower's {param}"
            assert grad[mine].abs().sum() > 0, f"{name} loss did not reach its own {param}"
        head = model.modality_modules["noisy_patches"].head.proj.weight.grad
        lm_head = model.lm_head.weight.grad
        if name == "noisy_patches":
            assert head.abs().sum() > 0 and (lm_head is None or torch.all(lm_head == 0))
        else:
            assert head is None or torch.all(head == 0)
            assert lm_head.abs().sum() > 0


@pytest.mark.parametrize("defect, message", [
    ("wrong_shape", r"modality 'noisy_patches', encode \(dataset 'timeseries_csv'\): continuous values have shape \(\d+, 5\), expected \(\d+, input_dim=4\)"),
    ("int_dtype", r"modality 'noisy_patches', encode \(dataset 'timeseries_csv'\): continuous values must be a floating-point tensor, got dtype torch.int64"),
    ("nan", r"modality 'noisy_patches', encode \(dataset 'timeseries_csv'\): continuous value row \d+ holds NaN or inf"),
    ("adapter_dim", r"modality 'noisy_patches': its input adapter returned \(\d+, 33\), expected \(\d+, model.dim=32\)"),
])
def test_bad_continuous_input_is_one_line_naming_the_modality(noisy_registry, tmp_path, capsys, defect, message):
    noisy_registry(defect)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(_patch_config(tmp_path / "bad", "noisy_patches")))
    code = main(["train", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "bad" / "checkpoints").exists()


# --------------------------------------------------------------------------------------------
# Generating continuous modalities: autoregressive (timeseries_patches: next-patch Gaussian,
# from the marker's prediction, no invented start patch) and diffusion (timeseries_denoised:
# the whole window denoised), both through `mot generate` and the public `open_run`
# --------------------------------------------------------------------------------------------

CAPTION = "Yearly sunspot numbers from 1700 to 1763:"


@pytest.fixture(scope="module")
def generating_runs(plugin_site, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("continuous_generation")
    runs = {}
    for modality in ("timeseries_patches", "timeseries_denoised"):
        config = base / f"{modality}.yaml"
        config.write_text(yaml.safe_dump(_patch_config(base / modality, modality, steps=40, eval_every=40,
                                                       checkpoint_every=40, batch_size=4, log_every=10)))
        result = run_mot(plugin_site, base, "train", str(config))
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        runs[modality] = base / modality
    return runs


@pytest.mark.parametrize("modality, options, patches", [
    ("timeseries_patches", ["--max-tokens", "3"], 3),  # open-ended: as many patches as asked for
    ("timeseries_denoised", ["--steps", "8"], 8),      # a fixed span: window 32 / patch_size 4
])
def test_both_styles_of_continuous_modality_generate_from_a_caption(plugin_site, generating_runs, modality,
                                                                    options, patches):
    run_dir = generating_runs[modality]
    out = run_dir.parent / f"{modality}.csv"
    result = run_mot(plugin_site, run_dir.parent, "generate", str(run_dir), "--prompt", CAPTION, "--modality", modality,
                     "--samples", "2", "--out", str(out), *options)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{modality} for 1 prompt(s) x 2: {out}"
    rows = list(csv.reader(out.open()))
    assert [row[0] for row in rows] == [CAPTION, CAPTION]
    series = [[float(v) for v in row[1:]] for row in rows]
    assert all(len(s) == patches * 4 and all(math.isfinite(v) for v in s) for s in series)
    assert series[0] != series[1]  # two draws


def test_autoregressive_generation_through_the_cache_equals_reading_the_series_whole(patches_plugin, generating_runs,
                                                                                      monkeypatch):
    """Greedy (the Gaussian's mean): 3 patches after the caption, each appended to the cache,
    then the caption and the first patch given whole as a prompt, continued by 2: the same
    patches, so the marker's prediction and every appended one are what one forward pass over
    the sequence computes."""
    import numpy as np

    from mot_core.plugin_api import SamplingParams
    from mot_core.runs import open_run

    package, _ = patches_plugin
    registry = build_registry((package,))
    use_registry(monkeypatch, lambda: registry)
    run = open_run(generating_runs["timeseries_patches"])
    assert run.step == 40 and list(run.modalities) == ["text", "timeseries_patches"]
    greedy = SamplingParams(temperature=0)
    [whole] = run.generate([[RawSegment("text", CAPTION)]], "timeseries_patches", greedy, max_tokens=3)
    [rest] = run.generate([[RawSegment("text", CAPTION), RawSegment("timeseries_patches", whole[:4])]],
                          "timeseries_patches", greedy, max_tokens=2)
    assert whole.shape == (12,) and rest.shape == (8,)
    np.testing.assert_allclose(rest, whole[4:], rtol=1e-4, atol=1e-4)
    # sampling draws around that mean, from the same generator seed every time
    params = SamplingParams(temperature=1.0)
    again = [run.generate([[RawSegment("text", CAPTION)]], "timeseries_patches", params, max_tokens=3, seed=7)[0]
             for _ in range(2)]
    np.testing.assert_array_equal(again[0], again[1])
    assert not np.allclose(again[0], whole)


def test_a_series_to_continue_keeps_its_last_whole_patches(patches_plugin, tmp_path):
    """13 values, patches of 4: the prompt is the marker and values 2..13 (the first value,
    which does not fill a patch, is dropped), so the forecast starts right after the series;
    fewer values than a patch are refused in one line."""
    from mot_timeseries.patches import PatchOptions

    _, patches = patches_plugin
    modality = patches.TimeSeriesPatches(PatchOptions(patch_size=4), tmp_path)
    modality.prepare([np.arange(1.0, 40.0)])
    series = np.arange(1.0, 14.0)
    prompt = modality.encode_prompt(series)
    assert prompt.ids.tolist() == [0, -1, -1, -1]
    assert torch.equal(prompt.values, modality.encode(series[1:]).values)
    with pytest.raises(MotError, match="a series to continue needs at least patch_size=4 values, got 3"):
        modality.encode_prompt(series[:3])
