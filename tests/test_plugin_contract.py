"""Plugin authors' mistakes, table-driven: each one ends `mot train` with exit 2 and ONE line
that names the plugin, before anything trains (no metrics, no checkpoint).

The plugin under test is small but real: a character-level modality over real English
(CPython's pydoc topics), its data source, a loss and an evaluator. Each row breaks one thing.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import yaml

from mot_core.cli import main
from mot_core.errors import MotError
from mot_core.plugin_api import DataSource, Evaluator, Modality, PluginOptions, RawDocument, RawSegment
from plugins.autoregressive import AutoregressiveLoss
from registry import hookimpl
from registry.manager import build_registry
from conftest import use_registry

PLUGIN = "glyph_plugin"


class Glyphs(Modality):
    """Printable ASCII characters, one id each (0 = anything else)."""

    name = "glyphs"
    default_evaluators = ("glyph_eval",)

    def prepare(self, train_payloads):
        pass

    @property
    def vocab_size(self):
        return 96

    def encode(self, payload):
        return torch.tensor([max(0, min(95, ord(c) - 31)) for c in payload], dtype=torch.long)

    def decode(self, ids):
        return "".join(chr(int(i) + 31) if int(i) else "?" for i in ids)


class GlyphLines(DataSource):
    name = "glyph_lines"
    modalities = ("glyphs",)

    def documents(self, split):
        from pydoc_data.topics import topics

        names = sorted(topics)[:40]
        chosen = names[:32] if split == "train" else names[32:]
        return [RawDocument((RawSegment("glyphs", topics[n][:400]),)) for n in chosen]


class GlyphLoss(AutoregressiveLoss):
    name = "glyph_loss"


class GlyphEval(Evaluator):
    name = "glyph_eval"

    def reset(self):
        self.total, self.count = 0.0, 0

    def update(self, losses, valid, local_targets):
        self.total += float(losses[valid].sum())
        self.count += int(valid.sum())

    def compute(self):
        return {"nats": self.total / max(1, self.count)}


def make_plugin(modalities=None, datasets=None, losses=None, evaluators=None, tower_defaults=None):
    """A plugin object (registered in code) returning these hook results."""
    hooks = {
        "mot_modalities": (lambda: [Glyphs]) if modalities is None else modalities,
        "mot_datasets": (lambda: [GlyphLines]) if datasets is None else datasets,
        "mot_losses": (lambda: [GlyphLoss]) if losses is None else losses,
        "mot_evaluators": (lambda: [GlyphEval]) if evaluators is None else evaluators,
    }
    namespace = types.SimpleNamespace(__name__=PLUGIN)
    for hook, function in hooks.items():
        setattr(namespace, hook, hookimpl(function))
    if tower_defaults is not None:
        namespace.mot_tower_defaults = hookimpl(tower_defaults)
    return namespace


def subclass(base, **members):
    return type(f"Broken{base.__name__}", (base,), members)


def with_modality(**members):
    return {"modalities": lambda: [subclass(Glyphs, **members)]}


def with_source(**members):
    return {"datasets": lambda: [subclass(GlyphLines, **members)]}


def with_loss(**members):
    return {"losses": lambda: [subclass(GlyphLoss, **members)]}


def with_evaluator(**members):
    return {"evaluators": lambda: [subclass(GlyphEval, **members)]}


def raise_(exc):
    def function(*args, **kwargs):
        raise exc
    return function


def per_token(make):
    def function(self, model, hidden, batch):
        losses, valid = AutoregressiveLoss.per_token(self, model, hidden, batch)
        return make(losses, valid)
    return function


class NotOptions:
    pass


MISTAKES = {
    # what a hook returns
    "modalities hook returns a class": ({"modalities": lambda: Glyphs}, "returned the class Glyphs; expected a list of Modality subclasses"),
    "modalities hook returns strings": ({"modalities": lambda: ["glyphs"]}, "item 0 is str 'glyphs'"),
    "modalities hook returns an instance": ({"modalities": lambda: [Glyphs(PluginOptions(), Path("."))]}, "item 0 is Glyphs"),
    "modalities hook returns a data source": ({"modalities": lambda: [GlyphLines]}, "not a subclass of Modality (it is a DataSource: return it from mot_datasets)"),
    "datasets hook returns a modality": ({"datasets": lambda: [Glyphs]}, "not a subclass of DataSource (it is a Modality"),
    "evaluators hook returns an instance": ({"evaluators": lambda: [GlyphEval(None)]}, "hook mot_evaluators() item 0 is GlyphEval"),
    "losses hook returns None inside a list": ({"losses": lambda: [None]}, "hook mot_losses() item 0 is NoneType"),
    "a hook raises": ({"datasets": raise_(RuntimeError("disk not mounted"))}, "hook mot_datasets() raised RuntimeError: disk not mounted"),
    "tower defaults is a string": ({"tower_defaults": lambda modality: "moe"}, "hook mot_tower_defaults(modality='glyphs') returned str 'moe'"),
    # what a class declares
    "modality without a name": (with_modality(name=None), "has name None"),
    "modality with an empty name": (with_modality(name=""), "has name ''"),
    "Options is a dict": (with_modality(Options={"vocab": int}), "Options is dict"),
    "Options is a plain class": (with_modality(Options=NotOptions), "Options is the class NotOptions; expected a pydantic model"),
    "modality leaves encode abstract": ({"modalities": lambda: [type("Half", (Modality,), {"name": "glyphs", "prepare": lambda self, p: None, "vocab_size": 4})]}, "Half does not implement encode"),
    "vocab_size is 0": (with_modality(vocab_size=property(lambda self: 0)), "vocab_size is 0 (int); expected an integer >= 1"),
    "vocab_size is negative": (with_modality(vocab_size=property(lambda self: -3)), "vocab_size is -3"),
    "vocab_size is a float": (with_modality(vocab_size=property(lambda self: 96.0)), "vocab_size is 96.0 (float)"),
    # what a data source yields
    "documents returns None": (with_source(documents=lambda self, split: None), "documents('train') returned NoneType"),
    "documents yields tuples": (with_source(documents=lambda self, split: iter([("glyphs", "abc")])), "documents('train') item 0 is tuple"),
    "segments is a string": (with_source(documents=lambda self, split: [RawDocument("abc")]), "item 0 has segments str"),
    "a segment is a tuple": (with_source(documents=lambda self, split: [RawDocument((("glyphs", "abc"),))]), "holds a tuple segment; expected RawSegment"),
    "a segment of an undeclared modality": (with_source(documents=lambda self, split: [RawDocument((RawSegment("image", "x"),))]), "has a 'image' segment but the dataset declares modalities glyphs"),
    "documents has a bug": (with_source(documents=lambda self, split: {}["missing"]), "dataset 'glyph_lines', documents('train') raised KeyError"),
    "documents raises its own MotError": (with_source(documents=raise_(MotError("corpus file is empty"))), "dataset 'glyph_lines', documents('train'): corpus file is empty"),
    # what encode returns
    "encode returns None": (with_modality(encode=lambda self, payload: None), "encode (dataset 'glyph_lines') returned None"),
    "encode returns a list": (with_modality(encode=lambda self, payload: [1, 2, 3]), "returned list; expected a 1-D integer torch tensor"),
    "encode returns floats": (with_modality(encode=lambda self, payload: torch.ones(len(payload))), "ids of dtype torch.float32"),
    "encode returns nothing": (with_modality(encode=lambda self, payload: torch.zeros(0, dtype=torch.long)), "encode returned no ids for a segment"),
    "encode returns 2-D ids": (with_modality(encode=lambda self, payload: torch.ones(2, len(payload), dtype=torch.long)), "ids of shape (2, "),
    "encode returns an id outside the vocabulary": (with_modality(encode=lambda self, payload: torch.full((3,), 96)), "produced token id 96, outside its vocabulary of 96"),
    "a discrete modality's encode returns id -1": (with_modality(encode=lambda self, payload: torch.tensor([1, -1, 2])),
                                                   "produced token id -1, outside its vocabulary of 96 (ids are 0..95"),
    "encode has a bug": (with_modality(encode=lambda self, payload: payload.nonexistent), "raised AttributeError"),
    "prepare raises its own MotError": (with_modality(prepare=raise_(MotError("tokenizer file missing"))), "modality 'glyphs', prepare: tokenizer file missing"),
    # what a loss returns
    "loss returns a 0-dim loss": (with_loss(per_token=per_token(lambda l, v: (l.mean(), v))), "losses is () torch.float32; expected a floating tensor of shape"),
    "loss returns the wrong length": (with_loss(per_token=per_token(lambda l, v: (l[:-1], v[:-1]))), "expected a floating tensor of shape"),
    "loss returns one tensor": (with_loss(per_token=per_token(lambda l, v: l)), "per_token returned Tensor; expected (losses, valid)"),
    "loss returns a float mask": (with_loss(per_token=per_token(lambda l, v: (l, v.float()))), "valid is"),
    # what an evaluator returns
    "compute returns a string": (with_evaluator(compute=lambda self: "good"), "compute() returned str; expected a dict"),
    "compute returns a list": (with_evaluator(compute=lambda self: [1.0]), "compute() returned list"),
    "compute maps to a string": (with_evaluator(compute=lambda self: {"nats": "low"}), "returned {'nats': str}"),
    "compute returns NaN": (with_evaluator(compute=lambda self: {"nats": float("nan")}), "nats = nan; metrics must be finite"),
    "update has a bug": (with_evaluator(update=lambda self, l, v, t: 1 / 0), "update raised ZeroDivisionError"),
    # plugin-owned modules
    "build_head returns a string": (with_modality(build_head=lambda self, dim: "head"), "build_head() returned str"),
}


def _config(run_dir: Path) -> dict:
    return {
        "run": {"dir": str(run_dir), "seed": 0, "device": "cpu"},
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 64, "warmup_steps": 1, "eval_batches": 1, "progress": False},
        "mixture": {"modalities": {"glyphs": {"loss": "glyph_loss"}}, "datasets": {"glyph_lines": {}}},
    }


def _train(tmp_path, monkeypatch, capsys, plugin) -> tuple[int, str]:
    use_registry(monkeypatch, lambda: build_registry((plugin,)))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path / "run")))
    code = main(["train", str(config)])
    return code, capsys.readouterr().err.strip()


def test_the_unbroken_plugin_trains(tmp_path, monkeypatch, capsys):
    code, err = _train(tmp_path, monkeypatch, capsys, make_plugin())
    assert code == 0, err
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_plugin_mistake_is_one_line_naming_the_plugin(tmp_path, monkeypatch, capsys, mistake):
    hooks, expected = MISTAKES[mistake]
    code, err = _train(tmp_path, monkeypatch, capsys, make_plugin(**hooks))
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    assert f"plugin '{PLUGIN}'" in err, err
    assert expected in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "something trained"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_table_covers_thirty_mistakes():
    assert len(MISTAKES) >= 30
