"""Docs that cannot go stale: sample outputs in the plugin guide are the real outputs."""

from __future__ import annotations

from conftest import ROOT, run_mot

GUIDE = ROOT / "docs" / "writing_a_plugin.md"


def _block_after(text: str, command: str) -> str:
    start = text.index(f"$ {command}\n") + len(f"$ {command}\n")
    return text[start : text.index("```", start)]


def test_the_guides_mot_plugins_listing_is_the_real_output(plugin_site, tmp_path):
    result = run_mot(plugin_site, tmp_path, "plugins")
    assert result.returncode == 0, result.stderr
    assert _block_after(GUIDE.read_text(), "mot plugins") == result.stdout


def test_config_show_prints_the_resolved_loss_evaluators_and_their_options(write_config, capsys):
    import yaml

    from mot_core.cli import main

    assert main(["config", "show", str(write_config())]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    text = shown["mixture"]["modalities"]["text"]
    assert text["loss"] == "autoregressive" and text["evaluators"] == ["text_lm"]
    assert text["evaluator_options"] == {"text_lm": {}}
    assert shown["mixture"]["weight_unit"] == "tokens"
    assert shown["launch"]["strategy"] == "fsdp2"
