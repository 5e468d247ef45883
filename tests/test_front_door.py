"""The front door: one YAML file is one run, whichever command runs it.

- Every config in examples/configs/ resolves to the same config through every entry point:
  `mot config show`, `mot train`, `mot launch` (its driver, and a worker from what the driver
  sends it), a `mot sweep` trial and `mot train --process-group` (each captured where it would
  hand the config to `start_run`; only where the run lives and how it is launched differ).
- A resume that adds a dataset or changes a modality option is refused the same way under
  `mot train`, `mot launch` and `--process-group`, before anything is written: the run folder
  stays byte-identical (every file hashed, tokens/ and state/ included). A resume whose
  pretrained folder has moved continues under all three, reading the shapes it recorded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT, tiny_config_dict
from mot_core.cli import main

CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
# Where a run lives, how it is launched and how a sweep is planned: set by each entry point.
PLUMBING = ("launch", "sweep")


class Captured(Exception):
    """Raised by a stand-in for start_run: the entry point got as far as starting the run."""

    def __init__(self, config):
        super().__init__("captured")
        self.config = config


def _what_runs(config) -> dict:
    """The resolved config a run records (its config.yaml), without the entry point's plumbing."""
    from mot_core.experiment.build import build_experiment

    data = yaml.safe_load(build_experiment(config).resolved_yaml())
    for key in PLUMBING:
        data.pop(key)
    data["run"].pop("dir")
    return data


def _capture_start(monkeypatch, module: str) -> None:
    def start_run(config, runtime, execute=None):
        raise Captured(config)

    monkeypatch.setattr(f"{module}.start_run", start_run)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, text_corpus) -> Path:
    from test_pretrained import hf_folder

    return hf_folder(tmp_path_factory.mktemp("hf"), text_corpus, "tiny_llama", num_attention_heads=4,
                     num_key_value_heads=2)


def _overrides(config: Path, checkpoint: Path, tmp_path: Path) -> list[str]:
    """A config that starts from a pretrained model points at the tiny checkpoint built here;
    the cluster config's shared folders become folders of this test."""
    text = config.read_text()
    overrides = [f"model.init_from.path={checkpoint}"] if "init_from" in text else []
    if "/shared/" in text:
        overrides += [f"run.dir={tmp_path}/shared/run", f"launch.storage_path={tmp_path}/shared/checkpoints"]
    return overrides


@pytest.fixture
def registry_with_example_plugin(plugin_site, monkeypatch):
    """The installed example plugin (the time-series configs), as `pip install` would make it."""
    import registry.manager

    monkeypatch.syspath_prepend(str(plugin_site))
    registry.manager.get_registry.cache_clear()
    yield
    registry.manager.get_registry.cache_clear()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_entry_point_runs_the_same_config(config, tmp_path, monkeypatch, capsys, hf_checkpoint,
                                                registry_with_example_plugin):
    from mot_core.distributed import launch as launch_module
    from mot_core.distributed.ray_train import worker_config
    from mot_core.distributed.sweep import plan_sweep, trial_config

    monkeypatch.chdir(tmp_path)  # relative run folders and data paths land here
    overrides = _overrides(config, hf_checkpoint, tmp_path)
    seen: dict[str, dict] = {}

    assert main(["config", "show", str(config), *overrides]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    for key in PLUMBING:
        shown.pop(key)
    shown["run"].pop("dir")
    seen["config show"] = shown

    _capture_start(monkeypatch, "mot_core.runs.start")
    with pytest.raises(Captured) as train:
        main(["train", str(config), *overrides])
    seen["train"] = _what_runs(train.value.config)

    _capture_start(monkeypatch, "mot_core.distributed.process_group")
    monkeypatch.setattr("mot_core.distributed.process_group.dist",
                        SimpleNamespace(init_process_group=lambda *a, **k: None, destroy_process_group=lambda: None))
    with pytest.raises(Captured) as group:
        main(["train", str(config), *overrides, "--process-group", "fsdp2"])
    seen["train --process-group"] = _what_runs(group.value.config)

    def driver_starts(config, runtime, execute=None):  # the driver hands its run to the workers
        return execute(SimpleNamespace(config=config, latest=None, fingerprints=None,
                                       exp=SimpleNamespace(modalities={})), runtime)

    def workers(run, driver, plan):
        markers = {"data": "unused", "run": "unused"}
        seen["launch worker"] = _what_runs(worker_config(launch_module.worker_loop_config(run, driver, plan, markers)))
        return {}

    monkeypatch.setattr("mot_core.distributed.launch.start_run", driver_starts)
    monkeypatch.setattr("mot_core.distributed.launch._fit", workers)
    driven, _ = launch_module.launch(str(config), overrides, num_workers=1, gpus_per_worker=0)
    seen["launch driver"] = _what_runs(driven)

    plan = plan_sweep(str(config), overrides, [], str(tmp_path / "sweep"))
    plain = next(t for t in plan.trials if not t.settings)  # the trial with no setting of its own
    seen["sweep trial"] = _what_runs(trial_config(plan.configs, plain.name))

    reference = seen.pop("config show")
    for entry_point, data in seen.items():
        assert data == reference, f"{entry_point} runs another config than `mot config show` shows"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "shared").exists(), "resolving wrote a run folder"


# -- resumes: the same refusals and the same moved-folder resume under every way of training --

def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (tokens/, state/, checkpoints, logs) and its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _mot(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mot_core.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


WAYS = {
    "train": [],
    "launch": ["--num-workers", "1"],
    "process-group": ["--process-group", "fsdp2"],
}


def _command(way: str, config: Path, *overrides: str) -> list[str]:
    verb = "launch" if way == "launch" else "train"
    return [verb, str(config), *overrides, *WAYS[way]]


@pytest.mark.slow
@pytest.mark.parametrize("way", list(WAYS))
def test_a_resume_is_refused_or_continued_alike_by_every_way_of_training(way, tmp_path, text_corpus,
                                                                         hf_checkpoint):
    """A run started from a pretrained model (2 steps, a checkpoint), then: a dataset added
    and a modality option changed are refused in one line naming the key, leaving every file
    of the run folder as it was; with the pretrained folder moved away, the run continues to
    step 4 from its checkpoint."""
    pretrained = tmp_path / "pretrained"
    shutil.copytree(hf_checkpoint, pretrained)
    data = tiny_config_dict(text_corpus, tmp_path / "run", steps=2, checkpoint_every=2, eval_every=2)
    data["model"] = {"max_seq_len": 64, "init_from": {"path": str(pretrained)}}
    data["train"]["batch_size"] = 2
    data["mixture"]["modalities"]["text"]["options"] = {"tokenizer_path": str(pretrained)}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    first = _mot(tmp_path, *_command(way, config))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "run"
    before = _digest(run)
    assert any(name.startswith("tokens/") for name in before) and any(name.startswith("state/") for name in before)

    refusals = {
        "mixture.datasets.wikipedia.weight=1.0": "mixture.datasets: the config adds the dataset 'wikipedia', which",
        "mixture.modalities.text.options.min_frequency=3": "mixture.modalities.text.options.min_frequency was 2 when",
    }
    for override, message in refusals.items():
        refused = _mot(tmp_path, *_command(way, config, override, "train.steps=4"))
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "cannot change when a run resumes" in lines[0], lines
        assert _digest(run) == before, f"{override} changed the run folder under {way}"

    pretrained.rename(tmp_path / "moved")  # the folder init_from names is gone: its shapes are in the run
    resumed = _mot(tmp_path, *_command(way, config, "train.steps=4"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_one_way_of_training_does_not_lose_the_steps_another_took(tmp_path, text_corpus):
    """`--process-group` after `mot train` continued its run, and `mot train` after the sharded
    checkpoints went past its newest: each is one line naming the newer checkpoint and who
    wrote it, and the run folder stays as it was; a run continued in order trains on."""
    data = tiny_config_dict(text_corpus, tmp_path / "run", steps=2, checkpoint_every=2, eval_every=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    group = ["--process-group", "fsdp2"]

    def mot(*args):
        result = _mot(tmp_path, *args)
        return result.returncode, result.stdout[-2000:] + result.stderr[-2000:]

    assert mot("train", str(config), *group)[0] == 0  # sharded step 2, exported as mot train's step 2
    assert mot("train", str(config), "train.steps=4")[0] == 0  # mot train continues the export
    before = _digest(run)
    code, out = mot("train", str(config), "train.steps=6", *group)
    assert code == 2 and "holds a `mot train` checkpoint of step 4 and `mot train --process-group`'s newest is " \
        "step 2" in out, out
    assert _digest(run) == before

    other = tmp_path / "other"
    data["run"]["dir"] = str(other)
    config.write_text(yaml.safe_dump(data))
    assert mot("train", str(config), *group)[0] == 0
    assert mot("train", str(config), "train.steps=4", *group)[0] == 0
    shutil.rmtree(other / "checkpoints" / "step_0000004")  # as if the run ended between its last save and the export
    before = _digest(other)
    code, out = mot("train", str(config), "train.steps=6")
    assert code == 2 and "holds a checkpoint of step 4 from `mot train --process-group` and `mot train`'s newest is " \
        "step 2" in out, out
    assert _digest(other) == before
