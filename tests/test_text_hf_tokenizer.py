"""The text plugin on a local Hugging Face checkpoint's tokenizer: a folder with tokenizer.json,
tokenizer_config.json and config.json (Llama 3 style byte-level BPE with a BOS post-processor,
and Llama 2 style SentencePiece BPE with byte fallback), built here with ``tokenizers`` and
``transformers``; nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mot_core.errors import MotError
from plugins.text.modality import Text, TextOptions

SAMPLE = "Unicode works too: naïve café — 東京.\nA second line, with tabs\tand  spaces."
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
PADDED_VOCAB = 768  # config.json's vocab_size: the embedding is padded past the tokenizer (400 and 659 tokens)


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)[:20]]


def _byte_level(eos_in_template: bool = False) -> Tokenizer:
    """A Llama 3 style tokenizer: a regex split, then byte-level BPE, and a post-processor that
    adds BOS (and EOS)."""
    tok = Tokenizer(models.BPE())
    split = pre_tokenizers.Split(Regex(r" ?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+"), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS, "<|reserved_0|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    single = f"{BOS} $A {EOS}" if eos_in_template else f"{BOS} $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    return tok


def _sentencepiece(legacy: bool = False) -> Tokenizer:
    """A Llama 2 style tokenizer: BPE over ``▁``-spaced pieces, with <0x00>..<0xFF> byte-fallback
    tokens for characters outside its vocabulary, and a post-processor adding <s>. ``legacy``:
    spaces become ``▁`` in a normalizer and a Replace decoder (older conversions), not Metaspace."""
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    learner.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(vocab_size=400, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    pieces += [p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if p not in pieces]
    merges = [tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def _save_checkpoint(tok: Tokenizer, folder: Path, bos: str, eos: str) -> Path:
    """What ``save_pretrained`` of a checkpoint writes for its tokenizer, plus its config.json."""
    import transformers

    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "vocab_size": PADDED_VOCAB}))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("checkpoints")
    return {
        "byte_level": _save_checkpoint(_byte_level(), base / "llama3", BOS, EOS),
        "sentencepiece": _save_checkpoint(_sentencepiece(), base / "llama2", "<s>", "</s>"),
        "sentencepiece_legacy": _save_checkpoint(_sentencepiece(legacy=True), base / "llama2_legacy", "<s>", "</s>"),
    }


@pytest.fixture
def checkpoint(checkpoints, tmp_path) -> Path:
    """A copy of the byte-level checkpoint that a test may change or delete."""
    return Path(shutil.copytree(checkpoints["byte_level"], tmp_path / "checkpoint"))


def _text(tmp_path: Path, folder: Path, name: str = "state", **options) -> Text:
    text = Text(TextOptions(tokenizer_path=str(folder), **options), tmp_path / name / "text")
    text.prepare([])  # a given tokenizer is not fitted: the training text is not read
    return text


@pytest.mark.parametrize("style", ["byte_level", "sentencepiece", "sentencepiece_legacy"])
def test_documents_are_encoded_as_the_checkpoint_was_trained(checkpoints, tmp_path, style):
    """The ids transformers gives (the post-processor's BOS first), then the eos_token of
    tokenizer_config.json; the vocabulary is config.json's padded embedding size."""
    import transformers

    folder = checkpoints[style]
    text = _text(tmp_path, folder)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    documents = [SAMPLE, "hello world", "", "x" * 50]
    ids = [text.encode(d) for d in documents]
    for document, got in zip(documents, ids):
        assert got.tolist() == [*reference(document)["input_ids"], reference.eos_token_id]
        assert got[0] == reference.bos_token_id and got.dtype == torch.long
    assert text.eot == text.stop_token == reference.eos_token_id
    assert [t.tolist() for t in text.encode_batch(documents)] == [t.tolist() for t in ids]
    assert text.vocab_size == PADDED_VOCAB > text.tokenizer.get_vocab_size()
    assert text.decode(ids[0]) == SAMPLE
    assert text.decode(torch.tensor([*ids[1].tolist(), PADDED_VOCAB - 1])) == "hello world"  # padding has no text


def test_a_post_processor_that_adds_the_end_token_does_not_get_it_twice(tmp_path):
    import transformers

    folder = _save_checkpoint(_byte_level(eos_in_template=True), tmp_path / "checkpoint", BOS, EOS)
    text = _text(tmp_path, folder)
    ids = text.encode("hello world").tolist()
    assert ids == transformers.AutoTokenizer.from_pretrained(folder)("hello world")["input_ids"]
    assert ids.count(text.eot) == 1 and ids[-1] == text.eot
    assert text.encode_prompt("hello world").tolist() == ids[:-1]
    assert [t.tolist() for t in text.encode_batch(["hello world"])] == [ids]


def test_prompts_keep_bos_and_refuse_special_tokens_of_their_own_text(checkpoints, tmp_path):
    text = _text(tmp_path, checkpoints["byte_level"])
    prompt = text.encode_prompt("The quick brown fox")
    assert prompt.tolist() == text.encode("The quick brown fox")[:-1].tolist()
    assert prompt[0] == text.tokenizer.token_to_id(BOS)  # the post-processor's BOS is not refused
    for special in (EOS, BOS):
        with pytest.raises(MotError, match=rf"contains the special token '{special}'".replace("|", r"\|")):
            text.encode_prompt(f"The quick {special} fox")


@pytest.mark.parametrize("style", ["byte_level", "sentencepiece", "sentencepiece_legacy"])
def test_token_bytes_sum_to_the_utf8_size_of_the_text(checkpoints, tmp_path, style):
    text = _text(tmp_path, checkpoints[style])
    counts = text.token_bytes()
    assert counts.shape == (PADDED_VOCAB,) and not counts[text.tokenizer.get_vocab_size():].any()
    ids = text.encode(SAMPLE)
    assert counts[ids[0]] == 0 and counts[ids[-1]] == 0  # BOS and end-of-text stand for no text
    expected = len(SAMPLE.encode("utf-8"))
    if style != "byte_level":
        pieces = [text.tokenizer.id_to_token(int(i)) for i in ids]
        assert {"<0xE6>", "<0x9D>", "<0xB1>", "<0x09>"} <= set(pieces)  # 東 and the tab fall back to bytes
        expected += 1  # the ▁ that Metaspace prepends to a document is counted as its space
    assert int(counts[ids].sum()) == expected


def test_a_resumed_run_uses_its_own_copy_without_the_checkpoint_folder(checkpoint, tmp_path):
    first = _text(tmp_path, checkpoint)
    ids, eot, vocab_size = first.encode(SAMPLE).tolist(), first.eot, first.vocab_size
    fingerprint = first.fingerprint()
    shutil.rmtree(checkpoint)
    resumed = _text(tmp_path, checkpoint)
    assert (resumed.encode(SAMPLE).tolist(), resumed.eot, resumed.vocab_size) == (ids, eot, vocab_size)
    assert resumed.fingerprint() == fingerprint and resumed.token_bytes().shape == (PADDED_VOCAB,)
    with pytest.raises(MotError, match="was made with options"):
        _text(tmp_path, checkpoint, end_of_text="<|reserved_0|>")


def test_end_of_text_option_and_folder_defaults(checkpoint, tmp_path):
    chosen = _text(tmp_path, checkpoint, "chosen", end_of_text="<|reserved_0|>")
    assert chosen.eot == chosen.tokenizer.token_to_id("<|reserved_0|>") == chosen.encode("hi")[-1]
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": EOS, "special": True, "lstrip": False, "rstrip": False}
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    assert _text(tmp_path, checkpoint, "as_dict").eot == chosen.tokenizer.token_to_id(EOS)
    # Without tokenizer_config.json and config.json: <|endoftext|> and the tokenizer's own size.
    (checkpoint / "tokenizer_config.json").unlink()
    (checkpoint / "config.json").unlink()
    bare = _text(tmp_path, checkpoint, "bare", end_of_text=EOS)
    assert bare.vocab_size == bare.tokenizer.get_vocab_size() == bare.token_bytes().shape[0]


def test_a_tokenizer_json_file_and_the_runs_own_bpe_keep_their_end_token(tmp_path):
    own = Text(TextOptions(vocab_size=300, end_of_text="<|eot|>"), tmp_path / "own")
    own.prepare(_corpus())
    assert own.tokenizer.id_to_token(own.eot) == "<|eot|>" and own.encode("abc")[-1] == own.eot
    assert own.vocab_size == 300 and own.encode("abc")[0] != own.eot  # no post-processor, no BOS
    tok = Tokenizer.from_file(str(tmp_path / "own" / "tokenizer.json"))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "file.json"))
    from_file = _text(tmp_path, tmp_path / "file.json")
    assert from_file.tokenizer.id_to_token(from_file.eot) == "<|endoftext|>"
    assert from_file.vocab_size == 301 and from_file.encode("abc")[:-1].tolist() == own.encode("abc")[:-1].tolist()


def test_a_run_saved_before_end_of_text_existed_resumes(tmp_path):
    """Runs saved before tokenizer_source.json and the end_of_text option still resume."""
    text = Text(TextOptions(vocab_size=300), tmp_path)
    text.prepare(_corpus())
    meta = json.loads((tmp_path / "tokenizer_meta.json").read_text())
    del meta["end_of_text"]
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps(meta))
    (tmp_path / "tokenizer_source.json").unlink()
    resumed = Text(TextOptions(vocab_size=300), tmp_path)
    resumed.prepare([])
    assert resumed.encode(SAMPLE).tolist() == text.encode(SAMPLE).tolist() and resumed.vocab_size == 300


def _set(name: str, key: str, value):
    def change(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        data[key] = value
        (folder / name).write_text(json.dumps(data))

    return change


def _write(name: str, content: str):
    return lambda folder: (folder / name).write_text(content)


@pytest.mark.parametrize("change, options, message", [
    (lambda folder: (folder / "tokenizer.json").unlink(), {}, r"folder .*checkpoint has no tokenizer.json"),
    (_write("tokenizer.json", "{not json"), {}, r"cannot read the text tokenizer .*checkpoint/tokenizer.json: "),
    (_write("tokenizer_config.json", "{not json"), {}, r"cannot read .*checkpoint/tokenizer_config.json: "),
    (_write("config.json", "[1, 2]"), {}, r"cannot read .*checkpoint/config.json: expected a JSON object"),
    (_set("tokenizer_config.json", "eos_token", "<|im_end|>"), {},
     r"end-of-text token '<\|im_end\|>' is not in the tokenizer .*checkpoint/tokenizer.json"),
    (_set("tokenizer_config.json", "eos_token", {"content": "<|eot_id|>"}), {},
     r"end-of-text token '<\|eot_id\|>' is not in the tokenizer .*checkpoint/tokenizer.json"),
    (lambda folder: (folder / "tokenizer_config.json").unlink(), {},
     r"end-of-text token '<\|endoftext\|>' is not in the tokenizer .*checkpoint/tokenizer.json"),
    (None, {"end_of_text": "<eos>"}, r"end-of-text token '<eos>' is not in the tokenizer"),
    (_set("tokenizer_config.json", "eos_token", 7), {}, r"eos_token in .*tokenizer_config.json is neither a string"),
    (_set("config.json", "vocab_size", 100), {},
     r"the tokenizer in .*checkpoint has 400 tokens but its config.json says vocab_size=100$"),
    (_set("config.json", "vocab_size", "many"), {}, r"vocab_size in .*config.json is not a positive integer"),
    (lambda folder: shutil.rmtree(folder), {}, r"text tokenizer_path not found: .*checkpoint"),
], ids=["no_tokenizer_json", "bad_tokenizer_json", "bad_tokenizer_config", "config_not_object", "eos_missing",
        "eos_dict_missing", "default_eot_missing", "option_eot_missing", "eos_not_text", "config_vocab_too_small",
        "config_vocab_not_int", "folder_missing"])
def test_bad_checkpoint_folders_are_one_line_errors(checkpoint, tmp_path, change, options, message):
    if change is not None:
        change(checkpoint)
    with pytest.raises(MotError, match=message) as caught:
        _text(tmp_path, checkpoint, **options)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "state" / "text" / "tokenizer.json").exists()  # nothing half-saved
