"""train.precision: ``auto`` is bf16 autocast on CUDA and fp32 on every CPU (bf16 whole steps
measured slower there, native bf16 matmuls or not) unless MOT_CPU_BF16=1; bf16 training on the
CPU trains and resumes exactly, with its norms in fp32 (no fallback kernels)."""

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
    assert not uses_bf16(CPU, "auto")  # fp32 on every CPU, native bf16 matmuls or not
    import mot_core.devices.device as device

    for flag, why in ((None, "CPU has no native bf16 matmul"), ("amx_bf16", "fp32 on every CPU; whole bf16 training "
                                                                             "steps were measured slower on CPUs with amx_bf16 too")):
        monkeypatch.setattr(device, "cpu_bf16_flag", lambda flag=flag: flag)
        assert describe_precision(CPU, "auto").startswith(f"fp32 (precision auto: {why}")
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
