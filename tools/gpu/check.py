"""The GPU check: every CUDA path and the GPU figures from one command that fits a short lease.

    make gpu-kit      # here, once: wheels, captioned images and fitted tokenizers into .gpu-kit/
    make gpu-check    # on the CUDA machine (carry .gpu-kit): python3 -m tools.gpu.check

The machine it is written for is bare: torch is there, but not pydantic, omegaconf, diffusers or
Ray, nothing can be downloaded, and the lease is short. So the check installs the kit's wheels
into a folder of its own (``--site``), needs no Ray, and runs its sections one after another,
each in a process group of its own with a time limit, the limits together within one budget, so
that a hang or a crash costs one section, not the lease. Everything lands in ``--out``:
``gpu_check.json`` (every section's status, figures and errors), ``gpu_check.log`` (every
section's output) and the sample grids of the two training runs.

Sections, in the order they run, which is also their priority (what is dropped first when
time runs short is the bottom of this list), with each one's time limit on the GPU:
  environment          15 s  torch, CUDA, the card, which optional packages import
  throughput           60 s  ``mot bench throughput`` in bf16 at a size that keeps the card busy:
                             dense, MoT, naive, MoE-4x; step times, MoT/dense, tokens/s, MFU
  grouped_mm           25 s  torch._grouped_mm against the per-modality loop and an fp32
                             reference, outputs and gradients, one modality without tokens; timed
  gpu_tests            75 s  the test suite's ``gpu``-marked tests
  train_chameleon      50 s  a short bf16 ``mot train`` of the Chameleon setting, ``mot generate``
  fsdp2                40 s  FSDP2 over NCCL, world size 1, through ``mot train --process-group
                             fsdp2`` (mot launch's runtime without Ray)
  train_transfusion    50 s  the same as train_chameleon for Transfusion (diffusion sampling)
  throughput_compiled 105 s  the throughput bench under torch.compile, at 4 layers (compiling is
                             slow; dropped first)
The limits add up to 420 s: the 450 s budget less a 30 s start-up margin (installing the kit).

The budget is kept three ways. The plan: with ``--budget-s`` cut, the sections are taken in
priority order while their limits fit the budget less the margin; the rest are dropped and
reported skipped with the reason. At run time: a section whose limit exceeds the time left is
not started; it and every section below it are reported skipped with the reason. The kill: each
section runs in a process group (a session) of its own, and at its limit the whole group gets
SIGTERM, then SIGKILL after a short grace, so that no ``pytest`` or ``mot train`` it started
outlives it and holds the card through the next sections; the group is emptied the same way when
a section ends by itself, and the report says whether any process was left.

``--dry-run`` runs the same sections on the CPU at tiny sizes (the test suite does, so the
script cannot rot between leases), with the budget and every limit three times the GPU's (the
same plan). A section a dry run does not run (the compiled bench) is reported skipped, with why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The sections in priority order, which is also the order they run in: when time runs short the
# last ones are dropped first (throughput_compiled, then train_transfusion, fsdp2, ...).
SECTIONS = ("environment", "throughput", "grouped_mm", "gpu_tests", "train_chameleon", "fsdp2", "train_transfusion",
            "throughput_compiled")
PRIORITY = SECTIONS
# Seconds each section may take on the GPU: at its limit its whole process group is killed.
LIMITS = {"environment": 15, "throughput": 60, "grouped_mm": 25, "gpu_tests": 75, "train_chameleon": 50, "fsdp2": 40,
          "train_transfusion": 50, "throughput_compiled": 105}
DEFAULT_BUDGET_S = 450.0  # the whole check's wall time, installing the kit included
STARTUP_MARGIN_S = 30.0  # held back from the budget for installing the kit and starting up
DRY_RUN_SCALE = 3.0  # a dry run's budget, margin and limits are this many times the GPU's (a slow CPU)
KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL to a section's process group
# Packages the sections import that a bare CUDA machine may lack (reported, not required here).
PACKAGES = ("pydantic", "omegaconf", "pluggy", "pyarrow", "tokenizers", "safetensors", "diffusers", "torchvision",
            "torchmetrics", "transformers", "xformers", "ray", "triton")
IMAGE_MODALITY = {"chameleon": "image", "transfusion": "image_diffusion"}


# --------------------------------------------------------------------------------------------
# The driver: install, plan, then each section in its own process group
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_check", help="gpu_check.json, gpu_check.log and sample grids")
    parser.add_argument("--kit", default=".gpu-kit", help="the folder `make gpu-kit` prepared")
    parser.add_argument("--work", default=None, help="run folders and installed packages (default: <out>/../gpu_check_work)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall time for the whole check; sections that do not fit are dropped, lowest priority first")
    parser.add_argument("--only", default=None, help="comma-separated sections to run (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (the test suite's check)")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # run one section (internal)
    ns = parser.parse_args(argv)
    out, kit = Path(ns.out).resolve(), Path(ns.kit).resolve()
    work = Path(ns.work).resolve() if ns.work else out.parent / f"{out.name}_work"
    if ns.section:
        return _run_section(ns.section, kit, out, work, ns.dry_run)
    only = SECTIONS if ns.only is None else tuple(s.strip() for s in ns.only.split(",") if s.strip())
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if not (kit / "kit.json").is_file():
        print(f"error: {kit} is not a GPU-check kit (no kit.json); prepare one with `make gpu-kit`", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    return run_check(only, kit, out, work, ns.budget_s, ns.dry_run)


def plan(sections: tuple[str, ...], budget_s: float) -> tuple[list[str], dict[str, str]]:
    """The sections to run, in priority order, and the reason each dropped one is dropped: they
    are taken in priority order while their limits (GPU seconds) fit the budget less the
    start-up margin; the first that does not fit and every one below it are dropped."""
    ordered = sorted(dict.fromkeys(sections), key=PRIORITY.index)
    room = budget_s - STARTUP_MARGIN_S
    keep: list[str] = []
    for index, name in enumerate(ordered):
        used = sum(LIMITS[k] for k in keep)
        if used + LIMITS[name] > room:
            why = (f"not planned: the {budget_s:.0f} s budget less the {STARTUP_MARGIN_S:.0f} s start-up margin "
                   f"leaves {room - used:.0f} s after the sections above it, its limit is {LIMITS[name]} s")
            dropped = {name: why}
            dropped.update({k: f"not planned: dropped with {name}, which is above it in priority (the budget is short)"
                            for k in ordered[index + 1 :]})
            return keep, dropped
        keep.append(name)
    return keep, {}


def run_check(sections: tuple[str, ...], kit: Path, out: Path, work: Path, budget_s: float, dry_run: bool) -> int:
    started = time.monotonic()
    scale = DRY_RUN_SCALE if dry_run else 1.0
    log_path = out / "gpu_check.log"
    to_run, dropped = plan(sections, budget_s)
    report: dict = {"dry_run": dry_run, "budget_s": budget_s, "time_scale": scale,
                    "plan": {"run": to_run, "dropped": dropped, "limits_s": {n: LIMITS[n] * scale for n in to_run},
                             "startup_margin_s": STARTUP_MARGIN_S * scale},
                    "kit": json.loads((kit / "kit.json").read_text()), "sections": {}}
    print(f"gpu check: budget {budget_s * scale:.0f} s{f' (a dry run: {scale:g}x the GPU times)' if dry_run else ''}; plan " + ", ".join(f"{n} {LIMITS[n] * scale:.0f} s" for n in to_run)
          + (f"; dropped (lowest priority first): {', '.join(dropped)}" if dropped else ""), flush=True)
    previous = signal.getsignal(signal.SIGTERM)
    if _main_thread():  # killed from outside (the lease ends): the running section's group goes too
        signal.signal(signal.SIGTERM, _terminated)
    try:
        with open(log_path, "w") as log:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            installed = install_kit(kit, work / "site", log)
            report["install"] = installed
            if installed.get("site"):
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), installed["site"], env.get("PYTHONPATH")]))
            for index, name in enumerate(to_run):
                left = budget_s * scale - (time.monotonic() - started)
                limit = LIMITS[name] * scale
                if limit > left:  # never start what cannot finish: it and everything below it are skipped
                    report["sections"][name] = {"status": "skipped", "reason": (
                        f"not started: its {limit:.0f} s limit exceeds the {max(left, 0):.1f} s left of the budget")}
                    for below in to_run[index + 1 :]:
                        report["sections"][below] = {"status": "skipped", "reason": (
                            f"not started: dropped with {name}, which is above it in priority (the budget ran short)")}
                    break
                report["sections"][name] = _spawn(name, kit, out, work, dry_run, env, limit, log)
                _write(out / "gpu_check.json", report)
            for name, why in dropped.items():
                report["sections"][name] = {"status": "skipped", "reason": why}
            report["wall_s"] = time.monotonic() - started
            report["summary"] = summarize(report)
            _write(out / "gpu_check.json", report)
    finally:
        if _main_thread():
            signal.signal(signal.SIGTERM, previous)
    print("\n".join(report["summary"]["lines"]))
    print(f"wrote {out / 'gpu_check.json'} and {log_path}")
    return 0 if report["summary"]["failed"] == 0 else 1


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through _spawn, which kills the running section's group


def install_kit(kit: Path, site: Path, log) -> dict:
    """The kit's wheels and this project (for its plugins' entry points) into ``site``, where
    they are missing: nothing is downloaded. Returns what was done."""
    import importlib.metadata
    import importlib.util

    done: dict = {"site": None, "wheels": [], "project": False}
    missing = [name for name in ("pydantic", "omegaconf", "diffusers") if importlib.util.find_spec(name) is None]
    try:
        importlib.metadata.distribution("mot-framework")
        project_missing = False
    except importlib.metadata.PackageNotFoundError:
        project_missing = True
    if not missing and not project_missing:
        return done
    site.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(site), "--upgrade"]
    wheels = sorted((kit / "wheels").glob("*.whl"))
    if missing and wheels:
        _call(pip + [str(w) for w in wheels], log, "install the kit's wheels")
        done["wheels"] = [w.name for w in wheels]
    if project_missing:  # the plugins are found through the project's entry points
        _call(pip + ["--no-build-isolation", str(ROOT)], log, "install this project (entry points)")
        done["project"] = True
    done["site"] = str(site)
    return done


def _call(command: list[str], log, what: str) -> None:
    log.write(f"== {what}: {' '.join(command)}\n")
    log.flush()
    result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"error: could not {what} (exit {result.returncode}); see the log")


def _section_command(name: str, kit: Path, out: Path, work: Path, dry_run: bool) -> list[str]:
    return [sys.executable, "-m", "tools.gpu.check", "--section", name, "--kit", str(kit), "--out", str(out),
            "--work", str(work)] + (["--dry-run"] if dry_run else [])


def _spawn(name: str, kit: Path, out: Path, work: Path, dry_run: bool, env: dict, limit: float, log) -> dict:
    """One section in a session (process group) of its own, killed whole at ``limit``; its
    group is emptied when it ends by itself too."""
    log.write(f"\n== section {name} (limit {limit:.0f} s)\n")
    log.flush()
    print(f"gpu check: {name} (limit {limit:.0f} s)", flush=True)
    result_file = work / f"section_{name}.json"
    result_file.unlink(missing_ok=True)
    start = time.monotonic()
    process = subprocess.Popen(_section_command(name, kit, out, work, dry_run), stdout=log, stderr=subprocess.STDOUT,
                               cwd=ROOT, env=env, start_new_session=True)
    code, timed_out = None, False
    try:
        code = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # also when the driver itself is interrupted or terminated
        ended = end_process_group(process, KILL_GRACE_S)
    seconds = time.monotonic() - start
    cleanup = _describe_cleanup(ended)
    log.write(f"== section {name}: {'timed out; ' if timed_out else ''}{cleanup}\n")
    log.flush()
    if timed_out:
        return {"status": "timeout", "seconds": seconds, "error": f"did not finish in {limit:.0f} s; {cleanup}",
                "killed": ended}
    entry = json.loads(result_file.read_text()) if result_file.is_file() else {
        "status": "failed", "error": f"the section's process exited {code} without a result (see the log)"}
    entry["seconds"] = seconds
    if ended["pids"]:  # it left processes behind: killed, and said
        entry["left_behind"] = {**ended, "note": cleanup}
    return entry


def _describe_cleanup(ended: dict) -> str:
    if not ended["pids"]:
        return "its process group was already empty, no child left"
    how = ", then ".join(ended["signals"]) or "no signal"
    tail = "no child left" if not ended["left"] else f"STILL ALIVE: {', '.join(map(str, ended['left']))}"
    count = len(ended["pids"])
    return f"killed its process group ({count} process{'es' if count > 1 else ''}: {how}), {tail}"


# --------------------------------------------------------------------------------------------
# Process groups: find, kill and check a section's whole tree
# --------------------------------------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, int, bool]] | None:
    """pid -> (parent pid, process group, alive) for every process (a zombie is not alive),
    from /proc, else psutil; None where neither is there."""
    proc = Path("/proc")
    if (proc / "self" / "stat").is_file():
        table = {}
        for entry in os.scandir(proc):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
            table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0] not in ("Z", "X", "x"))
        return table
    try:
        import psutil
    except ImportError:
        return None
    table = {}
    for process in psutil.process_iter():
        try:
            table[process.pid] = (process.ppid(), os.getpgid(process.pid),
                                  process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD))
        except (psutil.Error, OSError):
            continue
    return table


def _group_alive(pgid: int, members: set[int]) -> list[int]:
    """The live processes of the group, and of ``members`` (descendants that may have left it)."""
    table = _process_table()
    if table is None:  # no process table: the group answering signal 0 is all there is to go on
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    return sorted(pid for pid, (_, group, alive) in table.items() if alive and (group == pgid or pid in members))


def _descendants(root: int, table: dict[int, tuple[int, int, bool]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def end_process_group(process: subprocess.Popen, grace_s: float) -> dict:
    """Kill the process group ``process`` leads (started with ``start_new_session``) and every
    descendant of it: SIGTERM, then SIGKILL after ``grace_s``; reap ``process``. Returns the
    pids found, the signals sent and the pids still alive after (none, unless unkillable)."""
    pgid = process.pid
    table = _process_table() or {}
    members = _descendants(pgid, table) | {pid for pid, (_, group, alive) in table.items() if group == pgid and alive}
    members.discard(os.getpid())
    found = sorted(set(_group_alive(pgid, members)) | ({pgid} if process.poll() is None else set()))
    signals: list[str] = []
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        alive = _group_alive(pgid, members)
        if not alive and process.poll() is not None:
            break
        signals.append(sig.name)
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in alive:  # descendants that started a group of their own
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            process.poll()  # reap the leader: a zombie is dead
            if process.returncode is not None and not _group_alive(pgid, members):
                break
            time.sleep(0.05)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    left = _group_alive(pgid, members)
    return {"pids": found, "signals": signals, "left": left}


def _run_section(name: str, kit: Path, out: Path, work: Path, dry_run: bool) -> int:
    """In the section's own process: run it, write its result for the driver. A section that
    returns ``{"not_run": why}`` did not run: it is reported skipped with why, never ok."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = SECTION_FUNCTIONS[name](kit, out, work, dry_run)
        if "not_run" in result:
            entry = {"status": "skipped", "reason": result["not_run"]}
        else:
            entry = {"status": "failed" if result.pop("failures", None) else "ok", "result": result}
            if entry["status"] == "failed":
                entry["error"] = "; ".join(result.get("problems", [])) or "see the result"
    except Exception as exc:  # the driver records it and goes on with the next section
        traceback.print_exc()
        entry = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
    (work / f"section_{name}.json").write_text(json.dumps(entry, indent=2, default=str))
    return 0


def _write(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def environment(kit: Path, out: Path, work: Path, dry_run: bool) -> dict:
    import importlib.metadata
    import importlib.util

    import torch

    from mot_core.devices.device import native_bf16_cpu

    info: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                  "torch_cuda": torch.version.cuda, "grouped_mm": hasattr(torch, "_grouped_mm"),
                  "cpu_native_bf16": native_bf16_cpu(honour_override=False), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                    multiprocessors=props.multi_processor_count, devices=torch.cuda.device_count(),
                    nccl=torch.distributed.is_nccl_available(), bf16_supported=torch.cuda.is_bf16_supported())
    packages = {}
    for name in PACKAGES:
        if importlib.util.find_spec(name) is None:
            packages[name] = None
            continue
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = "importable"
    info["packages"] = packages
    from registry.manager import get_registry

    info["modalities"] = get_registry().names("modalities")
    problems = [] if dry_run or info["cuda_available"] else ["no CUDA device"]
    return {**info, "problems": problems, "failures": bool(problems)}


def grouped_mm(kit: Path, out: Path, work: Path, dry_run: bool) -> dict:
    """The fused grouped matmul (bf16, CUDA) against the per-group loop and an fp32 reference
    computed group by group: outputs, input and weight gradients; group 2 has no tokens."""
    import torch

    from mot_core.model.routing import _GroupedLinearLoop, _grouped_mm_usable, build_routing, grouped_linear

    device = "cpu" if dry_run else "cuda"
    tokens, d_in, d_out = (96, 32, 48) if dry_run else (8192, 2048, 5632)
    counts = [tokens // 4, tokens // 2, 0, tokens - tokens // 4 - tokens // 2]
    modality = torch.cat([torch.full((c,), m) for m, c in enumerate(counts)])
    gen = torch.Generator().manual_seed(0)
    plan = build_routing(modality, 4).to(device)
    x = torch.randn(tokens, d_in, generator=gen).to(device, torch.bfloat16)
    weight = (torch.randn(4, d_out, d_in, generator=gen) / d_in**0.5).to(device, torch.bfloat16)
    grad_out = torch.randn(tokens, d_out, generator=gen).to(device, torch.bfloat16)

    def run(fn, dtype=torch.bfloat16):
        xi = x.to(dtype).clone().requires_grad_()
        wi = weight.to(dtype).clone().requires_grad_()
        y = fn(xi, wi)
        y.backward(grad_out.to(dtype))
        return [t.float() for t in (y.detach(), xi.grad, wi.grad)]

    def reference(xi, wi):  # fp32, one plain matmul per group slice
        pieces, start = [], 0
        for m, count in enumerate(counts):
            pieces.append(xi[start : start + count] @ wi[m].T)
            start += count
        return torch.cat(pieces)

    fused = run(lambda a, w: grouped_linear(a, w, plan))
    loop = run(lambda a, w: _GroupedLinearLoop.apply(a, w, plan.counts))
    exact = run(reference, torch.float32)
    names = ("output", "grad_input", "grad_weight")

    def relative(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    result = {"device": device, "shape": {"tokens": tokens, "in": d_in, "out": d_out, "group_tokens": counts},
              "fused_kernel": _grouped_mm_usable(x, weight),
              "fused_vs_loop": {n: relative(a, b) for n, a, b in zip(names, fused, loop)},
              "fused_vs_fp32": {n: relative(a, b) for n, a, b in zip(names, fused, exact)},
              "loop_vs_fp32": {n: relative(a, b) for n, a, b in zip(names, loop, exact)},
              "empty_group_weight_grad_is_zero": bool(torch.all(fused[2][2] == 0))}
    result["ms"] = {"fused": _time_ms(lambda: run(lambda a, w: grouped_linear(a, w, plan)), device),
                    "loop": _time_ms(lambda: run(lambda a, w: _GroupedLinearLoop.apply(a, w, plan.counts)), device)}
    problems = [f"fused vs fp32 {n}: relative error {e:.3g}" for n, e in result["fused_vs_fp32"].items() if e > 2e-2]
    if not result["empty_group_weight_grad_is_zero"]:
        problems.append("the empty group's weight gradient is not exactly zero")
    if not dry_run and not result["fused_kernel"]:
        problems.append("torch._grouped_mm is not used on this card (the loop serves it)")
    return {**result, "problems": problems, "failures": bool(problems)}


def _time_ms(fn, device: str, repeats: int = 10) -> float:
    import torch

    times = []
    for index in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if index >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def gpu_tests(kit: Path, out: Path, work: Path, dry_run: bool) -> dict:
    """pytest -m gpu over the test files that hold gpu-marked tests."""
    import xml.etree.ElementTree as ET

    files = sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    junit = work / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs",
               f"--junitxml={junit}", *files]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(result.stdout[-20000:], result.stderr[-5000:], sep="\n")
    if not junit.is_file():
        return {"files": files, "exit": result.returncode, "problems": ["pytest wrote no report"], "failures": True}
    cases = {"passed": [], "failed": [], "skipped": []}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        if failure is not None:
            cases["failed"].append({"test": name, "message": (failure.get("message") or "").splitlines()[0][:300]})
        elif case.find("skipped") is not None:
            cases["skipped"].append({"test": name, "reason": (case.find("skipped").get("message") or "")[:200]})
        else:
            cases["passed"].append(name)
    counts = {k: len(v) for k, v in cases.items()}
    problems = [f"{c['test']}: {c['message']}" for c in cases["failed"]]
    if not dry_run and not counts["passed"]:
        problems.append("no gpu test ran")
    return {"files": [Path(f).name for f in files], "counts": counts, **cases, "problems": problems,
            "failures": bool(problems)}


def _throughput(dry_run: bool, compile: bool) -> dict:
    from mot_core.bench.throughput import BenchSpec, format_table, run_throughput

    if dry_run:
        spec = BenchSpec(dim=64, layers=2, heads=4, seq_len=256, batch=1, modalities=3, dtype="both", steps=1,
                         repeats=1, device="cpu", memory=False, compile=compile)
    else:  # compiled at 4 layers: compiling four 8-layer models would not fit the section's limit
        spec = BenchSpec(dim=2048, layers=4 if compile else 8, heads=16, seq_len=8192, batch=1, modalities=3,
                         dtype="bf16", steps=3, repeats=3 if compile else 5, device="cuda", memory=not compile,
                         compile=compile)
    report = run_throughput(spec, progress=lambda msg: print(msg, flush=True))
    print(format_table(report))
    return report


def throughput(kit: Path, out: Path, work: Path, dry_run: bool) -> dict:
    return _throughput(dry_run, compile=False)


def throughput_compiled(kit: Path, out: Path, work: Path, dry_run: bool) -> dict:
    if dry_run:  # reported skipped, not ok: nothing of it ran
        return {"not_run": "not run in a dry run: inductor's CPU compile of four models takes minutes"}
    return _throughput(dry_run, compile=True)


def _mot(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """``mot`` in a child process, its output echoed into this section's log."""
    result = subprocess.run([sys.executable, "-m", "mot_core.cli", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    print(f"$ mot {' '.join(args)}\n{result.stdout[-8000:]}{result.stderr[-4000:]}exit {result.returncode}", flush=True)
    return result


def _train_overrides(run_dir: Path, dry_run: bool, steps: int) -> list[str]:
    if dry_run:
        return [f"run.dir={run_dir}", "run.device=cpu", "train.steps=4", "train.eval_every=2", "train.checkpoint_every=4",
                "train.log_every=1", "train.precision=bf16", "train.progress=false"]
    return [f"run.dir={run_dir}", "run.device=cuda", f"train.steps={steps}", "train.eval_every=100",
            f"train.checkpoint_every={steps}", "train.log_every=25", "train.precision=bf16", "train.progress=false"]


def _run_summary(run_dir: Path) -> dict:
    from mot_core.training.trackers import read_records

    records = read_records(run_dir / "metrics.jsonl")
    speeds = [r["tokens_per_s"] for r in records[len(records) // 2 :] if "tokens_per_s" in r]
    last_val = next((r for r in reversed(records) if any(k.startswith("val/") for k in r)), {})
    quarter = max(1, len(records) // 4)  # means over the first and last quarters: a diffusion loss is noisy
    return {"steps": records[-1]["step"], "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "loss_first_quarter": statistics.mean(r["loss"] for r in records[:quarter]),
            "loss_last_quarter": statistics.mean(r["loss"] for r in records[-quarter:]),
            "median_tokens_per_s": statistics.median(speeds) if speeds else None,
            "validation": {k: v for k, v in last_val.items() if k.startswith("val/")}}


def _train_setting(setting: str, kit: Path, out: Path, work: Path, dry_run: bool) -> dict:
    run_dir = work / "runs" / setting
    config = kit / f"{setting}.yaml"
    started = time.monotonic()
    trained = _mot("train", str(config), *_train_overrides(run_dir, dry_run, steps=300))
    result: dict = {"train_exit": trained.returncode, "train_s": time.monotonic() - started}
    problems = []
    if trained.returncode:
        problems.append(f"mot train exited {trained.returncode}: {_last_line(trained)}")
        return {**result, "problems": problems, "failures": True}
    result.update(_run_summary(run_dir))
    if "bf16" not in trained.stdout:
        problems.append("the run did not report bf16 autocast")
    problems += _loss_problems(result, dry_run)
    samples = out / f"{setting}_samples.png"
    started = time.monotonic()
    generated = _mot("generate", str(run_dir), "--modality", IMAGE_MODALITY[setting], "--prompt", "a red apple",
                     "--prompt", "the digit seven", "--samples", "2", "--out", str(samples),
                     *(["--steps", "3"] if dry_run and setting == "transfusion" else []))
    result.update(generate_exit=generated.returncode, generate_s=time.monotonic() - started,
                  samples=samples.name if samples.is_file() else None)
    if generated.returncode:
        problems.append(f"mot generate exited {generated.returncode}: {_last_line(generated)}")
    elif not samples.is_file():
        problems.append("mot generate wrote no sample grid")
    return {**result, "problems": problems, "failures": bool(problems)}


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return lines[-1][:300] if lines else "(no output)"


def train_chameleon(kit: Path, out: Path, work: Path, dry_run: bool) -> dict:
    return _train_setting("chameleon", kit, out, work, dry_run)


def train_transfusion(kit: Path, out: Path, work: Path, dry_run: bool) -> dict:
    return _train_setting("transfusion", kit, out, work, dry_run)


def fsdp2(kit: Path, out: Path, work: Path, dry_run: bool) -> dict:
    """mot launch's FSDP2 runtime in a process group of one (NCCL on the GPU, gloo on the CPU)."""
    run_dir = work / "runs" / "fsdp2"
    overrides = _train_overrides(run_dir, dry_run, steps=100)
    started = time.monotonic()
    trained = _mot("train", str(kit / "chameleon.yaml"), *overrides, "--process-group", "fsdp2")
    result: dict = {"train_exit": trained.returncode, "train_s": time.monotonic() - started}
    if trained.returncode:
        return {**result, "problems": [f"exited {trained.returncode}: {_last_line(trained)}"], "failures": True}
    banner = next((line for line in trained.stdout.splitlines() if "workers, fsdp2" in line), "")
    result["runtime"] = banner[banner.index("1 workers"):] if "1 workers" in banner else banner
    result.update(_run_summary(run_dir))
    expected = "1 workers, fsdp2, gloo, bf16, device: cpu" if dry_run else "1 workers, fsdp2, nccl, bf16, device: cuda"
    problems = [] if expected in trained.stdout else [f"the runtime line does not say '{expected}'"]
    problems += _loss_problems(result, dry_run)
    return {**result, "problems": problems, "failures": bool(problems)}


def _loss_problems(summary: dict, dry_run: bool) -> list[str]:
    """A training run must learn: its loss falls from the first quarter of the run to the last
    (not asked of a dry run's 4 steps) and stays finite."""
    first, last = summary["loss_first_quarter"], summary["loss_last_quarter"]
    if not (math.isfinite(first) and math.isfinite(last)):
        return [f"non-finite loss ({first} -> {last})"]
    if not dry_run and not last < first:
        return [f"the loss did not fall (mean {first:.3f} over the first quarter, {last:.3f} over the last)"]
    return []


SECTION_FUNCTIONS = {
    "environment": environment, "grouped_mm": grouped_mm, "gpu_tests": gpu_tests, "throughput": throughput,
    "train_chameleon": train_chameleon, "train_transfusion": train_transfusion, "fsdp2": fsdp2,
    "throughput_compiled": throughput_compiled,
}


# --------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------


def summarize(report: dict) -> dict:
    sections = report["sections"]
    statuses = {name: entry["status"] for name, entry in sections.items()}
    failed = [n for n, s in statuses.items() if s in ("failed", "timeout")]
    env = sections.get("environment", {}).get("result", {})
    lines = [f"GPU check on {env.get('device', 'the CPU (dry run)' if report['dry_run'] else 'an unknown device')}: "
             + ", ".join(f"{n} {s}" for n, s in statuses.items())]
    figures: dict = {}
    for name in ("throughput", "throughput_compiled"):
        bench = sections.get(name, {}).get("result", {})
        for dtype, run in bench.get("by_dtype", {}).items():
            key = f"{name}_{dtype}"
            figures[key] = {"mot_over_dense": run["mot_over_dense"], "naive_over_dense": run["naive_over_dense"],
                            "moe4x_over_dense": run["moe4x_over_dense"],
                            **{f"mfu_{v}": r["mfu"] for v, r in run["results"].items()},
                            **{f"tokens_per_s_{v}": r["tokens_per_s"] for v, r in run["results"].items()}}
            f = figures[key]
            lines.append(f"{key}: MoT/dense {f['mot_over_dense']:.3f}, naive/dense {f['naive_over_dense']:.3f}, "
                         f"MoE-4x/dense {f['moe4x_over_dense']:.3f}; MFU dense {100 * f['mfu_dense']:.1f}%, "
                         f"MoT {100 * f['mfu_mot']:.1f}%")
    grouped = sections.get("grouped_mm", {}).get("result", {})
    if grouped.get("ms"):
        figures["grouped_mm_ms"] = grouped["ms"]
        lines.append(f"grouped_mm: fused {grouped['ms']['fused']:.2f} ms, loop {grouped['ms']['loop']:.2f} ms; "
                     f"fused vs fp32 {max(grouped['fused_vs_fp32'].values()):.2e} relative")
    for name in ("train_chameleon", "train_transfusion", "fsdp2"):
        run = sections.get(name, {}).get("result", {})
        if "last_loss" in run:
            figures[name] = {k: run.get(k) for k in ("first_loss", "last_loss", "median_tokens_per_s", "validation")}
            speed = run.get("median_tokens_per_s")
            lines.append(f"{name}: loss {run['first_loss']:.3f} -> {run['last_loss']:.3f}"
                         + (f", {speed:,.0f} tokens/s" if speed else ""))
    tests = sections.get("gpu_tests", {}).get("result", {}).get("counts")
    if tests:
        lines.append(f"gpu_tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped")
    for name in failed:
        lines.append(f"{name} {statuses[name]}: {sections[name].get('error', '')}")
    for name, entry in sections.items():
        if entry["status"] == "skipped":
            lines.append(f"{name} skipped: {entry.get('reason', '')}")
        elif entry.get("left_behind"):
            lines.append(f"{name}: {entry['left_behind']['note']}")
    return {"failed": len(failed), "figures": figures, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
