"""Every command a user can type answers bad input with ONE line, ``error: ...``, exit 2, no
traceback: a table of bad inputs through the real CLI entry point (``mot_core.cli.main``).

Placeholders in the arguments: {config} a valid tiny config, {run} a trained tiny run,
{tmp} a scratch folder, {file} a plain text file, {binary} a binary file, {list} a YAML list,
{scalar} a YAML scalar, {broken} invalid YAML, {empty} an empty file.
"""

from __future__ import annotations

import pytest

from mot_core.cli import main

BAD_INPUTS = [
    # -- configs -----------------------------------------------------------------------------
    (["train", "{tmp}/missing.yaml"], "config file not found"),
    (["train", "{tmp}"], "is a folder; give a YAML file"),
    (["train", "{binary}"], "is not UTF-8 text"),
    (["train", "{list}"], "must hold a mapping (key: value) at the top level, not a list"),
    (["train", "{scalar}"], "not a single int"),
    (["train", "{broken}"], "is not valid YAML"),
    (["train", "{empty}"], "missing required key 'mixture'"),
    (["train", "{config}", "frobnicate.x=1"], "unknown key 'frobnicate'"),
    (["train", "{config}", "model.dimm=64"], "did you mean 'dim'"),
    (["train", "{config}", "train.steps=abc"], "train.steps: Input should be a valid integer"),
    (["train", "{config}", "train.lr=-1"], "train.lr: Input should be greater than 0"),
    (["train", "{config}", "train.steps"], "is not of the form key=value"),
    (["train", "{config}", "=5"], "is not of the form key=value"),
    (["train", "{config}", "mixture.modalities.klingon.loss_weight=1"], "unknown modality 'klingon'"),
    (["train", "{config}", "mixture.datasets.nowhere.weight=1"], "unknown dataset 'nowhere'"),
    (["train", "{config}", "mixture.modalities.text.loss=psychic"], "unknown loss 'psychic'"),
    (["train", "{config}", "mixture.modalities.text.evaluators=[oracle]"], "unknown evaluator 'oracle'"),
    (["train", "{config}", "model.dim=31"], "model.dim=31 must be divisible by model.n_heads=2"),
    (["train", "{config}", "model.dim=6", "model.n_heads=2"], "must be even for RoPE"),
    (["train", "{config}", "train.seq_len=128"], "train.seq_len=128 exceeds model.max_seq_len=64"),
    (["train", "{config}", "model.norm_placement=mid"], "model.norm_placement: Input should be 'pre' or 'post'"),
    (["train", "{config}", "model.attention_backend=xformers"], "attention backend 'xformers' unavailable"),
    (["train", "{config}", "run.device=cuda"], "no CUDA device is available"),
    (["train", "{config}", "run.dir={file}"], "is a file; give a folder"),
    (["train", "{config}", "run.dir={tmp}/p", "mixture.datasets.text_files.options.paths=[{tmp}/none/*.txt]"],
     "no file found at"),
    (["train", "{config}", "run.dir={tmp}/v", "mixture.modalities.text.options.vocab_size=100000"], "the text BPE reached only"),
    (["train", "{config}", "mixture.modalities.text.options.vocab_size=299"], "vocab_size: Input should be greater than or equal to 300"),
    (["train", "{config}", "train.on_nonfinite=ignore"], "train.on_nonfinite: Input should be 'stop' or 'skip'"),
    (["train", "{config}", "run.dir={run}", "run.resume=never"], "already holds checkpoints"),
    (["train", "{config}", "run.dir={tmp}/w", "model.warm_start={tmp}/no_such_checkpoint"], "no model.safetensors"),
    (["train", "{config}", "run.seed=4294967296"], "run.seed: Input should be less than 4294967296"),
    (["train", "{config}", "run.dir={tmp}/huge", "model.dim=65536", "model.n_layers=64"],
     "the model does not fit (model.dim=65536, n_layers=64"),
    (["train", "{config}", "run.dir={tmp}/long", "model.max_seq_len=2000000000"],
     "GB for buffers (RoPE tables for max_seq_len=2000000000)"),
    (["train", "{config}", "run.dir={tmp}/deep", "model.n_layers=100000000"],
     "the model does not fit (model.dim=32, n_layers=100000000"),
    (["train", "{config}", "run.dir={tmp}/wide", "train.batch_size=100000000"],
     "for activations (each layer's fp32 input for 100,000,000 rows x 64 positions"),
    (["config", "show", "{tmp}/missing.yaml"], "config file not found"),
    (["data", "prepare", "{list}"], "not a list"),
    # -- eval -----------------------------------------------------------------------------------
    (["eval", "{tmp}/nothing"], "checkpoint not found"),
    (["eval", "{tmp}"], "is neither a checkpoint nor a run folder with checkpoints"),
    (["eval", "{run}", "--batches", "0"], "argument --batches: expected an integer >= 1, got 0"),
    (["eval", "{run}", "--batches", "-1"], "argument --batches: expected an integer >= 1, got -1"),
    (["eval", "{run}", "--batches", "two"], "argument --batches: expected an integer >= 1, got 'two'"),
    (["eval", "{run}", "--samples", "-1"], "argument --samples: expected an integer >= 0"),
    # -- generate -------------------------------------------------------------------------------
    (["generate", "{run}"], "give at least one --prompt TEXT"),
    (["generate", "{run}", "--prompt", "a", "--top-p", "0"], "argument --top-p: expected a number in (0, 1], got 0"),
    (["generate", "{run}", "--prompt", "a", "--top-p", "1.5"], "argument --top-p: expected a number in (0, 1]"),
    (["generate", "{run}", "--prompt", "a", "--temperature", "-1"], "argument --temperature: expected a finite number >= 0"),
    (["generate", "{run}", "--prompt", "a", "--top-k", "-3"], "argument --top-k: expected an integer >= 0"),
    (["generate", "{run}", "--prompt", "a", "--samples", "0"], "argument --samples: expected an integer >= 1"),
    (["generate", "{run}", "--prompt", "a", "--cfg", "nan"], "argument --cfg: expected a finite number >= 0"),
    (["generate", "{run}", "--prompt", "a", "--out", "{tmp}"], "is a folder; give a file name"),
    (["generate", "{run}", "--prompt", "a", "--modality", "image"], "this run has no modality 'image'; it has: text"),
    (["generate", "{tmp}/nothing", "--prompt", "a"], "checkpoint not found"),
    (["generate", "{run}", "--prompt", "a", "--seed", "99999999999999999999"],
     "argument --seed: expected an integer in [0, 2**63), got 99999999999999999999"),
    (["generate", "{run}", "--prompt", "a", "--seed", "-1"], "argument --seed: expected an integer in [0, 2**63)"),
    (["generate", "{run}", "--prompt", "a", "--modality", "text", "--samples", "1000000000"],
     "ask for fewer --samples or prompts"),
    # -- compare, bench, unknown commands -------------------------------------------------------
    (["compare", "{tmp}"], "no metrics.jsonl in"),
    (["compare", "{run}", "--plot", "{tmp}"], "--plot"),
    (["bench", "throughput", "--dim", "0"], "argument --dim: expected an integer >= 1, got 0"),
    (["bench", "throughput", "--heads", "3"], "--dim 256 must split into --heads 3 heads"),
    (["bench", "throughput", "--kv-heads", "3"], "--heads 4 must be a multiple of --kv-heads 3"),
    (["bench", "throughput", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["bench", "throughput", "--device", "cuda"], "no CUDA device is available"),
    (["bench", "step-match", "{config}", "--steps", "0"], "argument --steps: expected an integer >= 1"),
    (["bench", "step-match", "{config}", "--smoothing", "1"], "argument --smoothing: expected a number in [0, 1)"),
    (["bench", "step-match", "{tmp}/missing.yaml"], "config file not found"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: command"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory, text_corpus) -> dict[str, str]:
    import yaml

    from conftest import tiny_config_dict

    root = tmp_path_factory.mktemp("bad_inputs")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(text_corpus, root / "run", steps=2, checkpoint_every=2)))
    assert main(["train", str(config)]) == 0
    scratch = root / "scratch"
    scratch.mkdir()
    files = {
        "file": ("notes.txt", "just text"), "list": ("list.yaml", "- a\n- b\n"), "scalar": ("scalar.yaml", "42\n"),
        "broken": ("broken.yaml", "a: [1\n"), "empty": ("empty.yaml", ""),
    }
    out = {"config": str(config), "run": str(root / "run"), "tmp": str(scratch)}
    for key, (name, text) in files.items():
        (root / name).write_text(text)
        out[key] = str(root / name)
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    out["binary"] = str(root / "binary.yaml")
    return out


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a)[:60] or "(none)" for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_no_traceback(places, capsys, args, message):
    argv = [a.format(**places) for a in args]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse exits through SystemExit
        code = exit_.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, f"exit {code}; stderr:\n{err}\nstdout:\n{captured.out[-2000:]}"
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert message.format(**places) in err, err


def test_the_table_covers_at_least_forty_inputs():
    assert len(BAD_INPUTS) >= 40


def test_a_checkpoint_with_nan_weights_is_one_line_in_generate(places, capsys, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mot_core.training import checkpoint as ckpt

    run = tmp_path / "nan_run"
    shutil.copytree(places["run"], run)
    latest = ckpt.latest_intact(run)
    weights = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in load_file(str(latest / "model.safetensors")).items()}
    save_file(weights, str(latest / "model.safetensors"))
    import json

    meta = json.loads((latest / "meta.json").read_text())  # as if saved so: the checksums match
    meta["sha256"]["model.safetensors"] = ckpt._sha256(latest / "model.safetensors")
    meta["meta_sha256"] = ckpt._json_digest({k: v for k, v in meta.items() if k != "meta_sha256"})
    (latest / "meta.json").write_text(json.dumps(meta))
    code = main(["generate", str(latest), "--prompt", "a", "--modality", "text", "--max-tokens", "8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "the model's output holds NaN or inf: the checkpoint's weights are broken" in err, err


# Sizes are refused from their shapes, before anything is allocated or built: a million layers
# (which ran out of memory inside the size check, on the meta device), a batch of a hundred
# million rows (std::bad_alloc in the packer), a long sequence, a wide model. The machine is
# given 8 GB free, so the verdicts do not depend on the machine running the tests.

FREE = 8 * 10**9


@pytest.mark.parametrize("overrides, fragment", [
    (["model.n_layers=1000000"], "n_layers=1000000, ffn_hidden=default, max_seq_len=64; 2 rows x 64 positions a step)"),
    (["train.batch_size=100000000"], "for activations (each layer's fp32 input for 100,000,000 rows x 64 positions"),
    (["model.max_seq_len=100000", "train.seq_len=100000", "train.batch_size=1000"],
     "for activations (each layer's fp32 input for 1,000 rows x 100,000 positions"),
    (["model.dim=65536"], "GB for the weights, gradients and AdamW state of"),
], ids=["layers", "batch", "seq", "dim"])
def test_huge_sizes_are_refused_from_their_shapes_before_anything_is_built(places, capsys, monkeypatch, tmp_path,
                                                                           overrides, fragment):
    from mot_core.model import transformer
    from mot_core.runs import start
    from mot_core.training import memory

    def never(*args, **kwargs):
        pytest.fail("built or fitted before the sizes were checked")

    monkeypatch.setattr(memory, "available_bytes", lambda device: FREE)
    monkeypatch.setattr(start, "prepare_vocabulary", never)  # the tokenizers: not fitted for a run that cannot fit
    monkeypatch.setattr(transformer.MoTTransformer, "__init__", never)  # not even on the meta device
    code = main(["train", places["config"], f"run.dir={tmp_path}/run", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert fragment in err and "and this machine has 8.0 GB free" in err, err
    assert not (tmp_path / "run").exists()


def test_the_size_estimate_is_the_built_models_tensor_for_tensor():
    """The arithmetic of ``training_bytes`` against the model built on the meta device: dense,
    MoT with grouped-query attention and QK-norm, tower groups, MoE towers, frozen towers and
    vocabulary rows, a tied head."""
    import torch

    from mot_core.model.moe import MoEArgs
    from mot_core.model.transformer import ModelArgs, MoTTransformer
    from mot_core.training.memory import training_bytes

    moe = MoEArgs(experts=4)
    cases = [
        dict(num_modalities=1, dim=32, n_layers=2, n_heads=2),
        dict(num_modalities=3, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, qk_norm=(False, True, False)),
        dict(num_modalities=3, dim=64, n_layers=2, n_heads=4, untie_ffn=False, untie_attention=False,
             untie_norm=False, tie_embeddings=True),
        dict(num_modalities=2, dim=64, n_layers=2, n_heads=4, ffn_kinds=(moe, None), frozen_groups=(1,),
             frozen_rows=((0, 100),)),
        dict(num_modalities=2, dim=64, n_layers=2, n_heads=4, untie_ffn=False, ffn_kinds=(moe, moe),
             frozen_groups=(0,), qk_norm=(True, True)),
        dict(num_modalities=3, dim=64, n_layers=2, n_heads=4, groups=(0, 0, 1), frozen_groups=(0,),
             frozen_rows=((0, 300),), qk_norm=(True, True, False), ffn_hidden=96, max_seq_len=1000),
        dict(num_modalities=2, dim=64, n_layers=2, n_heads=4, untie_attention=False, frozen_groups=(0,)),
    ]
    for case in cases:
        args = ModelArgs(vocab_size=300, **case)
        with torch.device("meta"):
            model = MoTTransformer(args)
        built = (sum(p.numel() for p in model.parameters()),
                 sum(p.numel() * (16 if p.requires_grad else 4) for p in model.parameters()),
                 sum(b.numel() * b.element_size() for b in model.buffers()))
        assert training_bytes(args) == built, case


def test_the_packer_refuses_a_batch_it_cannot_hold_before_making_its_lanes(monkeypatch):
    import numpy as np

    from mot_core.data import packing
    from mot_core.data.vocabulary import TokenDocument
    from mot_core.errors import MotError

    monkeypatch.setattr(packing, "available_bytes", lambda device: FREE)
    monkeypatch.setattr(packing._Lane, "start", lambda *a: pytest.fail("a lane was made"))
    doc = TokenDocument(np.arange(10), np.zeros(10, dtype=np.int64), np.full(10, -1, dtype=np.int64))
    with pytest.raises(MotError, match=r"a batch of 100,000,000 rows of 64 positions needs about .* GB for the data "
                                       r"packer alone .* and this machine has 8\.0 GB free; lower train\.batch_size"):
        packing.PackedStream([[doc]], [1.0], seq_len=64, seed=0, lanes=100_000_000)


def test_generation_counts_the_cache_activations_and_logits_of_every_row(monkeypatch):
    """From the shapes (a stand-in model: nothing allocated): a vocabulary of 10**9 ids makes one
    row's logits 8 GB, more than the free memory, whatever the cache."""
    from types import SimpleNamespace

    import torch

    from mot_core.errors import MotError
    from mot_core.generate import decoding
    from mot_core.model.transformer import ModelArgs

    monkeypatch.setattr(decoding, "available_bytes", lambda device: FREE)
    model = SimpleNamespace(args=ModelArgs(vocab_size=10, num_modalities=1, dim=32, n_layers=2, n_heads=2),
                            embed=SimpleNamespace(weight=torch.zeros(1)))
    decoding.check_generation_fits(model, rows=8, length=64)
    with pytest.raises(MotError, match=r"generating 100,000,000 sequences of up to 64 positions needs about"):
        decoding.check_generation_fits(model, rows=100_000_000, length=64)
    model.args = ModelArgs(vocab_size=10**9, num_modalities=1, dim=32, n_layers=2, n_heads=2)
    with pytest.raises(MotError, match=r"generating 1 sequences .* and the device has 8\.0 GB free"):
        decoding.check_generation_fits(model, rows=1, length=64)
