"""`mot plugins check`: the conformance check passes on every built-in plugin and on the
example plugin package, and fails with a readable report on a broken plugin.

A broken plugin cannot pass: every hook the check can reach runs (evaluators' ``evaluate_model``
too), whatever plugin code raises is a FAIL line naming the plugin (never a traceback), a SKIP
never ends the check early, and the output ends with "N passed, M skipped, K failed"."""

from __future__ import annotations

import re
import sys
import types

import pytest
import torch
import yaml

from conftest import PLUGIN_SOURCE, run_mot
from mot_core.cli import main
from mot_core.errors import MotError
from mot_core.plugin_api import Modality, PluginOptions, SpanGrammar
from mot_core.train.conformance import BUILD, ENCODE, EVALUATORS, LOSSES, TOKENIZERS, check_plugin
from registry import hookimpl
from registry.manager import build_registry
from test_plugin_contract import (
    PLUGIN, GlyphLines, make_plugin, raise_, subclass, with_evaluator, with_loss, with_modality, with_source,
)

# The checks every report has a line for, passed, failed or skipped, once the hooks gave classes
EVERY_RUN_HAS = (BUILD, TOKENIZERS, ENCODE, LOSSES, EVALUATORS)
SUMMARY = re.compile(r"^(\d+) passed, (\d+) skipped, (\d+) failed$")


def failing_on(split: str, exc: Exception):
    """A ``documents`` that reads the glyph lines of every split but ``split``, which raises."""
    def documents(self, wanted):
        if wanted == split:
            raise exc
        return GlyphLines.documents(self, wanted)
    return documents


def summary_of(out: str) -> tuple[int, int, int]:
    """The counts of the last line, which must be the summary."""
    last = out.strip().splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, f"the last line is not the summary: {last!r}\n{out}"
    return tuple(int(n) for n in match.groups())


def test_every_built_in_plugin_passes(plugin_site, tmp_path):
    result = run_mot(plugin_site, tmp_path, "plugins", "check", "autoregressive", "text", "images", "image_vq",
                     "image_diffusion", "speech")
    assert result.returncode == 0, result.stdout + result.stderr
    passed, skipped, failed = summary_of(result.stdout)
    assert "FAIL" not in result.stdout and failed == 0 and passed > 0
    # data the check cannot make itself (rendered images, synthesised speech) is a SKIP naming
    # the command that makes it, and skips are never called a pass
    assert skipped > 0 and "all checks passed" not in result.stdout
    assert "run `mot data prepare` first" in result.stdout
    # everything that runs on Wikipedia text is checked in full
    for line in ("PASS  modality text: generation: 2 samples after a 'text' prompt",
                 "PASS  losses: tiny model forward and backward: losses text via 'autoregressive'",
                 "PASS  modality text: decode round trip",
                 "PASS  evaluator text_lm of modality text: evaluate_model"):
        assert line in result.stdout, result.stdout
    # a check it cannot run for lack of data is listed, not silently left out
    assert "SKIP  evaluator image_vq of modality image: evaluate_model: needs 'dataset captioned_images" in result.stdout


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
    assert "FAIL" not in out and summary_of(out)[2] == 0
    for line in ("PASS  modality timeseries: generation: 2 samples after a 'text' prompt, written by write_payloads",
                 "PASS  modality timeseries: decode round trip: 4 held-out segments decode; encode(decode(ids)) == ids for 4",
                 "PASS  losses: tiny model forward and backward: losses text via 'autoregressive', timeseries_patches via 'gaussian_patch_nll'",
                 "PASS  evaluators: update and compute: val/text/bits_per_byte, val/text/loss, val/text/perplexity, "
                 "val/timeseries_patches/bits_per_value",
                 "PASS  evaluator timeseries_forecast of modality timeseries: evaluate_model",
                 "PASS  evaluator timeseries_patch_forecast of modality timeseries_patches: evaluate_model",
                 "PASS  modality timeseries_patches: own modules save and restore: 4 tensors through safetensors",
                 # each config runs one of the two modalities: the other is a SKIP in that report
                 "SKIP  modality timeseries_patches: no data source of this check yields it"):
        assert line in out, out


# --------------------------------------------------------------------------------------------
# A broken plugin: each row breaks one hook; the check names it and goes on
# --------------------------------------------------------------------------------------------


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
    # evaluate_model runs (as `mot eval --samples 2` runs it) and its result is checked
    (with_evaluator(evaluate_model=raise_(RuntimeError("scorer weights missing\nsecond line"))),
     "evaluator glyph_eval of modality glyphs: evaluate_model", "evaluate_model raised RuntimeError: scorer weights missing"),
    (with_evaluator(evaluate_model=lambda self, context: ["low"]),
     "evaluator glyph_eval of modality glyphs: evaluate_model", "evaluate_model() returned list"),
    (with_evaluator(evaluate_model=lambda self, context: {"fid": float("inf")}),
     "evaluator glyph_eval of modality glyphs: evaluate_model", "fid = inf; metrics must be finite"),
    # the plugins' tower defaults are applied as `mot train` applies them
    ({"tower_defaults": lambda modality: "moe"}, "classes build from their options",
     "hook mot_tower_defaults(modality='glyphs') returned str 'moe'"),
    # plugin code the engine calls without a boundary: the check's own catch names the plugin
    (with_modality(span_grammar=raise_(ValueError("grammar table corrupt"))),
     "modality glyphs: generation", "raised ValueError: grammar table corrupt"),
    ({**with_modality(default_loss="glyph_loss"), **with_loss(per_token=raise_(KeyError("logits")))},
     "losses: tiny model forward and backward", "per_token raised KeyError"),
    (with_source(documents=failing_on("val", KeyError("val"))),
     "dataset glyph_lines: documents('val')", "documents('val') raised KeyError"),
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
    assert "\n" not in failed[0].detail and "second line" not in text  # the message's first line only
    assert text.startswith(f"plugin '{PLUGIN}':") and "Traceback" not in text
    # the checks after the failed one still have their line (run, or a SKIP naming what failed)
    assert set(EVERY_RUN_HAS) <= {line.check for line in report.lines}, text
    assert report.lines.index(failed[0]) < len(report.lines) - 1, text


def Glyphs_class():
    from test_plugin_contract import Glyphs

    return Glyphs


def test_the_unbroken_test_plugin_passes():
    report = check_plugin(PLUGIN, build_registry((make_plugin(),)))
    assert report.ok, report.text()
    passed = {line.check for line in report.lines if line.status == "PASS"}
    assert {"modality glyphs: generation", "evaluator glyph_eval of modality glyphs: evaluate_model"} <= passed, report.text()
    # its loss is registered but the glyphs modality defaults to 'autoregressive': not run, so a SKIP
    assert [str(line) for line in report.lines if line.status == "SKIP"] == [
        "SKIP  loss glyph_loss: no modality of this check uses it; pass --config of a run that does"], report.text()
    assert report.summary() == f"{len(passed)} passed, 1 skipped, 0 failed"


# --------------------------------------------------------------------------------------------
# `mot plugins check` itself: exit code, no traceback, the summary as the last line
# --------------------------------------------------------------------------------------------


def check_cli(monkeypatch, capsys, plugin, *args: str) -> tuple[int, str]:
    registry = build_registry((plugin,))
    monkeypatch.setattr("registry.get_registry", lambda: registry)
    code = main(["plugins", "check", PLUGIN, *args])
    out, err = capsys.readouterr()
    return code, out + err


class NeedsRoot(PluginOptions):
    root: str  # required: the source cannot be built from default options


MISSING = MotError("no glyph corpus at data/glyphs; run `mot data prepare` first")

# (hooks, the FAIL line's check, what it says): a failure is exit 2 and a FAIL line, the rest runs
FAILURES = {
    "evaluate_model raises": (
        with_evaluator(evaluate_model=raise_(RuntimeError("scorer weights missing"))),
        "evaluator glyph_eval of modality glyphs: evaluate_model",
        "evaluator 'glyph_eval' of modality 'glyphs', evaluate_model raised RuntimeError: scorer weights missing"),
    "the data source's constructor has a bug": (
        with_source(__init__=lambda self, options: [][1]),
        "dataset glyph_lines: builds from default options", "__init__ raised IndexError: list index out of range"),
    "span_grammar raises": (
        with_modality(span_grammar=raise_(ValueError("grammar table corrupt"))),
        "modality glyphs: generation", "raised ValueError: grammar table corrupt"),
}

# (hooks, the SKIP line's check, what it says, a later check that must still have its line)
SKIPS = {
    "the data source needs options (no --config)": (
        with_source(Options=NeedsRoot), "dataset glyph_lines: builds from default options",
        "needs options to be built; pass --config", "SKIP  evaluator glyph_eval: evaluate_model: needs "
        "'classes build from their options', which was skipped"),
    "the held-out data is not prepared": (
        with_source(documents=failing_on("val", MISSING)),
        "dataset glyph_lines: documents('val')", "run `mot data prepare` first",
        "SKIP  modality glyphs: generation: needs 'dataset glyph_lines: documents('val')', which was skipped"),
    "the modality does not decode": (
        with_modality(decode=Modality.decode), "modality glyphs: decode round trip",
        "the modality does not decode", "PASS  evaluator glyph_eval of modality glyphs: evaluate_model"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failing_check_is_exit_2_a_line_naming_the_plugin_and_no_traceback(monkeypatch, capsys, case):
    hooks, check, message = FAILURES[case]
    code, out = check_cli(monkeypatch, capsys, make_plugin(**hooks))
    assert code == 2, out
    assert "Traceback" not in out and "all checks passed" not in out
    fail = [line for line in out.splitlines() if line.startswith(f"  FAIL  {check}: ")]
    assert len(fail) == 1 and message in fail[0] and f"plugin '{PLUGIN}'" in fail[0], out
    assert summary_of(out)[2] >= 1
    # the checks after the failure still ran (or say what they needed): a line each, then the summary
    lines = out.strip().splitlines()
    assert lines.index(fail[0]) < len(lines) - 2, out
    assert all(f"  {step}" in out for step in EVERY_RUN_HAS), out


@pytest.mark.parametrize("case", list(SKIPS))
def test_a_skip_never_ends_the_check_and_is_never_called_a_pass(monkeypatch, capsys, case):
    hooks, check, reason, later = SKIPS[case]
    code, out = check_cli(monkeypatch, capsys, make_plugin(**hooks))
    assert code == 0, out
    skip = [line for line in out.splitlines() if line.startswith(f"  SKIP  {check}: ")]
    assert len(skip) == 1 and reason in skip[0], out
    lines = out.strip().splitlines()
    assert later in out and lines.index(skip[0]) < next(i for i, line in enumerate(lines) if later in line), out
    assert all(f"  {step}" in out for step in EVERY_RUN_HAS), out
    passed, skipped, failed = summary_of(out)
    assert skipped >= 1 and failed == 0 and "all checks passed" not in out and "FAIL" not in out
    assert "Traceback" not in out


# --------------------------------------------------------------------------------------------
# A continuous modality whose own code raises: the example plugin's patches, broken
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patches_module():
    """``mot_timeseries`` imported from its source folder (as test_continuous_modality does)."""
    sys.path.insert(0, str(PLUGIN_SOURCE))
    try:
        import mot_timeseries
        from mot_timeseries import patches

        yield mot_timeseries, patches
    finally:
        sys.path.remove(str(PLUGIN_SOURCE))


class ExplodingAdapter(torch.nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(size, dim)

    def forward(self, values, extras):
        raise RuntimeError("adapter lost its weights")


BROKEN_PATCHES = "broken_patches"

# (what the patches modality is given, the FAIL line's check, what it says, a line the checks
# after it give)
CONTINUOUS_DEFECTS = {
    "the input adapter raises": (
        {"build_adapter": lambda self, dim: ExplodingAdapter(self.options.patch_size, dim)},
        "losses: tiny model forward and backward", "raised RuntimeError: adapter lost its weights",
        "SKIP  modality timeseries_patches: generation: needs 'losses: tiny model forward and backward', which failed"),
    "sample_values raises": (
        # a span of 2 patches after the series marker: generation reaches sample_values
        {"span_grammar": lambda self: SpanGrammar(begin=0, end=0, body_lo=0, body_hi=0, length=2),
         "sample_values": raise_(OverflowError("sampler diverged"))},
        "modality timeseries_patches: generation", "raised OverflowError: sampler diverged",
        "PASS  modality timeseries_patches: own modules save and restore"),
    "sample_values returns NaN": (
        {"span_grammar": lambda self: SpanGrammar(begin=0, end=0, body_lo=0, body_hi=0, length=2),
         "sample_values": lambda self, runner, params, generator: torch.full((runner.rows, 2, 8), float("nan"))},
        "modality timeseries_patches: generation", "sample_values returned NaN or inf values",
        "PASS  modality timeseries_patches: own modules save and restore"),
    "sample_values returns the wrong width": (
        {"span_grammar": lambda self: SpanGrammar(begin=0, end=0, body_lo=0, body_hi=0, length=2),
         "sample_values": lambda self, runner, params, generator: torch.zeros(runner.rows, 2, 5)},
        "modality timeseries_patches: generation", "returned shape (2, 2, 5), expected (2, 2, 8)",
        "PASS  modality timeseries_patches: own modules save and restore"),
    "sample_values returns too few positions": (
        {"span_grammar": lambda self: SpanGrammar(begin=0, end=0, body_lo=0, body_hi=0, length=2),
         "sample_values": lambda self, runner, params, generator: torch.zeros(runner.rows, 1, 8)},
        "modality timeseries_patches: generation", "returned shape (2, 1, 8), expected (2, 2, 8)",
        "PASS  modality timeseries_patches: own modules save and restore"),
}


@pytest.mark.parametrize("defect", list(CONTINUOUS_DEFECTS))
def test_a_continuous_modality_whose_code_raises_fails_by_name(patches_module, tmp_path, defect):
    package, patches = patches_module
    members, check, message, other = CONTINUOUS_DEFECTS[defect]
    plugin = {"mot_modalities": [subclass(patches.TimeSeriesPatches, **members)],
              "mot_losses": [subclass(patches.GaussianPatchNLL)],
              "mot_evaluators": [subclass(patches.PatchForecastEvaluator)],
              "mot_datasets": [subclass(package.TimeSeriesCSV)]}
    namespace = types.SimpleNamespace(__name__=BROKEN_PATCHES)
    for hook, classes in plugin.items():
        setattr(namespace, hook, hookimpl(lambda classes=classes: classes))
    config = tmp_path / "patches.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "run")},
        "mixture": {"modalities": {"text": {"options": {"vocab_size": 300}},
                                   "timeseries_patches": {"options": {"patch_size": 8}}},
                    "datasets": {"timeseries_csv": {"options": {"window": 32, "stride": 16,
                                                                "modality": "timeseries_patches"}}}},
    }))
    report = check_plugin(BROKEN_PATCHES, build_registry((namespace,)), config_path=config)
    text = report.text()
    failed = [line for line in report.lines if line.status == "FAIL"]
    assert len(failed) >= 1 and failed[0].check == check, text
    assert message in failed[0].detail and f"plugin '{BROKEN_PATCHES}'" in failed[0].detail, text
    assert "Traceback" not in text and not report.ok
    assert other in text, text  # the other checks ran, or say what they needed


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
