"""Starting from a pretrained Llama-family checkpoint (a local Hugging Face folder): logits equal
`transformers`' own, towers copied from it, frozen towers and rows, export back, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config_dict
from mot_core.cli import main
from mot_core.model.attention import AttentionLayout
from mot_core.model.routing import build_routing
from mot_core.experiment.build import build_experiment, build_model, model_args
from mot_core.experiment.resolve import resolve_config
from mot_core.hf.llama import read_checkpoint, start_from_pretrained
from mot_core.experiment.tokenize import prepare_vocabulary

transformers = pytest.importorskip("transformers")

SHAPES = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "max_position_embeddings": 256}


def _tokenizer(corpus: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in sorted(corpus.glob("*.txt"))], trainer=trainer)
    return tok


def hf_folder(root: Path, corpus: Path, name: str, **config) -> Path:
    """A random-weight Llama saved by `transformers` with a BPE tokenizer of the test corpus."""
    folder = root / name
    tok = _tokenizer(corpus)
    torch.manual_seed(0)
    settings = {**SHAPES, "vocab_size": tok.get_vocab_size(), "rms_norm_eps": 1e-5, **config}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings))
    with torch.no_grad():  # norm gains away from 1, so a misplaced norm shows
        for name_, param in model.named_parameters():
            if "norm" in name_:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, text_corpus):
    root = tmp_path_factory.mktemp("hf")
    return {
        "gqa": hf_folder(root, text_corpus, "gqa", num_attention_heads=4, num_key_value_heads=2),
        "tied": hf_folder(root, text_corpus, "tied", num_attention_heads=4, num_key_value_heads=4,
                          tie_word_embeddings=True),
        "llama3_rope": hf_folder(root, text_corpus, "llama3_rope", num_attention_heads=4, num_key_value_heads=1,
                                 rope_theta=50000.0,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    }


def run_config(corpus: Path, run_dir: Path, folder: Path, **model) -> dict:
    data = tiny_config_dict(corpus, run_dir)
    data["model"] = {"max_seq_len": 64, "init_from": {"path": str(folder)}, **model}
    data["mixture"]["modalities"]["text"]["options"] = {"tokenizer_path": str(folder)}  # the checkpoint folder
    return data


def build(data: dict):
    config = resolve_config(data)
    exp = build_experiment(config)
    vocab = prepare_vocabulary(exp)
    model = build_model(model_args(config, vocab), vocab)
    return config, vocab, model


def logits(model, ids: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S) ids -> (B, S, vocab) logits of a causal forward, one document per row."""
    batch, seq = ids.shape
    modality = torch.zeros_like(ids) if modality is None else modality
    plan = build_routing(modality.reshape(-1), model.args.num_modalities)
    layout = AttentionLayout.build(torch.zeros_like(ids))
    positions = torch.arange(seq).expand(batch, seq)
    hidden = plan.unsort(model(ids, positions, modality, plan, layout))
    return (hidden @ model.head_weight.T).view(batch, seq, -1)


@pytest.mark.parametrize("name", ["gqa", "tied", "llama3_rope"])
def test_a_loaded_llama_gives_transformers_logits(folders, text_corpus, tmp_path, name):
    folder = folders[name]
    config, vocab, model = build(run_config(text_corpus, tmp_path / "run", folder))
    start_from_pretrained(model, read_checkpoint(folder), config, vocab)
    reference = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, vocab.size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        got = logits(model.eval(), ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    hf = json.loads((folder / "config.json").read_text())
    assert config.model.dim == hf["hidden_size"] and config.model.n_kv_heads == hf["num_key_value_heads"]
    assert config.model.tie_embeddings == hf.get("tie_word_embeddings", False)


def test_towers_copied_from_the_checkpoint_give_the_dense_models_outputs(folders):
    """At step 0, MoT whose every tower is a copy of the pretrained one computes what the dense
    model (one shared tower) computes, on an interleaved sequence of two modalities."""
    from mot_core.model.transformer import ModelArgs, MoTTransformer
    from mot_core.hf.llama import load_llama

    checkpoint = read_checkpoint(folders["gqa"])
    s = checkpoint.settings
    shape = dict(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                 ffn_hidden=s["ffn_hidden"], norm_eps=s["norm_eps"], rope_theta=s["rope_theta"], max_seq_len=64)
    vocab = checkpoint.vocab_size + 40  # a second modality's 40 ids after the checkpoint's
    models = {}
    for name, untie in (("dense", False), ("mot", True)):
        torch.manual_seed(3)  # the same random rows for the second modality's ids
        args = ModelArgs(vocab_size=vocab, num_modalities=2, untie_ffn=untie, untie_attention=untie,
                         untie_norm=untie, **shape)
        models[name] = MoTTransformer(args).eval()
        load_llama(models[name], checkpoint, source_group=0, copy_groups=[1], row_offset=0)
    modality = (torch.arange(48) % 7 > 3).long().expand(2, 48).contiguous()
    ids = torch.where(modality == 1, torch.randint(checkpoint.vocab_size, vocab, (2, 48)),
                      torch.randint(0, checkpoint.vocab_size, (2, 48)))
    with torch.no_grad():
        dense, mot = logits(models["dense"], ids, modality), logits(models["mot"], ids, modality)
    torch.testing.assert_close(mot, dense, rtol=0, atol=1e-5)
    assert models["mot"].layers[0].wqkv.weight.shape[0] == 2 and models["dense"].layers[0].wqkv.weight.shape[0] == 1


def test_a_trained_run_exports_as_a_llama_that_transformers_loads(folders, text_corpus, tmp_path, capsys):
    """Train from the checkpoint, export the text tower: `transformers` gives the run's logits."""
    from mot_core.runs.reopen import load_run

    data = run_config(text_corpus, tmp_path / "run", folders["gqa"])
    data["train"].update(steps=3, eval_every=0, checkpoint_every=0)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    assert "init from" in capsys.readouterr().out
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--modality", "text", "--out", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    _, vocab, _, model, _ = load_run(tmp_path / "run", with_data=False)
    reference = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, vocab.size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(logits(model.eval(), ids), reference(ids).logits, rtol=0, atol=1e-5)
    trained = model.layers[0].wqkv.weight[0]
    original = transformers.LlamaForCausalLM.from_pretrained(folders["gqa"]).model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(trained[: original.shape[0]], original)  # it did train
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|endoftext|>"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 2  # not over an existing export
    assert "is not an empty folder" in capsys.readouterr().err


def test_a_run_from_scratch_exports_with_its_default_ffn_width(text_corpus, tmp_path, capsys):
    """model.ffn_hidden left unset: the export writes the width the model was built with, and
    `transformers` gives the run's logits."""
    from mot_core.runs.reopen import load_run

    data = tiny_config_dict(text_corpus, tmp_path / "run", steps=2, eval_every=0, checkpoint_every=0)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run"), "--modality", "text", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    _, vocab, _, model, _ = load_run(tmp_path / "run", with_data=False)
    reference = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reference.config.intermediate_size == model.layers[0].ffn.w2.weight.shape[-1]
    ids = torch.randint(0, vocab.size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(logits(model.eval(), ids), reference(ids).logits, rtol=0, atol=1e-5)


def _drop_tensor(folder: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    del state[name]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no_config", "has no config.json: not a Hugging Face checkpoint folder"),
        ("qwen", "architecture 'Qwen2ForCausalLM' is not supported"),
        ("missing_tensor", "lacks the tensor model.layers.1.mlp.down_proj.weight"),
        ("own_tokenizer", "modality 'text' has 300 ids but the checkpoint"),
        ("contradiction", "model.dim=32 contradicts the checkpoint"),
        ("yarn", "RoPE scaling 'yarn' is not supported"),
        ("stray_bias", "holds the tensor model.layers.0.self_attn.k_proj.bias, which a Llama model of its "
                       "config.json does not have (6 such tensors)"),
    ],
)
def test_bad_pretrained_input_is_one_line(folders, text_corpus, tmp_path, capsys, damage, message):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(folders["gqa"], folder)
    data = run_config(text_corpus, tmp_path / "run", folder)
    hf = json.loads((folder / "config.json").read_text())
    if damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "qwen":
        hf["architectures"] = ["Qwen2ForCausalLM"]
    elif damage == "missing_tensor":
        _drop_tensor(folder, "model.layers.1.mlp.down_proj.weight")
    elif damage == "own_tokenizer":
        data["mixture"]["modalities"]["text"]["options"] = {"vocab_size": 300}
    elif damage == "contradiction":
        data["model"]["dim"] = 32
    elif damage == "yarn":
        hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    elif damage == "stray_bias":  # a Qwen2-style checkpoint labelled Llama: its q/k/v biases would be dropped
        _add_tensors(folder, {f"model.layers.{i}.self_attn.{p}_proj.bias": torch.ones(64)
                              for i in range(2) for p in "qkv"})
    if damage in ("qwen", "yarn"):
        (folder / "config.json").write_text(json.dumps(hf))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("existing", [False, True], ids=["new_folder", "existing_folder"])
@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_tensor", "lacks the tensor model.layers.1.mlp.down_proj.weight"),
        ("wrong_shape", "model.layers.0.mlp.gate_proj.weight has shape (150, 64), the model expects (160, 64)"),
        ("own_tokenizer", "modality 'text' has 300 ids but the checkpoint"),
    ],
)
def test_a_refused_checkpoint_leaves_nothing_behind_and_the_corrected_run_starts(
        folders, text_corpus, tmp_path, capsys, monkeypatch, existing, damage, message):
    """A checkpoint whose tensors do not fit is refused before any tokenizer is prepared, so
    neither state/ nor tokens/ is written (what a refused start wrote for another refusal is
    removed, the run folder given or not); the corrected run then starts in the same folder."""
    import shutil

    from mot_core.hf.metadata import kept_folder
    from mot_core.runs import start

    folder = tmp_path / "ckpt"
    shutil.copytree(folders["gqa"], folder)
    run = tmp_path / "run"
    if existing:
        run.mkdir()
    data = run_config(text_corpus, run, folder)
    data["train"].update(steps=1, eval_every=0, checkpoint_every=0)
    if damage == "missing_tensor":
        _drop_tensor(folder, "model.layers.1.mlp.down_proj.weight")
    elif damage == "wrong_shape":
        _replace_tensor(folder, "model.layers.0.mlp.gate_proj.weight", torch.zeros(150, 64))
    else:
        data["mixture"]["modalities"]["text"]["options"] = {"vocab_size": 300}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    with monkeypatch.context() as patched:
        if damage != "own_tokenizer":  # the tensors are checked before the tokenizers are fitted or loaded
            patched.setattr(start, "prepare_vocabulary", lambda *a, **k: pytest.fail("tokenizers prepared first"))
        assert main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert run.is_dir() == existing and not (run / "state").exists() and not (run / "tokens").exists()
    data = run_config(text_corpus, run, folders["gqa"])  # its own tokenizer_path: options the refused start lacked
    data["train"].update(steps=1, eval_every=0, checkpoint_every=0)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0, capsys.readouterr().err
    assert (run / "checkpoints" / "step_0000001" / "meta.json").is_file()
    assert (kept_folder(run) / "config.json").read_bytes() == (folders["gqa"] / "config.json").read_bytes()


def _add_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    save_file({**state, **tensors}, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_tensors_transformers_ignores_are_allowed_and_any_other_is_refused_by_name(folders, text_corpus, tmp_path):
    """A tied checkpoint that also stores lm_head.weight and old checkpoints' rotary_emb.inv_freq
    buffers load, as transformers loads them; a tensor beyond the config's layers does not."""
    import shutil

    from mot_core.errors import MotError
    from mot_core.hf.llama import check_tensors

    folder = tmp_path / "tied"
    shutil.copytree(folders["tied"], folder)
    config = resolve_config(run_config(text_corpus, tmp_path / "run", folder))
    assert config.model.tie_embeddings
    from safetensors.torch import load_file

    embed = load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]
    _add_tensors(folder, {"lm_head.weight": embed.clone(), "model.rotary_emb.inv_freq": torch.ones(8),
                          **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)}})
    check_tensors(read_checkpoint(folder), config.model)
    _add_tensors(folder, {"model.layers.2.mlp.down_proj.weight": torch.zeros(64, 160),
                          "model.layers.10.mlp.down_proj.weight": torch.zeros(64, 160)})
    with pytest.raises(MotError, match=r"holds the tensor model\.layers\.2\.mlp\.down_proj\.weight, .*\(2 such tensors\)"):
        check_tensors(read_checkpoint(folder), config.model)


def _replace_tensor(folder: Path, name: str, tensor: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state[name] = tensor
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.slow
def test_a_frozen_pretrained_text_tower_stays_bit_identical_while_the_image_tower_learns(folders, tmp_path, capsys,
                                                                                        prepared_vq):
    """LMFusion-style: text + VQ images from the checkpoint, the text tower and the text rows of
    the embedding and head frozen, the image tower starting as a copy of the text tower. After
    training, every frozen weight is the checkpoint's, bit for bit; the image tower and image
    rows moved; the optimizer holds no state for a frozen tensor."""
    from safetensors.torch import load_file

    from test_chameleon_pipeline import tiny_chameleon

    folder = folders["gqa"]
    data = tiny_chameleon(*prepared_vq, tmp_path / "run")
    data["model"] = {"max_seq_len": 160, "init_from": {"path": str(folder)}}
    data["train"].update(steps=6, eval_every=0, checkpoint_every=0, lr=1e-2, eval_at_start=True)
    text = data["mixture"]["modalities"]["text"]
    text["options"] = {"tokenizer_path": str(folder)}
    text["tower"] = {"trainable": False, "vocab_rows_trainable": False}
    data["mixture"]["modalities"]["image"]["tower"] = {"init": "copy"}
    config = tmp_path / "frozen.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "towers copied from it: image" in out
    step = tmp_path / "run" / "checkpoints" / "step_0000006"
    state = load_file(str(step / "model.safetensors"))
    hf = load_file(str(folder / "model.safetensors"))
    text_rows = hf["model.embed_tokens.weight"].shape[0]
    assert torch.equal(state["embed.weight_frozen"], hf["model.embed_tokens.weight"])  # text rows come first
    assert torch.equal(state["lm_head.weight_frozen"], hf["lm_head.weight"])
    for i in range(2):
        layer = f"model.layers.{i}."
        qkv = torch.cat([hf[layer + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(state[f"layers.{i}.wqkv.weight_frozen"][0], qkv)
        assert torch.equal(state[f"layers.{i}.wo.weight_frozen"][0], hf[layer + "self_attn.o_proj.weight"])
        assert torch.equal(state[f"layers.{i}.ffn.w2.weight_frozen"][0], hf[layer + "mlp.down_proj.weight"])
        assert torch.equal(state[f"layers.{i}.attn_norm.weight_frozen"][0], hf[layer + "input_layernorm.weight"])
        # the image tower started as this copy and learned
        assert (state[f"layers.{i}.wqkv.weight"][0] - qkv).abs().max() > 1e-4
    assert torch.equal(state["final_norm.weight_frozen"][0], hf["model.norm.weight"])
    assert state["embed.weight"].shape[0] == state["lm_head.weight"].shape[0] > 0  # the image rows train
    moments = torch.load(step / "trainer.pt", weights_only=False)["optimizer"]["state"].values()
    trainable = sum(v.numel() for k, v in state.items() if not k.endswith("_frozen"))
    frozen = sum(v.numel() for k, v in state.items() if k.endswith("_frozen"))
    assert sum(m["exp_avg"].numel() for m in moments) == trainable and frozen > 0  # no state for a frozen weight
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[-1]["step"] == 6
    assert records[-1]["loss/image"] < records[1]["loss/image"]
    assert state["embed.weight_frozen"].shape[0] == text_rows


def test_the_lmfusion_example_resolves_against_a_checkpoint(folders, capsys):
    """The example config, pointed at a checkpoint folder, takes the model's shape from it."""
    example = Path(__file__).resolve().parents[1] / "examples" / "configs" / "lmfusion_smollm.yaml"
    folder = folders["gqa"]
    assert main(["config", "show", str(example), f"model.init_from.path={folder}"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    hf = json.loads((folder / "config.json").read_text())
    assert shown["model"]["dim"] == hf["hidden_size"] and shown["model"]["n_layers"] == hf["num_hidden_layers"]
    assert shown["mixture"]["modalities"]["text"]["options"]["tokenizer_path"] == str(folder)
    assert shown["mixture"]["modalities"]["text"]["tower"]["trainable"] is False


def test_a_run_where_nothing_would_train_is_one_line(folders, text_corpus, tmp_path, capsys):
    data = run_config(text_corpus, tmp_path / "run", folders["gqa"])
    data["mixture"]["modalities"]["text"]["tower"] = {"trainable": False, "vocab_rows_trainable": False}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing would train: every tower and every vocabulary row is frozen" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_validation_at_step_0_equals_the_checkpoints_own_loss_on_the_same_data(folders, text_corpus, tmp_path):
    """`train.eval_at_start`: the run's step-0 validation loss is the checkpoint's own loss as
    `transformers` computes it on the same held-out rows, document by document (each packed
    document alone, with the run's positions), to fp32 precision."""
    from mot_core.data import fixed_batches
    from mot_core.plugin_api import IGNORE_INDEX
    from mot_core.runs.reopen import load_run

    folder = folders["gqa"]
    data = run_config(text_corpus, tmp_path / "run", folder)
    data["train"].update(steps=1, eval_every=0, eval_at_start=True, eval_batches=3, batch_size=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "loss/text" not in records[0]
    exp, vocab, opened, _, _ = load_run(tmp_path / "run")
    tcfg = exp.config.train
    batches = fixed_batches(opened.val, tcfg.batch_size, tcfg.seq_len, tcfg.eval_batches, len(vocab.names), None)
    reference = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            for row in range(batch.tokens.shape[0]):
                for document in batch.document[row].unique():
                    where = batch.document[row] == document
                    ids, targets = batch.tokens[row][where], batch.targets[row][where]
                    out = reference(ids[None], position_ids=batch.positions[row][where][None]).logits[0]
                    valid = targets != IGNORE_INDEX
                    losses = torch.nn.functional.cross_entropy(out[valid], targets[valid], reduction="sum")
                    total, count = total + float(losses), count + int(valid.sum())
    assert count > 100
    assert records[0]["val/text/loss"] == pytest.approx(total / count, rel=1e-5)
