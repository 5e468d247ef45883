"""train.precision: ``auto`` is bf16 autocast on CUDA; on a CPU with native bf16 matmuls it is
what the run's own whole training step, timed in both precisions (cached per machine and
shape), favours; fp32 elsewhere; MOT_CPU_BF16 overrides. bf16 training on the CPU trains and
resumes exactly, with its norms in fp32 (no fallback kernels)."""

from __future__ import annotations

import json

import pytest
import torch

from mot_core.cli import main
from mot_core.errors import MotError
from mot_core.devices.device import cpu_bf16_flag, describe_precision, native_bf16_cpu, uses_bf16

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse avx512f avx512_bf16 amx_tile amx_bf16 amx_int8", "amx_bf16"),
    ("fpu sse avx512f avx512_bf16 avx512_vnni", "avx512_bf16"),
    ("fpu sse avx2 avx512f avx512bw avx512_vnni", None),  # AVX-512 without BF16: oneDNN converts to fp32
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_bf16_flag(str(cpuinfo)) == expected
    assert cpu_bf16_flag(str(tmp_path / "missing")) is None  # not Linux: no detection, fp32


def test_auto_follows_the_device_and_the_override(monkeypatch):
    assert uses_bf16(CPU, "bf16") and not uses_bf16(CPU, "fp32") and not uses_bf16(CUDA, "fp32")
    assert uses_bf16(CUDA, "auto")
    monkeypatch.setenv("MOT_CPU_BF16", "1")
    assert uses_bf16(CPU, "auto") and native_bf16_cpu() == "MOT_CPU_BF16=1"
    assert describe_precision(CPU, "auto") == "bf16 autocast (precision auto: MOT_CPU_BF16=1)"
    monkeypatch.setenv("MOT_CPU_BF16", "0")
    assert not uses_bf16(CPU, "auto")
    assert describe_precision(CPU, "bf16") == "bf16 autocast"
    monkeypatch.setenv("MOT_CPU_BF16", "")
    assert native_bf16_cpu() == native_bf16_cpu(honour_override=False)  # unset: the machine decides
    import mot_core.devices.device as device

    monkeypatch.setattr(device, "_CPU_CHOICE", {})
    assert not uses_bf16(CPU, "auto")  # nothing measured: fp32
    for flag, why in ((None, "CPU has no native bf16 matmul"), ("amx_bf16", "nothing measured in this process")):
        monkeypatch.setattr(device, "cpu_bf16_flag", lambda flag=flag: flag)
        assert describe_precision(CPU, "auto") == f"fp32 (precision auto: {why}" + ("; CPU has amx_bf16)" if flag else ")")
    monkeypatch.setenv("MOT_CPU_BF16", "yes")
    with pytest.raises(MotError, match="MOT_CPU_BF16='yes': use 1"):
        uses_bf16(CPU, "auto")


def test_bf16_autocast_on_the_cpu_trains_and_resumes_exactly(write_config, tmp_path, monkeypatch, capsys):
    import warnings

    monkeypatch.setenv("MOT_CPU_BF16", "1")  # precision auto made bf16 on this CPU
    whole = write_config("whole")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", str(whole)]) == 0
    out = capsys.readouterr()
    assert "precision: bf16 autocast (precision auto: MOT_CPU_BF16=1)" in out.out
    # norms run in fp32 by design: no "Mismatch dtype ... Cannot dispatch to fused implementation"
    assert not [w for w in caught if "fused implementation" in str(w.message)], [str(w.message) for w in caught]
    assert "fused implementation" not in out.err
    split = write_config("split")
    assert main(["train", str(split), "train.steps=3"]) == 0
    assert main(["train", str(split)]) == 0

    def losses(name):
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert losses("split") == losses("whole")  # bit for bit across the restart
    assert all(loss == loss for loss in losses("whole")) and losses("whole")[-1] < losses("whole")[0]


def test_a_bad_override_is_one_line(write_config, monkeypatch, capsys):
    monkeypatch.setenv("MOT_CPU_BF16", "on")
    assert main(["train", str(write_config("bad"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MOT_CPU_BF16='on'" in err[0]


def test_auto_on_a_cpu_with_native_bf16_times_the_runs_step_and_caches_it(monkeypatch, tmp_path):
    import mot_core.devices.calibration as calibration
    import mot_core.devices.device as device
    from mot_core.model.transformer import ModelArgs

    monkeypatch.delenv("MOT_CPU_BF16", raising=False)
    monkeypatch.setenv("MOT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(device, "cpu_bf16_flag", lambda: "amx_bf16")
    args = ModelArgs(vocab_size=64, num_modalities=2, dim=16, n_layers=1, n_heads=2)
    for timings, bf16 in (((100.0, 50.0), True), ((100.0, 98.0), False)):  # bf16 must be >= 5% faster
        monkeypatch.setattr(device, "_CPU_CHOICE", {})
        monkeypatch.setattr(calibration, "time_whole_steps", lambda *a, t=timings: t)
        device.choose_cpu_precision(args, 2, 32 if bf16 else 48)
        assert uses_bf16(CPU, "auto") == bf16
        assert describe_precision(CPU, "auto") == (
            f"{'bf16 autocast' if bf16 else 'fp32'} (precision auto, CPU has amx_bf16: a whole training step "
            f"{timings[1]:.0f} ms in bf16, {timings[0]:.0f} ms in fp32, measured now; bf16 is chosen when 1.05x faster)")
    # the next start on this machine and shape reads the cache: the same choice, nothing timed
    monkeypatch.setattr(device, "_CPU_CHOICE", {})
    monkeypatch.setattr(calibration, "time_whole_steps", lambda *a: pytest.fail("timed again"))
    device.choose_cpu_precision(args, 2, 32)
    assert uses_bf16(CPU, "auto") and "cached for this machine and shape" in describe_precision(CPU, "auto")
    # an override measures nothing
    monkeypatch.setattr(device, "_CPU_CHOICE", {})
    monkeypatch.setenv("MOT_CPU_BF16", "0")
    device.choose_cpu_precision(args, 2, 64)
    assert not uses_bf16(CPU, "auto") and device._CPU_CHOICE == {}


def test_the_step_timing_measures_both_precisions_and_leaves_the_rng_alone():
    from mot_core.devices.calibration import time_whole_steps
    from mot_core.model.transformer import ModelArgs

    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    fp32_ms, bf16_ms = time_whole_steps(ModelArgs(vocab_size=64, num_modalities=2, dim=16, n_layers=1, n_heads=2), 2, 32)
    assert fp32_ms > 0 and bf16_ms > 0
    assert torch.equal(torch.random.get_rng_state(), before)
