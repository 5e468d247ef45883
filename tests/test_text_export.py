"""`mot export --modality text` keeps what the checkpoint the run started from had (its token
ids, max_position_embeddings, RoPE scaling, dtype, generation config, tokenizer config and chat
template, from the run's own copy), and writes the run's own metadata where there was none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config_dict
from mot_core.cli import main
from mot_core.hf.metadata import KEPT, added_bos, export_dtype, kept_folder
from mot_core.errors import MotError
from mot_core.runs.export import export_run
from test_pretrained import SHAPES, logits, run_config
from test_s3_storage import s3  # noqa: F401  (the fixture)

transformers = pytest.importorskip("transformers")

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "user", "content": "What does a for statement do?"},
            {"role": "assistant", "content": "It loops."}]
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}


def _tokenizer(corpus: Path):
    """Byte-level BPE whose post-processor puts <s> first (ids 0-2: <pad>, <s>, </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in sorted(corpus.glob("*.txt"))], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def source_folder(root: Path, corpus: Path, template_in: str) -> Path:
    """A bf16 Llama saved by `transformers` with bos/eos/pad ids, max_position_embeddings 512
    (the run's max_seq_len is 64), Llama 3.1 RoPE scaling, a generation config, and a tokenizer
    with its config and a chat template (in tokenizer_config.json, or in chat_template.jinja)."""
    folder = root / "source"
    tok = _tokenizer(corpus)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**SHAPES, "max_position_embeddings": 512}, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=tok.get_vocab_size(), rms_norm_eps=1e-5,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=50000.0,
                                      rope_scaling=ROPE, dtype=torch.bfloat16)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, 0], pad_token_id=0,
                                                            do_sample=True, temperature=0.6, top_p=0.9)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, "bos_token": "<s>",
                "eos_token": "</s>", "pad_token": "<pad>", "clean_up_tokenization_spaces": False}
    if template_in == "tokenizer_config":
        settings["chat_template"] = TEMPLATE
    else:
        (folder / "chat_template.jinja").write_text(TEMPLATE)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "pad_token": "<pad>"}, indent=2))
    return folder


def train(corpus: Path, tmp_path: Path, data: dict, capsys) -> Path:
    data["train"].update(steps=2, eval_every=0, checkpoint_every=0)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0, capsys.readouterr().err
    capsys.readouterr()
    return Path(data["run"]["dir"])


def safetensors_dtypes(folder: Path) -> set[torch.dtype]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {handle.get_tensor(name).dtype for name in handle.keys()}


@pytest.mark.parametrize("template_in", ["tokenizer_config", "jinja"])
def test_an_export_keeps_what_the_source_checkpoint_had(text_corpus, tmp_path, capsys, template_in):
    source = source_folder(tmp_path, text_corpus, template_in)
    run = train(text_corpus, tmp_path, run_config(text_corpus, tmp_path / "run", source), capsys)
    kept = sorted(p.name for p in kept_folder(run).iterdir())
    assert kept == sorted(name for name in KEPT if (source / name).is_file())
    moved = tmp_path / "moved"
    source.rename(moved)  # the export reads the run's copy: the checkpoint folder may be gone
    out = tmp_path / "exported"
    assert main(["export", str(run), "--format", "hf", "--modality", "text", "--out", str(out)]) == 0
    assert "bfloat16" in capsys.readouterr().out

    hf, got = (json.loads((folder / "config.json").read_text()) for folder in (moved, out))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "rope_parameters",
                "dtype", "architectures"):
        assert got[key] == hf[key], key
    assert got["max_position_embeddings"] == 512 and hf["rope_parameters"]["rope_type"] == "llama3"
    assert "torch_dtype" not in got and "rope_scaling" not in got  # the source's layout (transformers 5)
    for name in KEPT[1:]:
        if (moved / name).is_file():
            assert (out / name).read_bytes() == (moved / name).read_bytes(), name
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.to_dict() == transformers.GenerationConfig.from_pretrained(moved).to_dict()
    assert generation.eos_token_id == [2, 0] and generation.temperature == 0.6

    exported, original = (transformers.AutoTokenizer.from_pretrained(f) for f in (out, moved))
    assert (exported.bos_token, exported.eos_token, exported.pad_token) == ("<s>", "</s>", "<pad>")
    for tokenize in (False, True):
        chat = exported.apply_chat_template(MESSAGES, tokenize=tokenize, add_generation_prompt=True)
        assert chat == original.apply_chat_template(MESSAGES, tokenize=tokenize, add_generation_prompt=True)
    assert exported.apply_chat_template(MESSAGES, tokenize=False).startswith("<s><|user|>What does")

    assert safetensors_dtypes(out) == {torch.bfloat16}
    reference = transformers.LlamaForCausalLM.from_pretrained(out)
    assert reference.dtype == torch.bfloat16 and reference.config.rope_parameters["rope_type"] == "llama3"
    full = tmp_path / "fp32"
    assert "float32" in export_run(run, "text", full, dtype="float32")
    assert safetensors_dtypes(full) == {torch.float32}
    assert json.loads((full / "config.json").read_text())["dtype"] == "float32"
    from mot_core.runs.reopen import load_run

    _, vocab, _, model, _ = load_run(run, with_data=False)
    reference = transformers.LlamaForCausalLM.from_pretrained(full, dtype=torch.float32).eval()
    ids = torch.randint(0, vocab.size, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # the trained tower, under the source's RoPE scaling
        torch.testing.assert_close(logits(model.eval(), ids), reference(ids).logits, rtol=0, atol=1e-5)


def test_a_run_without_its_copy_exports_its_own_metadata(text_corpus, tmp_path, capsys):
    """A run whose first start predates the copy (here: removed) exports as before: the run's
    stop token, its tokenizer's BOS, its max_seq_len, float32; no chat template."""
    source = source_folder(tmp_path, text_corpus, "tokenizer_config")
    run = train(text_corpus, tmp_path, run_config(text_corpus, tmp_path / "run", source), capsys)
    shutil.rmtree(kept_folder(run))
    out = tmp_path / "exported"
    export_run(run, "text", out)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, None)
    assert config["max_position_embeddings"] == 64 and config["torch_dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                       "pad_token_id": None}
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>") and tokenizer.chat_template is None
    assert not (out / "special_tokens_map.json").exists()


def test_a_run_from_scratch_exports_the_runs_token_ids(text_corpus, tmp_path, capsys):
    """No init_from, model.ffn_hidden unset: eos is the text stop token, no BOS (the fitted BPE
    adds none), a generation config of those ids, float32 (bfloat16 when asked)."""
    data = tiny_config_dict(text_corpus, tmp_path / "run")
    run = train(text_corpus, tmp_path, data, capsys)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--modality", "text", "--out", str(out)]) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|endoftext|>" and config["eos_token_id"] == tokenizer.eos_token_id
    assert config["bos_token_id"] is None and tokenizer.bos_token is None
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (
        None, config["eos_token_id"], None)
    assert safetensors_dtypes(out) == {torch.float32} and not kept_folder(run).exists()
    half = tmp_path / "bf16"
    export_run(run, "text", half, dtype="bfloat16")
    assert safetensors_dtypes(half) == {torch.bfloat16}
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_a_transformers_4_source_keeps_its_own_rope_and_dtype_keys(tmp_path):
    """A source config.json in transformers 4's layout (rope_theta, rope_scaling, torch_dtype)
    is written back in that layout, which transformers 5 reads as the model's RoPE."""
    from mot_core.hf.llama import export_llama
    from mot_core.model.rope import RopeScaling
    from mot_core.model.transformer import ModelArgs, MoTTransformer

    scaling = RopeScaling(kind="llama3", factor=8.0, original_max_position=32)
    torch.manual_seed(0)
    model = MoTTransformer(ModelArgs(vocab_size=80, num_modalities=1, dim=32, n_layers=1, n_heads=2, ffn_hidden=64,
                                     rope_theta=50000.0, rope_scaling=scaling, max_seq_len=64)).eval()
    rope = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    source = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "vocab_size": 80,
              "rope_theta": 50000.0, "rope_scaling": rope, "torch_dtype": "float16", "max_position_embeddings": 1024,
              "eos_token_id": [5, 6], "transformers_version": "4.46.0"}
    export_llama(model, 0, 0, 80, 64, tmp_path, {"eos_token_id": 1, "bos_token_id": None}, dtype="float32",
                 source=source)
    config = json.loads((tmp_path / "config.json").read_text())
    assert {k: config[k] for k in source} == {**source, "torch_dtype": "float32"}
    assert "rope_parameters" not in config and "dtype" not in config and config["bos_token_id"] is None
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 80, (1, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), reference(ids).logits, rtol=0, atol=1e-5)


def test_the_export_dtype_and_the_tokenizers_bos(text_corpus):
    assert export_dtype(None, None) == "float32"
    assert export_dtype(None, {"dtype": "bfloat16"}) == "bfloat16"
    assert export_dtype(None, {"torch_dtype": "float16"}) == "float16"  # transformers 4's key
    assert export_dtype("float32", {"dtype": "bfloat16"}) == "float32"
    with pytest.raises(MotError, match="give --dtype"):
        export_dtype(None, {"torch_dtype": "float64"})
    with pytest.raises(MotError, match="is not one of float32, bfloat16, float16"):
        export_dtype("int8", None)
    tok = _tokenizer(text_corpus)
    assert added_bos(tok) == 1
    tok.post_processor = None
    assert added_bos(tok) is None


def test_the_runs_copy_travels_with_a_run_folder_on_an_object_store(s3, text_corpus, tmp_path, capsys,  # noqa: F811
                                                                     monkeypatch):
    """A run trained into the store from a checkpoint that is then deleted exports, on another
    machine (another working copy), with the checkpoint's metadata."""
    import uuid

    source = source_folder(tmp_path, text_corpus, "tokenizer_config")
    uri = f"s3://{s3.bucket}/kept-{uuid.uuid4().hex[:8]}/run?endpoint_override={s3.endpoint}"
    data = run_config(text_corpus, tmp_path / "unused", source)
    data["run"]["dir"] = uri
    monkeypatch.setenv("MOT_RUN_CACHE", str(tmp_path / "machine_a"))
    train(text_corpus, tmp_path, data, capsys)
    kept = {name: (source / name).read_bytes() for name in ("generation_config.json", "tokenizer_config.json")}
    shutil.rmtree(source)
    monkeypatch.setenv("MOT_RUN_CACHE", str(tmp_path / "machine_b"))
    out = tmp_path / "exported"
    assert main(["export", uri, "--modality", "text", "--out", str(out)]) == 0, capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 512
    assert safetensors_dtypes(out) == {torch.bfloat16}
