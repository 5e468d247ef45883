"""`mot plugins check`: the conformance check passes on every built-in plugin and on the
example plugin package, and fails with a readable report on a broken plugin."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import run_mot
from mot_core.train.conformance import check_plugin
from registry.manager import build_registry
from test_plugin_contract import PLUGIN, make_plugin, with_evaluator, with_modality, with_source


def test_every_built_in_plugin_passes(plugin_site, tmp_path):
    result = run_mot(plugin_site, tmp_path, "plugins", "check", "autoregressive", "text", "images", "image_vq",
                     "image_diffusion", "speech")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and result.stdout.strip().endswith("all checks passed")
    # data the check cannot make itself (rendered images, synthesised speech) is a SKIP naming
    # the command that makes it; everything that runs on Wikipedia text is checked in full
    assert "run `mot data prepare` first" in result.stdout
    for line in ("PASS  modality text: generation: 2 samples after a 'text' prompt",
                 "PASS  losses: tiny model forward and backward: losses text via 'autoregressive'",
                 "PASS  modality text: decode round trip"):
        assert line in result.stdout, result.stdout


def test_the_example_plugin_passes_with_both_of_its_modalities(plugin_site, tmp_path):
    configs = []
    for name, modality, options in (("binned", "timeseries", {"n_bins": 64}),
                                    ("patches", "timeseries_patches", {"patch_size": 8})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "run": {"dir": str(tmp_path / name)},
            "mixture": {"modalities": {"text": {"options": {"vocab_size": 300}}, modality: {"options": options}},
                        "datasets": {"timeseries_csv": {"options": {"window": 32, "stride": 16, "modality": modality}}}},
        }))
        configs += ["--config", str(path)]
    result = run_mot(plugin_site, tmp_path, "plugins", "check", "timeseries", *configs)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "FAIL" not in out and out.strip().endswith("all checks passed")
    for line in ("PASS  modality timeseries: generation: 2 samples after a 'text' prompt, written by write_payloads",
                 "PASS  modality timeseries: decode round trip: 4 held-out segments decode; encode(decode(ids)) == ids for 4",
                 "PASS  losses: tiny model forward and backward: losses text via 'autoregressive', timeseries_patches via 'gaussian_patch_nll'",
                 "PASS  evaluators: update and compute: val/text/bits_per_byte, val/text/loss, val/text/perplexity, "
                 "val/timeseries_patches/bits_per_value",
                 "PASS  modality timeseries_patches: own modules save and restore: 4 tensors through safetensors"):
        assert line in out, out


@pytest.mark.parametrize("broken, fails, reason", [
    (with_modality(encode=lambda self, payload: torch.ones(len(payload))),
     "documents encode", "encode returned ids of dtype torch.float32"),
    (with_evaluator(compute=lambda self: ["low"]), "evaluators: update and compute", "compute() returned list"),
    (with_modality(decode=lambda self, ids: 1 / 0), "modality glyphs: decode round trip", "decode raised ZeroDivisionError"),
    ({"modalities": lambda: Glyphs_class()}, "hooks return valid classes", "hook mot_modalities() returned the class"),
    (with_source(num_parts=lambda self, split: 2, read_part=lambda self, split, part: self.documents(split)),
     "dataset glyph_lines: parts and fingerprint",
     "read_part must split documents() without adding or dropping any"),
    (with_source(fingerprint=lambda self: object()), "dataset glyph_lines: parts and fingerprint",
     "fingerprint() must return the same string"),
])
def test_a_broken_plugin_fails_with_a_readable_report(broken, fails, reason):
    try:
        registry = build_registry((make_plugin(**broken),))
    except Exception as exc:  # a broken hook stops the registry itself: the check reports that
        registry = exc
    if isinstance(registry, Exception):
        assert reason in str(registry) and f"plugin '{PLUGIN}'" in str(registry)
        return
    report = check_plugin(PLUGIN, registry)
    assert not report.ok
    text = report.text()
    failed = [line for line in report.lines if line.status == "FAIL"]
    assert failed and failed[0].check.startswith(fails), text
    assert reason in failed[0].detail and PLUGIN in failed[0].detail, text
    assert text.startswith(f"plugin '{PLUGIN}':") and "Traceback" not in text


def Glyphs_class():
    from test_plugin_contract import Glyphs

    return Glyphs


def test_the_unbroken_test_plugin_passes():
    report = check_plugin(PLUGIN, build_registry((make_plugin(),)))
    assert report.ok, report.text()
    assert any(line.check == "modality glyphs: generation" and line.status == "PASS" for line in report.lines), report.text()


def test_evaluators_generate_through_the_same_entry_point(tmp_path):
    """``EvaluationContext.generate`` is ``generate_segments``: free-running glyphs after a
    glyph prompt, up to ``max_tokens`` (the modality has no stop token)."""
    from mot_core.config import validate_config
    from mot_core.generate.api import generate_segments
    from mot_core.plugin_api import EvaluationContext, RawSegment, SamplingParams
    from mot_core.train.experiment import build_experiment, build_model, model_args
    from mot_core.train.tokenize import prepare_vocabulary

    from test_plugin_contract import _config

    registry = build_registry((make_plugin(),))
    config = validate_config(_config(tmp_path / "run"))
    exp = build_experiment(config, registry)
    vocab = prepare_vocabulary(exp)
    model = build_model(model_args(config, vocab), vocab).eval()
    context = EvaluationContext(model, vocab, [], torch.device("cpu"), samples=2, segment_generator=generate_segments)
    out = context.generate([[RawSegment("glyphs", "The quick")]] * 2, "glyphs", SamplingParams(temperature=0.0),
                           max_tokens=5)
    assert len(out) == 2 and all(isinstance(o, str) and len(o) == 5 for o in out)
    assert out[0] == out[1]  # greedy: the same prompt gives the same continuation
