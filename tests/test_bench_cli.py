"""``mot bench`` contracts at tiny sizes: machine-readable output and consistent accounting.
(Speeds are proven by running the benchmark, not by timed tests.)"""

from __future__ import annotations

import json

import pytest
import torch

from mot_core.bench.naive import NaiveMoTTransformer
from mot_core.bench.throughput import BenchSpec, flops_per_token, interleaved_batch
from mot_core.cli import main
from mot_core.model.transformer import MoTTransformer
from mot_core.model.routing import build_routing
from mot_core.model.attention import AttentionLayout


def test_throughput_json_last_line(capsys):
    code = main(["bench", "throughput", "--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "128",
                 "--batch", "1", "--steps", "1", "--repeats", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["by_dtype"]) == {"fp32"} and "bf16_speedup" not in report
    run = report["by_dtype"]["fp32"]
    assert set(run["results"]) == {"dense", "mot", "naive", "moe4x"}
    assert run["mot_over_dense"] > 0 and run["naive_over_dense"] > 0 and run["moe4x_over_dense"] > 0
    dense, mot, naive, moe4x = (run["results"][v] for v in ("dense", "mot", "naive", "moe4x"))
    # A CPU's MFU is taken against the matmul peak measured in the same run.
    assert run["datasheet_peak_flops"] is None and run["matmul_peak_flops"] > 1e9
    assert dense["mfu"] == pytest.approx(dense["achieved_flops"] / run["matmul_peak_flops"])
    assert dense["achieved_flops"] == pytest.approx(dense["flops_per_token"] * dense["tokens_per_s"])
    # Same active size per token (iso-FLOP), MoT and naive hold one tower per modality.
    assert dense["active_params_per_token"] == mot["active_params_per_token"] == naive["active_params_per_token"]
    assert mot["params"] == naive["params"] > dense["params"]
    # MoE-4x: 4 FFN experts, one per token on average (+ the router): about the dense FLOPs.
    router = 4 * 32  # per layer: (experts, dim)
    assert moe4x["active_params_per_token"] == dense["active_params_per_token"] + router
    assert moe4x["flops_per_token"] == pytest.approx(dense["flops_per_token"] + 6 * router)
    assert moe4x["params"] > dense["params"]
    assert dense["peak_memory_bytes"] > 0


def test_interleaved_batch_has_every_modality_in_runs():
    spec = BenchSpec(seq_len=1024, batch=2)
    batch = interleaved_batch(spec, 0)
    assert set(batch["modality"].unique().tolist()) == {0, 1, 2}
    offsets = batch["modality"] * spec.vocab_per_modality
    local = batch["tokens"] - offsets
    assert bool(((local >= 0) & (local < spec.vocab_per_modality)).all())


def test_naive_reference_computes_the_same_function_as_the_fast_model():
    spec = BenchSpec(dim=32, layers=2, heads=2, seq_len=64, batch=2)
    args = spec.model_args(untied=True)
    fast, naive = MoTTransformer(args), NaiveMoTTransformer(args)
    # Copy the fast model's stacked towers into the naive per-modality modules.
    with torch.no_grad():
        naive.embed.weight.copy_(fast.embed.weight)
        for f, n in zip(fast.layers, naive.layers):
            d, kv = args.dim, n.kv_heads * n.head_dim
            for m in range(args.num_modalities):
                n.attn_norm.towers[m].weight.copy_(f.attn_norm.weight[m])
                n.ffn_norm.towers[m].weight.copy_(f.ffn_norm.weight[m])
                q, k, v = f.wqkv.weight[m].split([d, kv, kv])
                n.wq.towers[m].weight.copy_(q), n.wk.towers[m].weight.copy_(k), n.wv.towers[m].weight.copy_(v)
                n.wo.towers[m].weight.copy_(f.wo.weight[m])
                gate, up = f.ffn.w13.weight[m].chunk(2)
                n.w1.towers[m].weight.copy_(gate), n.w3.towers[m].weight.copy_(up)
                n.w2.towers[m].weight.copy_(f.ffn.w2.weight[m])
        for m in range(args.num_modalities):
            naive.final_norm.towers[m].weight.copy_(fast.final_norm.weight[m])
    batch = interleaved_batch(spec, 1)
    plan = build_routing(batch["modality"], args.num_modalities)
    layout = AttentionLayout.build(torch.zeros_like(batch["tokens"]))
    with torch.no_grad():
        ours = plan.unsort(fast(batch["tokens"], batch["positions"], batch["modality"], plan, layout))
        theirs = naive(batch["tokens"], batch["positions"], batch["modality"]).reshape(-1, args.dim)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_flops_per_token_counts_matmuls_and_attention():
    spec = BenchSpec(dim=64, layers=2, heads=2, seq_len=128, vocab_per_modality=100, modalities=3)
    dense = MoTTransformer(spec.model_args(untied=False))
    per_layer = sum(p.numel() for n, p in dense.layers[0].named_parameters() if p.dim() == 3 and "norm" not in n)
    head = dense.lm_head.weight.numel()
    expected = 6 * (spec.layers * per_layer + head) + 6 * spec.layers * spec.seq_len * spec.dim
    assert flops_per_token(spec) == pytest.approx(expected)


def test_flex_training_benchmark_on_cpu_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("flex trains on CUDA")
    code = main(["bench", "throughput", "--backend", "flex", "--seq-len", "64", "--json"])
    assert code == 2 and "flex" in capsys.readouterr().err


def test_data_bench_at_tiny_sizes(capsys, tmp_path):
    """``mot bench data`` end to end on two tiny corpora: every figure is measured, none is
    missing, and the corpora are real text of the asked size."""
    code = main(["bench", "data", "--sizes", "300KB,600KB", "--out", str(tmp_path), "--steps", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = report["rows"]
    assert [r["corpus"] for r in rows] == ["300KB", "600KB"]
    for row in rows:
        assert row["tokens"] > 0 and row["shards"] >= 2 and row["encode_s"] > 0 and row["raw_mb_per_s"] > 0
        assert row["first_step_s"] > 0 and row["train_peak_mb"] > 0
    assert rows[1]["tokens"] > rows[0]["tokens"]
    sizes = sorted(sum(f.stat().st_size for f in (tmp_path / f"corpus_{r['corpus']}").glob("*.txt")) for r in rows)
    assert sizes[0] >= 300 << 10 and sizes[1] >= 600 << 10
    assert report["step_time"]["ratio"] > 0 and report["step_time"]["documents"] > 0


def test_data_bench_refuses_a_bad_size(capsys):
    assert main(["bench", "data", "--sizes", "5XB"]) == 2
    assert "corpus size '5XB' is not a size" in capsys.readouterr().err


@pytest.mark.slow
def test_startup_memory_bench_at_a_tiny_size(capsys, tmp_path):
    """``mot bench startup-memory`` end to end on a tiny model: one process and two FSDP2
    workers each report their start-up memory, and the workers built on the meta device."""
    code = main(["bench", "startup-memory", "--dim", "64", "--layers", "2", "--heads", "2", "--out", str(tmp_path),
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["parameters"] > 0 and report["workers"] == 2
    assert [w["worker"] for w in report["launched"]] == [0, 1]
    for row in [report["single"], *report["launched"]]:
        assert row["allocated_mb"] > 0 and row["peak_rss_mb"] >= row["allocated_mb"]
    assert (tmp_path / "dense" / "model.safetensors").is_file()


@pytest.mark.slow
def test_export_memory_bench_at_a_tiny_size(capsys, tmp_path, monkeypatch):
    """``mot bench export-memory`` end to end on a tiny model: the streamed export alone and by
    rank 0 of two FSDP2 workers, the gather on both ranks; its temporary folder is removed."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = main(["bench", "export-memory", "--dim", "64", "--layers", "2", "--heads", "2", "--vocab", "256", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["parameters"] > 0 and report["largest_bytes"] <= report["weights_bytes"]
    assert [r["rank"] for r in report["hold"]] == [0, 1] and "streamed" in report["hold"][0]
    for row in [report["stream"], report["hold"][0]["streamed"], *(r["gathered"] for r in report["hold"])]:
        assert row["peak"] >= row["rss_before"] > 0
    assert list(tmp_path.iterdir()) == []


def test_startup_memory_bench_refuses_heads_that_do_not_divide(capsys):
    assert main(["bench", "startup-memory", "--dim", "64", "--heads", "5"]) == 2
    assert "--dim 64 is not divisible by --heads 5" in capsys.readouterr().err


def test_throughput_runs_fp32_and_bf16_side_by_side_for_every_variant(capsys):
    """--dtype both: every variant in both dtypes in one interleaved run (the naive loop's
    bf16 autocast once crashed in its masked scatter), with bf16's speed-up per variant."""
    code = main(["bench", "throughput", "--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "128",
                 "--batch", "1", "--steps", "1", "--repeats", "1", "--dtype", "both", "--no-memory"])
    assert code == 0
    out = capsys.readouterr().out
    assert "-- fp32 --" in out and "-- bf16 --" in out and "bf16 speed-up over fp32 (step time): dense" in out
    assert out.count("measured matmul peak") == 2 and "naive" in out


def test_naive_reference_runs_under_bf16_autocast():
    spec = BenchSpec(dim=32, layers=1, heads=2, seq_len=64, batch=1)
    batch = interleaved_batch(spec, 0)
    model = NaiveMoTTransformer(spec.model_args(untied=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(batch["tokens"], batch["positions"], batch["modality"])
    assert hidden.shape == (1, 64, 32) and torch.isfinite(hidden.float()).all()


def test_compare_with_seeds_gives_mean_and_spread_per_group(tmp_path, capsys):
    """Runs named NAME, NAME_seed1, NAME_seed2 form one group; the mean and the sample
    standard deviation of each final validation loss are printed per group."""
    from mot_core.cli import main

    losses = {"dense": [4.0, 4.2, 4.4], "mot": [3.9, 3.9, 3.9]}
    runs = []
    for model, values in losses.items():
        for seed, value in enumerate(values):
            run = tmp_path / (f"demo_{model}" + (f"_seed{seed}" if seed else ""))
            run.mkdir()
            records = [{"step": 10, "loss/image": 5.0}, {"step": 20, "val/image/loss": value}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            runs.append(str(run))
    assert main(["compare", *runs, "--seeds"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].split() == ["mean", "+-", "sd", "over", "seeds", "demo_dense", "(3)", "demo_mot", "(3)"]
    assert out[-1].split() == ["val/image/loss", "4.200", "+-", "0.200", "3.900", "+-", "0.000"]


# FSDP2 start-up memory: each worker of a sharded warm start allocates its shards, never the
# whole model (what `mot bench startup-memory` prints, asserted here). The measure is a worker's
# allocated memory (RssAnon: the resident peak also counts the checkpoint's mapped pages),
# sampled every millisecond from outside while it starts, up to its start-up line, against what
# it held before building the model; a transient whole model would show. One `mot train`
# process, which builds the model whole, is the control: the same measure reaches the weights'
# size there.

def _anon_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _workers(pid: int) -> dict[int, int]:
    """pid -> RANK of the processes ``pid`` started (torchrun's workers), or {pid: 0} for ``pid``
    itself when it has no RANK (one process)."""
    import os

    found = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as children:
                for child in map(int, children.read().split()):
                    with open(f"/proc/{child}/environ", "rb") as environ:
                        ranks = [v[5:] for v in environ.read().split(b"\0") if v.startswith(b"RANK=")]
                    if ranks:
                        found[child] = int(ranks[0])
    except OSError:
        pass
    return found


def _start_up_peaks(command: list[str], workers: int, cwd) -> dict[int, tuple[float, float]]:
    """Run ``command`` until each of its ``workers`` prints its start-up line, then stop it.
    Returns rank -> (peak allocated MB above what it held before building the model, the MB for
    the model it printed)."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from mot_core.bench.startup import LINE

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, *command], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    peaks: dict[int, float] = {}
    reported: dict[int, tuple[float, float]] = {}  # rank -> (allocated MB, MB for the model)
    deadline = time.monotonic() + 240
    try:
        while len(reported) < workers and process.poll() is None and time.monotonic() < deadline:
            pids = _workers(process.pid) if workers > 1 else {process.pid: 0}
            for pid, rank in pids.items():
                anon = _anon_mb(pid)
                if anon is not None and rank not in reported:
                    peaks[rank] = max(peaks.get(rank, 0.0), anon)
            for line in list(lines):
                match = LINE.search(line)
                if match:
                    numbers = [float(match.group(i).replace(",", "")) for i in (1, 3)]
                    reported.setdefault(int(match.group(2) or 0), (numbers[0], numbers[1]))
            time.sleep(0.001)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    assert len(reported) == workers, "".join(lines[-40:])
    return {rank: (peaks[rank] - (allocated - model), model) for rank, (allocated, model) in reported.items()}


@pytest.mark.slow
def test_each_fsdp2_worker_allocates_less_than_the_weights_at_start_up(tmp_path):
    """418 MB of fp32 weights (dim 1024, 8 layers): large against the few tens of MB that
    allocator and tokenizer noise move, small enough for a test. Two FSDP2 workers over gloo
    (`mot train --process-group fsdp2` under torchrun) each allocate under the weights' size
    (about 0.75 of it here: half the weights, and a tensor at a time while loading); one process
    allocates at least the weights."""
    import yaml

    from mot_core.bench.startup import _config, _dense_checkpoint

    configs = {}
    for name, workers in (("single", 1), ("launched", 2)):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(_config(tmp_path, name, 1024, 8, 8, workers)))
    weights_mb = _dense_checkpoint(_config(tmp_path, "single", 1024, 8, 8, 1), tmp_path / "dense") * 4 / 2**20
    whole = _start_up_peaks(["-m", "mot_core.cli", "train", str(configs["single"])], 1, tmp_path)
    assert whole[0][0] >= 0.9 * weights_mb, (whole, weights_mb)  # the control: the measure sees a whole model
    sharded = _start_up_peaks(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                               "mot_core.cli", "train", str(configs["launched"]), "--process-group", "fsdp2"], 2,
                              tmp_path)
    assert sorted(sharded) == [0, 1]
    for rank, (peak, printed) in sharded.items():
        assert peak < weights_mb and printed < weights_mb, (rank, peak, printed, weights_mb)
