"""Bad input: one clear line on stderr, exit code 2, never a traceback."""

from __future__ import annotations

import pytest
import torch
import yaml

from mot_core.cli import main
from mot_core.plugin_api import DataSource, Modality, RawDocument, RawSegment
from registry import hookimpl
from registry.manager import build_registry
from conftest import use_registry


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_unknown_key_suggests_the_right_one(capsys, write_config):
    code, _, err = run_cli(capsys, "train", write_config(), "model.dimm=64")
    assert_one_line_error(code, err, "unknown key 'model.dimm'", "did you mean 'dim'")


def test_unknown_modality_lists_registered_ones(capsys, write_config, text_corpus, tmp_path):
    from tests.conftest import tiny_config_dict

    data = tiny_config_dict(text_corpus, tmp_path / "r")
    data["mixture"]["modalities"]["smell"] = {}
    code, _, err = run_cli(capsys, "train", write_config(data=data))
    assert_one_line_error(code, err, "unknown modality 'smell'", "registered modalities:", "text",
                          "installed plugins: autoregressive, ", '[project.entry-points."mot.plugins"]')


def test_wrong_type_names_the_key(capsys, write_config):
    code, _, err = run_cli(capsys, "train", write_config(), "train.steps=abc")
    assert_one_line_error(code, err, "train.steps", "'abc'")


def test_plugin_option_validated_by_the_plugin(capsys, write_config):
    code, _, err = run_cli(capsys, "config", "show", write_config(), "mixture.modalities.text.options.vocab_size=10")
    assert_one_line_error(code, err, "mixture.modalities.text.options.vocab_size")


def test_missing_data_path(capsys, write_config, text_corpus, tmp_path):
    from tests.conftest import tiny_config_dict

    data = tiny_config_dict(text_corpus, tmp_path / "r")
    data["mixture"]["datasets"]["text_files"]["options"]["paths"] = [str(tmp_path / "nowhere.txt")]
    code, _, err = run_cli(capsys, "train", write_config(data=data))
    assert_one_line_error(code, err, "no file found", "nowhere.txt")


def test_empty_dataset(capsys, write_config, text_corpus, tmp_path):
    from tests.conftest import tiny_config_dict

    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(5):
        (empty / f"{i}.txt").write_text("   \n")
    data = tiny_config_dict(text_corpus, tmp_path / "r")
    data["mixture"]["datasets"]["text_files"]["options"]["paths"] = [str(empty / "*.txt")]
    code, _, err = run_cli(capsys, "train", write_config(data=data))
    assert_one_line_error(code, err, "text_files", "no documents")


def test_missing_config_bad_yaml_and_bad_override(capsys, tmp_path, write_config):
    code, _, err = run_cli(capsys, "train", tmp_path / "absent.yaml")
    assert_one_line_error(code, err, "config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    code, _, err = run_cli(capsys, "train", bad)
    assert_one_line_error(code, err, "not valid YAML")
    code, _, err = run_cli(capsys, "train", write_config(), "train.steps")
    assert_one_line_error(code, err, "key=value")


class _OutOfRange(Modality):
    """A broken third-party modality whose tokenizer emits ids past its vocabulary."""

    name = "broken"

    def prepare(self, train_payloads):
        list(train_payloads)

    @property
    def vocab_size(self) -> int:
        return 10

    def encode(self, payload):
        return torch.tensor([1, 2, 10])


class _BrokenData(DataSource):
    name = "broken_data"
    modalities = ("broken",)

    def documents(self, split):
        return [RawDocument((RawSegment("broken", None),))] * 4


class _BrokenPlugin:
    @hookimpl
    def mot_modalities(self):
        return [_OutOfRange]

    @hookimpl
    def mot_datasets(self):
        return [_BrokenData]


def test_token_id_outside_vocabulary(capsys, monkeypatch, tmp_path):
    registry = build_registry((_BrokenPlugin(),))
    use_registry(monkeypatch, lambda: registry)
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "r"), "device": "cpu"},
        "mixture": {"modalities": {"broken": {}}, "datasets": {"broken_data": {}}},
    }))
    code, _, err = run_cli(capsys, "train", config)
    assert_one_line_error(code, err, "token id 10", "vocabulary of 10", "broken")


def test_eval_of_missing_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", tmp_path / "nothing")
    assert_one_line_error(code, err, "checkpoint not found")


def test_config_show_prints_resolved_config_with_plugin_defaults(capsys, write_config):
    code, out, _ = run_cli(capsys, "config", "show", write_config(), "model.dim=48", "train.steps=7")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["model"]["dim"] == 48 and shown["train"]["steps"] == 7
    assert shown["mixture"]["modalities"]["text"]["options"]["min_frequency"] == 2  # plugin default filled in
    assert shown["mixture"]["modalities"]["text"]["tower"]["qk_norm"] is False


def test_interpolation_resolves(capsys, write_config, text_corpus, tmp_path):
    from tests.conftest import tiny_config_dict

    data = tiny_config_dict(text_corpus, tmp_path / "r")
    data["model"]["max_seq_len"] = "${train.seq_len}"
    code, out, _ = run_cli(capsys, "config", "show", write_config(data=data), "train.seq_len=32")
    assert code == 0 and yaml.safe_load(out)["model"]["max_seq_len"] == 32


def test_plugins_lists_builtins_with_origin(capsys):
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    assert "text" in out and "plugins.text" in out and "mot-framework" in out
    assert "autoregressive" in out and "wikipedia" in out


def test_xformers_backend_refused_without_cuda(capsys, write_config):
    if torch.cuda.is_available():
        pytest.skip("xformers may work on this machine")
    code, _, err = run_cli(capsys, "train", write_config(), "model.attention_backend=xformers")
    assert_one_line_error(code, err, "xformers")


def test_overrides_may_stand_after_options_and_keep_their_order():
    from mot_core.cli import parse

    ns = parse(["train", "c.yaml", "train.steps=2", "--process-group", "fsdp2", "train.steps=3", "model.dim=8"])
    assert ns.overrides == ["train.steps=2", "train.steps=3", "model.dim=8"] and ns.process_group == "fsdp2"
    ns = parse(["launch", "c.yaml", "--num-workers", "2", "train.steps=4"])
    assert ns.overrides == ["train.steps=4"] and ns.num_workers == 2
    ns = parse(["sweep", "c.yaml", "--grid", "train.lr=1e-3,3e-3", "train.steps=4"])
    assert ns.overrides == ["train.steps=4"]


def test_an_override_after_launch_options_takes_effect(capsys, write_config):
    code, _, err = run_cli(capsys, "launch", write_config(), "--num-workers", "3", "train.batch_size=5")
    assert_one_line_error(code, err, "train.batch_size=5 is not divisible by 3 workers")


@pytest.mark.parametrize("argv, fragment", [
    (["launch", "c.yaml", "--num-workers", "2", "--bogus"], "mot launch: unrecognized arguments: --bogus"),
    (["launch", "c.yaml", "--num-workers", "2", "stray"], "mot launch: unrecognized arguments: stray"),
    (["generate", "runs/x", "train.steps=3"], "mot generate: unrecognized arguments: train.steps=3"),
])
def test_unrecognized_arguments_are_one_line(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and fragment in err[0], err


def test_a_whole_options_check_keeps_the_key_path():
    from pydantic import model_validator

    from mot_core.config import validate_section
    from mot_core.errors import MotError
    from mot_core.plugin_api import PluginOptions

    class Options(PluginOptions):
        low: int = 0
        high: int = 1

        @model_validator(mode="after")
        def ordered(self):
            if self.low >= self.high:
                raise ValueError("low must be below high")
            return self

    with pytest.raises(MotError) as info:
        validate_section(Options, {"low": 5}, "mixture.modalities.imu.options")
    assert str(info.value) == "config error: mixture.modalities.imu.options: low must be below high"


# Override values are read as the type of their key: YAML's special characters (`*` an alias, `&`
# an anchor, `!` a tag, `[` inside a flow list) never end in a YAML traceback or a silent null.

def test_a_glob_override_of_a_list_of_paths_is_a_list_of_strings(capsys, write_config, text_corpus, tmp_path):
    (tmp_path / "globbed").mkdir()
    for name in ("alpha_gut.txt", "beta_gut.txt", "delta_gut.txt"):
        (tmp_path / "globbed" / name).write_text("some words\n")
    option = "mixture.datasets.text_files.options.paths"
    cases = {
        f"[{tmp_path}/globbed/[a-c]*_gut.txt]": [f"{tmp_path}/globbed/[a-c]*_gut.txt"],
        f"[{tmp_path}/globbed/*.txt, {text_corpus}/a*]": [f"{tmp_path}/globbed/*.txt", f"{text_corpus}/a*"],
        f"[*_gut.txt, '{text_corpus}/x, y.txt']": ["*_gut.txt", f"{text_corpus}/x, y.txt"],
    }
    for value, expected in cases.items():
        code, out, err = run_cli(capsys, "config", "show", write_config(), f"{option}={value}")
        assert code == 0 and "Traceback" not in err, err
        assert yaml.safe_load(out)["mixture"]["datasets"]["text_files"]["options"]["paths"] == expected


def test_string_keys_take_special_characters_as_text(capsys, write_config, tmp_path):
    code, out, err = run_cli(capsys, "config", "show", write_config(), f"run.dir={tmp_path}/*run&1", "train.steps=3")
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["run"]["dir"] == f"{tmp_path}/*run&1" and shown["train"]["steps"] == 3


@pytest.mark.parametrize("override, fragments", [
    ("train.lr=*x", ["train.lr=*x", "train.lr takes a value of type float", "'*x'"]),
    ("train.lr=&x", ["train.lr=&x", "float", "'&x'"]),
    ("train.steps=*", ["train.steps=*", "of type int", "'*'"]),
    ("train.lr=[1e-3, *x", ["train.lr=[1e-3, *x", "float"]),
])
def test_an_override_that_is_not_its_keys_type_is_one_line(capsys, write_config, override, fragments):
    code, _, err = run_cli(capsys, "config", "show", write_config(), override)
    assert_one_line_error(code, err, *fragments)


def test_a_special_value_of_a_plugin_option_reaches_the_plugins_check(capsys, write_config):
    code, _, err = run_cli(capsys, "config", "show", write_config(), "mixture.modalities.text.options.vocab_size=*x")
    assert_one_line_error(code, err, "mixture.modalities.text.options.vocab_size", "'*x'")
