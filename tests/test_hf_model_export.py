"""The whole MoT model exported as a Hugging Face model (``mot export RUN --format hf``).

The maths: the exported ``MoTForCausalLM`` (mot_core/hf/remote, the code the folder carries)
gives the trainer's logits for every tower layout (dense, MoT, tower groups, MoE-4x, MoT+MoE
hybrids, post-norm, QK-norm, GQA, scaled RoPE, tied embeddings, frozen rows, markers hosted by
another modality), over a full sequence, a KV-cached decode and a left-padded batch.
The round trip: real runs exported, loaded by ``transformers`` in a process that cannot import
this package, with the same logits, greedy generations and processor ids as the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from mot_core.cli import main
from mot_core.model.attention import AttentionLayout
from mot_core.model.moe import MoEArgs
from mot_core.model.rope import RopeScaling
from mot_core.model.routing import build_routing
from mot_core.model.transformer import ModelArgs, MoTTransformer
from mot_core.plugin_api import SpanGrammar
from mot_core.runs.export_whole import exported_tensors, model_config

SIZES = (40, 24, 18)  # ids of each modality: text-like, an image-like span modality, a third


def _vocab(modalities: int, hosts: tuple[int, ...] | None = None):
    """A stand-in for the run's Vocabulary: what ``model_config`` reads."""
    names = ["text", "image", "third"][:modalities]
    offsets, total, mods = {}, 0, {}
    for i, name in enumerate(names):
        offsets[name] = total
        total += SIZES[i]
        grammar = SpanGrammar(begin=SIZES[i] - 2, end=SIZES[i] - 1, body_lo=0, body_hi=SIZES[i] - 2, length=4) \
            if name == "image" else None
        mods[name] = SimpleNamespace(vocab_size=SIZES[i], stop_token=0 if name == "text" else None,
                                     span_grammar=lambda g=grammar: g)
    hosts = hosts or tuple(range(modalities))
    return SimpleNamespace(names=names, offsets=offsets, size=total, modalities=mods,
                           marker_host={n: hosts[i] for i, n in enumerate(names)})


def _mot_logits(model: MoTTransformer, vocab, ids: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    table = torch.cat([torch.full((SIZES[i],), vocab.marker_host[n]) for i, n in enumerate(vocab.names)])
    modality = table[ids]
    plan = build_routing(modality, len(vocab.names))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        hidden = plan.unsort(model(ids, positions, modality, plan, AttentionLayout.build(torch.zeros_like(ids))))
        return F.linear(hidden, model.head_weight).float().view(*ids.shape, -1)


LAYOUTS = {
    "dense": dict(modalities=2, untie_ffn=False, untie_attention=False, untie_norm=False),
    "mot": dict(modalities=3),
    "mot_gqa_qknorm_llama3": dict(modalities=3, n_kv_heads=2, qk_norm=(True, False, True),
                                  rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 64)),
    "post_norm_tied_groups": dict(modalities=3, norm_placement="post", tie_embeddings=True, groups=(0, 0, 1)),
    "moe4x": dict(modalities=2, untie_ffn=False, untie_attention=False, untie_norm=False,
                  ffn_kinds=(MoEArgs(experts=4),) * 2),
    "hybrid_text_moe_bias": dict(modalities=3, ffn_kinds=(MoEArgs(experts=4, router="top_k", top_k=2, balance="bias"),
                                                          None, None)),
    "frozen_text_tower_and_rows": dict(modalities=2, frozen_groups=(0,), frozen_rows=((0, 40),)),
    "markers_hosted_by_text": dict(modalities=3, hosts=(0, 1, 0), rope_scaling=RopeScaling("linear", 2.0)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exported_model_gives_the_trainers_logits(layout):
    from mot_core.hf.remote.configuration_mot import MoTConfig
    from mot_core.hf.remote.modeling_mot import MoTForCausalLM

    spec = dict(LAYOUTS[layout])
    modalities, hosts = spec.pop("modalities"), spec.pop("hosts", None)
    vocab = _vocab(modalities, hosts)
    torch.manual_seed(0)
    model = MoTTransformer(ModelArgs(vocab_size=vocab.size, num_modalities=modalities, dim=32, n_layers=2, n_heads=4,
                                     max_seq_len=64, **spec)).eval()
    with torch.no_grad():  # gains and biases away from their initial values: every tower's own weights matter
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.2 * torch.randn_like(tensor))
    hf = MoTForCausalLM(MoTConfig(**model_config(model, vocab))).eval()
    hf.load_state_dict(exported_tensors(model), strict=True)

    ids = torch.randint(0, vocab.size, (2, 20))
    ours = _mot_logits(model, vocab, ids)
    with torch.no_grad():
        theirs = hf(ids).logits
        assert (ours - theirs).abs().max() < 1e-4, layout
        # KV-cached decoding: a prompt, then one token at a time
        out = hf(ids[:, :12], use_cache=True)
        cache, steps = out.cache if hasattr(out, "cache") else out.past_key_values, [out.logits]
        for t in range(12, 20):
            step = hf(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(step.logits)
        assert (torch.cat(steps, dim=1) - ours).abs().max() < 1e-4, layout
        # a left-padded row reads like the row alone
        padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids[:1, :15]], dim=1)
        mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 15, dtype=torch.long)], dim=1)
        assert (hf(padded, attention_mask=mask).logits[:, 5:] - ours[:1, :15]).abs().max() < 1e-4, layout


def test_generation_keeps_spans_whole():
    """``generate`` emits a span as the trainer does: body ids up to its length, then its end."""
    from mot_core.hf.remote.configuration_mot import MoTConfig
    from mot_core.hf.remote.modeling_mot import MoTForCausalLM

    vocab = _vocab(2)
    torch.manual_seed(1)
    model = MoTTransformer(ModelArgs(vocab_size=vocab.size, num_modalities=2, dim=32, n_layers=1, n_heads=2,
                                     max_seq_len=64)).eval()
    hf = MoTForCausalLM(MoTConfig(**model_config(model, vocab))).eval()
    hf.load_state_dict(exported_tensors(model))
    begin, end = 40 + 22, 40 + 23
    prompt = torch.tensor([[5, 6, 0, begin]])
    out = hf.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    assert all(40 <= t < 40 + 22 for t in out[:4]) and out[4] == end
    text_only = hf.generate(torch.tensor([[5, 6]]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                            allowed_modalities=["text"])[0, 2:].tolist()
    assert all(t < 40 for t in text_only)
    # a left-padded batch generates what each prompt generates alone
    prompts = [[5, 6, 0, begin], [7, 0, begin]]
    alone = [hf.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
             for p in prompts]
    ids = torch.tensor([prompts[0], [0] + prompts[1]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    batched = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, 4:].tolist()
    assert batched == alone


# --- the round trip: real runs, exported and loaded without this package ------------------------


def _run(base: Path, prepared_vq, name: str, **overrides) -> Path:
    from test_chameleon_pipeline import tiny_chameleon

    data = tiny_chameleon(prepared_vq[0], prepared_vq[1], base / name)
    data["train"].update(steps=2, eval_every=2, checkpoint_every=2, log_every=1)
    for key, value in overrides.items():
        section, _, rest = key.partition(".")
        target = data[section]
        *path, last = rest.split(".")
        for part in path:
            target = target.setdefault(part, {})
        target[last] = value
    config = base / f"{name}.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["train", str(config)]) == 0
    return base / name


@pytest.mark.slow
def test_round_trip_without_mot(tmp_path, prepared_vq, write_config, monkeypatch):
    """The Chameleon MoT model (sharded safetensors), a MoT+MoE hybrid and a text-only model:
    exported, loaded by transformers in a process that cannot import mot, same logits and
    greedy generations as the run, the processor's ids the run's own."""
    import mot_core.runs.export_whole as export_whole
    from mot_core.bench.hf_roundtrip import format_table, roundtrip

    image = sorted((prepared_vq[0]).rglob("*.png"))[0]
    text_config = write_config("text_only", steps=2, eval_every=2, checkpoint_every=2)
    assert main(["train", str(text_config)]) == 0
    runs = {
        "chameleon_mot": _run(tmp_path, prepared_vq, "chameleon_mot"),
        "hybrid_text_moe": _run(tmp_path, prepared_vq, "hybrid",
                                **{"mixture.modalities.text.tower": {"ffn": {"type": "moe", "experts": 4}}}),
        "text_only": tmp_path / "text_only",
    }
    rows = []
    for name, run in runs.items():
        # the first in shards and their index, as a large model has them
        monkeypatch.setattr(export_whole, "MAX_SHARD_SIZE", "100KB" if name == "chameleon_mot" else "5GB")
        row = roundtrip(run, image_file=image if name != "text_only" else None, keep=tmp_path / f"export_{name}")
        rows.append(row)
        assert row["max_logit_diff"] < 1e-4, (name, row)
        assert all(row["generations"].values()) and len(row["generations"]) == (1 if name == "text_only" else 3), row
        assert row["processor_matches"], row
    sharded = tmp_path / "export_chameleon_mot"
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*.safetensors"))) > 1
    assert rows[0]["decoded_image"] == [32, 32]
    config = json.loads((sharded / "config.json").read_text())
    assert config["model_type"] == "mot" and config["auto_map"]["AutoModelForCausalLM"] == "modeling_mot.MoTForCausalLM"
    from transformers import AutoTokenizer

    from mot_core.runs.reopen import load_run

    # text's ids start at 0 in the text-only model, so its folder reads as a causal LM's; in the
    # Chameleon run (YAML sorts the modalities: image first) they do not, and there is no root tokenizer
    _, vocab, _, _, _ = load_run(runs["text_only"], with_data=False)
    text_folder = tmp_path / "export_text_only"
    tokenizer = AutoTokenizer.from_pretrained(text_folder, trust_remote_code=True)
    assert tokenizer("a grinning face").input_ids == vocab.modalities["text"].encode_prompt("a grinning face").tolist()
    assert tokenizer.eos_token_id == json.loads((text_folder / "config.json").read_text())["eos_token_id"]
    assert not (sharded / "tokenizer.json").exists()
    card = (sharded / "README.md").read_text()
    assert "| text |" in card and "| image |" in card and "val/" in card and "mixture:" in card
    print(format_table(rows))
    # the docs' recipe (examples/use_exported_model.py): caption an image and draw one, without mot
    from mot_core.bench.hf_roundtrip import NO_MOT_PRELUDE

    script = Path(__file__).resolve().parent.parent / "examples" / "use_exported_model.py"
    code = NO_MOT_PRELUDE + f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code, str(sharded), str(image)], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "caption:" in result.stdout and (tmp_path / "drawn.png").is_file()


def test_what_cannot_be_exported_is_refused_in_one_line():
    """A continuous modality, a modality without a codec, a non-causal inference router."""
    from mot_core.errors import MotError
    from mot_core.runs.export_whole import check_exportable

    class NoCodec:  # a Modality subclass that does not override export_hf
        input_dim = None

    from mot_core.plugin_api import Modality

    NoCodec.export_hf = Modality.export_hf
    model = MoTTransformer(ModelArgs(vocab_size=64, num_modalities=2, dim=16, n_layers=1, n_heads=2))
    cases = (
        ({"text": SimpleNamespace(input_dim=None, export_hf=lambda f: None), "image": SimpleNamespace(input_dim=8)},
         model, "has continuous values"),
        ({"text": NoCodec(), "image": NoCodec()}, model, "has no Hugging Face codec"),
    )
    for modalities, m, expected in cases:
        vocab = SimpleNamespace(names=list(modalities), modalities=modalities)
        with pytest.raises(MotError, match=expected):
            check_exportable(vocab, m)
    chooser = MoTTransformer(ModelArgs(vocab_size=64, num_modalities=1, dim=16, n_layers=1, n_heads=2,
                                       ffn_kinds=(MoEArgs(inference_router="expert_choice"),)))
    class WithCodec:
        input_dim = None

        def export_hf(self, folder):
            return None

    text = WithCodec()
    with pytest.raises(MotError, match="expert-choice at inference"):
        check_exportable(SimpleNamespace(names=["text"], modalities={"text": text}), chooser)


def test_bad_out_leaves_nothing(tmp_path, write_config):
    """An --out that holds files, or a modality the run lacks: one line, exit 2, nothing written."""
    config = write_config(steps=2, eval_every=2, checkpoint_every=2)
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    for args, expected in (
        (["--out", str(taken)], "is not an empty folder"),
        (["--out", str(tmp_path / "new"), "--modality", "nope"], "is not a modality of the run"),
    ):
        result = subprocess.run([sys.executable, "-m", "mot_core.cli", "export", str(run), *args],
                                capture_output=True, text=True)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "new").exists() and [p.name for p in taken.iterdir()] == ["x"]


def test_plugins_check_holds_a_codec_to_the_runs_ids(tmp_path):
    """``mot plugins check``'s codec line: PASS when the codec encodes as ``encode`` does; one
    FAIL line when its code imports mot, or when it encodes to other ids."""
    from mot_core.errors import MotError
    from mot_core.plugin_api import HFCodec, RawDocument, RawSegment
    from mot_core.testing.conformance import _hf_codec

    class Counting:  # a modality whose ids are (length, 1)
        def __init__(self, body: str):
            self.body = body

        def export_hf(self, folder: Path) -> HFCodec:
            folder.mkdir(parents=True, exist_ok=True)
            code = tmp_path / "codec.py"
            code.write_text(self.body)
            return HFCodec(code=(code,), class_name="codec.Codec")

        def encode(self, payload: str) -> torch.Tensor:
            return torch.tensor([len(payload), 1])

    head = "class Codec:\n    def __init__(self, folder, settings):\n        pass\n"
    docs = {"source": [RawDocument((RawSegment("m", "abc"),)), RawDocument((RawSegment("m", "hello"),))]}
    good = head + "    def encode(self, payload):\n        return [len(payload), 1]\n"
    line = _hf_codec(SimpleNamespace(modalities={"m": Counting(good)}), "m", docs, tmp_path / "a")
    assert line.startswith("2 held-out segments encode to the run's ids")
    with pytest.raises(MotError, match="imports mot_core.errors; an exported codec runs without this package"):
        _hf_codec(SimpleNamespace(modalities={"m": Counting("import mot_core.errors\n" + good)}), "m", docs, tmp_path / "b")
    other = head + "    def encode(self, payload):\n        return [len(payload), 2]\n"
    with pytest.raises(MotError, match="other ids than training did"):
        _hf_codec(SimpleNamespace(modalities={"m": Counting(other)}), "m", docs, tmp_path / "c")
