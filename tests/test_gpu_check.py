"""The GPU check (``make gpu-check``) as a dry run on the CPU: every section runs at tiny sizes
with the packages a bare CUDA machine lacks made unimportable, so the script cannot rot between
the leases of a GPU. The kit's preparation and its install step are checked here too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    assert set(report["sections"]) == set(gpu_check.SECTIONS) and not report["plan"]["dropped"]
    # every section ran and passed, but the compiled bench, which a dry run does not run: skipped, not ok
    compiled = report["sections"].pop("throughput_compiled")
    assert compiled["status"] == "skipped" and "not run in a dry run" in compiled["reason"]
    assert all(s["status"] == "ok" and "left_behind" not in s for s in report["sections"].values()), \
        report["summary"]["lines"]
    assert "no child left" in log and "STILL ALIVE" not in log
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


# A section that overruns: it starts a shell that ignores SIGTERM (so SIGKILL has to follow) and
# sleeps in a grandchild, and a sleep that starts a session of its own (out of the group), then
# sleeps; every pid is written down for the test.
OVERRUN = """
import os, subprocess, sys, time
pids = sys.argv[1]
shell = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & echo $! > " + pids + "/grandchild.tmp; "
                          "mv " + pids + "/grandchild.tmp " + pids + "/grandchild; wait"])
escaped = subprocess.Popen(["sleep", "60"], start_new_session=True)
for name, pid in (("section", os.getpid()), ("shell", shell.pid), ("escaped", escaped.pid)):
    with open(os.path.join(pids, name), "w") as f:
        f.write(str(pid))
time.sleep(60)
"""
# A section that writes its result and ends, leaving a sleep behind in its group.
LEAVES_A_CHILD = """
import json, os, subprocess, sys
work, pids = sys.argv[1], sys.argv[2]
child = subprocess.Popen(["sleep", "60"])
with open(os.path.join(pids, "leftover"), "w") as f:
    f.write(str(child.pid))
with open(os.path.join(work, "section_environment.json"), "w") as f:
    json.dump({"status": "ok", "result": {}}, f)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not): psutil, else /proc."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    if Path("/proc/self/stat").is_file():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2] not in "ZXx"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _fake_kit(tmp_path: Path) -> tuple[Path, Path, Path]:
    kit, out, work = tmp_path / "kit", tmp_path / "out", tmp_path / "work"
    for folder in (kit, out, work):
        folder.mkdir()
    (kit / "kit.json").write_text("{}")
    return kit, out, work


def test_a_section_past_its_limit_is_killed_with_its_whole_process_tree(tmp_path, monkeypatch, capsys):
    kit, out, work = _fake_kit(tmp_path)
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setattr(gpu_check, "_section_command", lambda *_: [sys.executable, "-c", OVERRUN, str(pids)])
    monkeypatch.setitem(gpu_check.LIMITS, "environment", 1)  # 3 s in a dry run
    monkeypatch.setattr(gpu_check, "KILL_GRACE_S", 1.0)
    code = gpu_check.run_check(("environment",), kit, out, work, gpu_check.DEFAULT_BUDGET_S, dry_run=True)
    printed = capsys.readouterr().out
    tree = {name: int((pids / name).read_text()) for name in ("section", "shell", "grandchild", "escaped")}
    report = json.loads((out / "gpu_check.json").read_text())
    entry = report["sections"]["environment"]
    assert code == 1 and entry["status"] == "timeout", entry
    assert entry["killed"]["signals"] == ["SIGTERM", "SIGKILL"]  # the shell ignored SIGTERM
    assert set(tree.values()) <= set(entry["killed"]["pids"]) and entry["killed"]["left"] == []
    assert "did not finish in 3 s; killed its process group" in entry["error"] and "no child left" in entry["error"]
    assert not [name for name, pid in tree.items() if _alive(pid)]  # none of the tree survived
    assert "environment timeout: did not finish in 3 s" in printed
    with capsys.disabled():  # the dry run's lines, for the record
        print("\n" + printed.rstrip())


def test_a_process_a_section_leaves_behind_is_killed_and_reported(tmp_path, monkeypatch, capsys):
    kit, out, work = _fake_kit(tmp_path)
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setattr(gpu_check, "_section_command",
                        lambda name, kit, out, work, dry_run: [sys.executable, "-c", LEAVES_A_CHILD, str(work), str(pids)])
    code = gpu_check.run_check(("environment",), kit, out, work, gpu_check.DEFAULT_BUDGET_S, dry_run=True)
    printed = capsys.readouterr().out
    leftover = int((pids / "leftover").read_text())
    entry = json.loads((out / "gpu_check.json").read_text())["sections"]["environment"]
    assert code == 0 and entry["status"] == "ok" and entry["left_behind"]["pids"] == [leftover]
    assert entry["left_behind"]["signals"] == ["SIGTERM"] and entry["left_behind"]["left"] == []
    assert not _alive(leftover)
    assert "environment: killed its process group (1 process: SIGTERM), no child left" in printed


def test_the_section_limits_fit_the_budget_and_the_lowest_priority_is_dropped_first():
    limits, priority = gpu_check.LIMITS, gpu_check.PRIORITY
    assert set(limits) == set(gpu_check.SECTIONS) == set(priority) and len(priority) == len(set(priority))
    room = gpu_check.DEFAULT_BUDGET_S - gpu_check.STARTUP_MARGIN_S
    assert sum(limits.values()) <= room
    assert gpu_check.plan(gpu_check.SECTIONS, gpu_check.DEFAULT_BUDGET_S) == (list(priority), {})
    # cut the budget step by step: what runs is the top of the priority list and fits; the bottom goes first
    first_dropped: list[str] = []
    for budget in range(int(gpu_check.DEFAULT_BUDGET_S), int(gpu_check.STARTUP_MARGIN_S) - 1, -5):
        run, dropped = gpu_check.plan(tuple(reversed(gpu_check.SECTIONS)), budget)  # the order asked for is irrelevant
        assert run == list(priority[: len(run)]) and list(dropped) == list(priority[len(run) :])
        assert sum(limits[name] for name in run) <= budget - gpu_check.STARTUP_MARGIN_S
        first_dropped += [name for name in reversed(dropped) if name not in first_dropped]
    assert first_dropped == list(reversed(priority))
    run, dropped = gpu_check.plan(gpu_check.SECTIONS, 400)
    assert run == list(priority[:-1]) and list(dropped) == ["throughput_compiled"]
    assert dropped["throughput_compiled"] == ("not planned: the 400 s budget less the 30 s start-up margin leaves 55 s "
                                              "after the sections above it, its limit is 105 s")


def test_a_section_whose_limit_exceeds_the_time_left_is_not_started(tmp_path, monkeypatch):
    """The plan holds a start-up margin; when the start-up takes longer, what no longer fits is
    not started: reported skipped with the reason, with everything below it."""
    kit, out, work = _fake_kit(tmp_path)
    started = []
    monkeypatch.setattr(gpu_check, "_section_command", lambda *args: started.append(args) or ["false"])
    monkeypatch.setattr(gpu_check, "install_kit", lambda *_: time.sleep(1.5) or {"site": None})
    monkeypatch.setattr(gpu_check, "STARTUP_MARGIN_S", 0.0)
    monkeypatch.setitem(gpu_check.LIMITS, "environment", 0.6)  # 1.8 s in a dry run
    monkeypatch.setitem(gpu_check.LIMITS, "throughput", 0.2)
    code = gpu_check.run_check(("throughput", "environment"), kit, out, work, budget_s=0.8, dry_run=True)
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["plan"]["run"] == ["environment", "throughput"] and not started and code == 0
    environment, throughput = report["sections"]["environment"], report["sections"]["throughput"]
    assert environment["status"] == throughput["status"] == "skipped"
    assert environment["reason"].startswith("not started: its 2 s limit exceeds the 0.")
    assert throughput["reason"] == "not started: dropped with environment, which is above it in priority (the budget ran short)"


def test_a_dry_run_reports_what_it_did_not_run_as_skipped_not_ok(tmp_path):
    kit, out, _ = _fake_kit(tmp_path)
    result = _python("-m", "tools.gpu.check", "--dry-run", "--only", "throughput_compiled", "--kit", str(kit),
                     "--out", str(out), timeout=120)
    report = json.loads((out / "gpu_check.json").read_text())
    entry = report["sections"]["throughput_compiled"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert entry["status"] == "skipped" and entry["reason"].startswith("not run in a dry run"), entry
    assert "throughput_compiled skipped" in result.stdout and "throughput_compiled ok" not in result.stdout


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
