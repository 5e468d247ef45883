"""The GPU check (``make gpu-check``) as a dry run on the CPU: every section runs at tiny sizes
with the packages a bare CUDA machine lacks made unimportable, so the script cannot rot between
the leases of a GPU. The kit's preparation and its install step are checked here too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools.gpu import check as gpu_check
from tools.gpu.kit import kit_configs

ROOT = Path(__file__).resolve().parents[1]
# Packages of this project's dependencies that the CUDA machine's image does not hold and the
# kit does not carry (see tools/gpu/kit.py, WHEELS): the check must not need them.
NOT_ON_THE_GPU_MACHINE = ("ray", "gensim", "mlxtend", "soundfile", "espeakng_loader", "pycocoevalcap", "wandb",
                          "mlflow", "importlinter", "xformers")
BLOCKER = f'''
# As on the GPU machine: these packages are absent (find_spec gives None, import fails).
import sys
from importlib.machinery import PathFinder
class _Absent(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in {set(NOT_ON_THE_GPU_MACHINE)!r}:
            return None
        return PathFinder.find_spec(name, path, target)
sys.meta_path[:] = [_Absent if finder is PathFinder else finder for finder in sys.meta_path]
'''


def _python(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def tiny_kit(tmp_path_factory) -> Path:
    kit = tmp_path_factory.mktemp("gpu_kit")
    result = _python("-m", "tools.gpu.kit", "--out", str(kit), "--images-per-source", "100",
                     "--fit-steps", "3", "--no-wheels", "--tiny")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return kit


@pytest.mark.slow
def test_the_dry_run_passes_every_section_without_the_packages_the_gpu_machine_lacks(tiny_kit, tmp_path):
    blocker = tmp_path / "image"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    probe = _python("-c", "import ray", env={"PYTHONPATH": str(blocker)})
    assert "No module named 'ray'" in probe.stderr  # the simulation holds in child processes
    out = tmp_path / "out"
    result = _python("-m", "tools.gpu.check", "--dry-run", "--kit", str(tiny_kit), "--out", str(out),
                     env={"PYTHONPATH": str(blocker)})
    report = json.loads((out / "gpu_check.json").read_text())
    log = (out / "gpu_check.log").read_text()
    assert result.returncode == 0, result.stdout + log[-6000:]
    assert set(report["sections"]) == set(gpu_check.SECTIONS)
    assert all(s["status"] == "ok" for s in report["sections"].values()), report["summary"]["lines"]
    sections = {name: entry["result"] for name, entry in report["sections"].items()}
    assert sections["environment"]["packages"]["ray"] is None and "image" in sections["environment"]["modalities"]
    assert sections["gpu_tests"]["counts"]["skipped"] >= 5  # collected, CUDA-only
    assert "test_cuda_paths.py" in sections["gpu_tests"]["files"]
    assert sections["grouped_mm"]["empty_group_weight_grad_is_zero"]
    bench = sections["throughput"]
    assert set(bench["by_dtype"]) == {"fp32", "bf16"} and set(bench["bf16_speedup"]) == {"dense", "mot", "naive", "moe4x"}
    for setting in ("train_chameleon", "train_transfusion", "fsdp2"):
        assert sections[setting]["steps"] == 4 and sections[setting]["loss_last_quarter"] > 0
    assert (out / "chameleon_samples.png").is_file() and (out / "transfusion_samples.png").is_file()
    assert "fsdp2, gloo, bf16, device: cpu" in sections["fsdp2"]["runtime"]
    assert any(line.startswith("throughput_bf16: MoT/dense") for line in report["summary"]["lines"])
    # what comes back from the machine: few files, none deeper than two folders
    assert sorted(p.name for p in out.iterdir()) == ["chameleon_samples.png", "gpu_check.json", "gpu_check.log",
                                                      "transfusion_samples.png"]


def test_the_kit_configs_are_the_examples_pointed_at_the_kit():
    kit = ROOT / ".gpu-kit"
    configs = kit_configs(kit, images_per_source=50, fit_steps=7, tiny=False)
    for setting, example, modality in (("chameleon", "chameleon_mot", "image"),
                                       ("transfusion", "transfusion_mot", "image_diffusion")):
        original = yaml.safe_load((ROOT / "examples" / "configs" / f"{example}.yaml").read_text())
        data = configs[setting]
        assert data["model"] == original["model"] and data["train"] == original["train"]
        assert list(data["mixture"]["datasets"]) == ["captioned_images"]  # Wikipedia stays here
        options = data["mixture"]["modalities"][modality]["options"]
        assert options["tokenizer_dir"] == f".gpu-kit/tokenizers/{modality}"  # relative: holds on the machine
        assert options["fit"]["steps"] == 7
        assert data["mixture"]["datasets"]["captioned_images"]["options"]["root"] == ".gpu-kit/data/captioned_images"


def test_the_install_step_installs_the_project_for_its_entry_points(tmp_path, monkeypatch):
    """On the bare machine the project is not installed: the check installs it (no index, no
    build isolation) into its own folder, whose entry points then find the built-in plugins."""
    import importlib.metadata

    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with open(tmp_path / "log", "w") as log:
        done = gpu_check.install_kit(kit, tmp_path / "site", log)
    assert done["project"] and done["site"] == str(tmp_path / "site")
    probe = subprocess.run(
        [sys.executable, "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); import importlib.metadata as m; "
         "print(sorted(e.name for e in m.entry_points(group='mot.plugins')))", str(tmp_path / "site")],
        capture_output=True, text=True, cwd=tmp_path)
    assert "'image_vq'" in probe.stdout and "'text'" in probe.stdout, probe.stderr


@pytest.mark.parametrize("args, message", [
    (["--only", "nope"], "unknown section(s) nope"),
    (["--kit", "/nonexistent"], "is not a GPU-check kit (no kit.json); prepare one with `make gpu-kit`"),
])
def test_bad_gpu_check_input_is_one_line(tmp_path, args, message):
    result = _python("-m", "tools.gpu.check", "--out", str(tmp_path / "o"), "--kit", str(tmp_path), *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, \
        result.stderr
