"""``mot plugins check``: a conformance check for plugin authors (like scikit-learn's
``check_estimator``), also callable from a plugin's own tests::

    from mot_core.train.conformance import check_plugin
    report = check_plugin("timeseries")
    assert report.ok, report.text()

For the named plugin it builds every data source and modality from their options (defaults,
or a run config's), reads documents, encodes them, round-trips ``decode``, runs the losses
and evaluators through a tiny model forward and backward, saves and restores the modules the
plugin owns, writes generated samples through ``write_payloads`` and generates where the
modality declares how. Each check is one line: PASS, FAIL with the reason, or SKIP with why
(data or a fitted tokenizer the check cannot make itself: pass ``config`` of a prepared run).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mot_core.config import validate_config
from mot_core.errors import MotError, plugin_boundary
from mot_core.plugin_api import Modality, RawSegment, SamplingParams, origin


@dataclass
class CheckLine:
    status: str  # PASS, FAIL or SKIP
    check: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.status}  {self.check}" + (f": {self.detail}" if self.detail else "")


@dataclass
class CheckReport:
    plugin: str
    lines: list[CheckLine] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(line.status == "FAIL" for line in self.lines)

    def text(self) -> str:
        return "\n".join([f"plugin '{self.plugin}':", *(f"  {line}" for line in self.lines)])

    def run(self, check: str, body: Callable[[], str | None]) -> Any:
        """Run one check; a ``MotError`` is a FAIL with its message, ``_Skip`` a SKIP."""
        try:
            detail = body()
        except _Skip as skip:
            self.lines.append(CheckLine("SKIP", check, str(skip)))
            return False
        except MotError as exc:
            self.lines.append(CheckLine("FAIL", check, str(exc)))
            return False
        self.lines.append(CheckLine("PASS", check, detail or ""))
        return True


class _Skip(Exception):
    pass


def check_plugin(name: str, registry=None, config_path: str | Path | None = None, workdir: Path | None = None,
                 sample_documents: int = 16) -> CheckReport:
    """Check the plugin registered under entry-point (or in-code) ``name``."""
    from registry import get_registry

    report = CheckReport(name)
    state: dict[str, Any] = {}

    def hooks() -> str:
        state["registry"] = registry or get_registry()
        mine = [(kind, n) for kind, n, info in state["registry"].contributions() if info.name == name]
        if not mine:
            known = ", ".join(sorted({info.name for info in state["registry"].plugins})) or "none"
            raise MotError(f"no plugin '{name}' contributes anything (installed: {known})")
        state["mine"] = mine
        singular = {"modalities": "modality", "losses": "loss", "evaluators": "evaluator", "datasets": "dataset"}
        return ", ".join(f"{singular[kind]} {n}" for kind, n in mine)

    if not report.run("hooks return valid classes", hooks):
        return report
    owned = {kind: [n for k, n in state["mine"] if k == kind] for kind in ("modalities", "losses", "evaluators", "datasets")}
    with tempfile.TemporaryDirectory(prefix="mot-check-") as tmp:
        root = Path(workdir or tmp)
        config = _config_for(state["registry"], owned, config_path, root, report)
        if config is None:
            report.lines.append(CheckLine("SKIP", "documents, encoding, model", "no data source with default options "
                                          "yields this plugin's modalities; pass --config of a run that uses it"))
            return report
        _check_run(report, state["registry"], config, owned, sample_documents, root)
    return report


def _default_source(registry, name: str):
    """The data source ``name`` built from default options, or None if it needs options."""
    cls = registry.get("datasets", name, "mot plugins check")
    try:
        return cls(cls.Options())
    except Exception:  # noqa: BLE001 - required options, or a source that needs its data first
        return None


def _config_for(registry, owned: dict, config_path, root: Path, report: CheckReport):
    """A tiny run over the plugin's data sources that need no options, plus (for a modality no
    such source yields) any registered source that yields it, and every modality they yield;
    or the given run config with a tiny model."""
    if config_path is not None:
        from mot_core.config import load_raw_config

        raw = load_raw_config(config_path)
    else:
        datasets, modalities = [], []
        for name in owned["datasets"]:
            source = _default_source(registry, name)
            if source is None:
                report.lines.append(CheckLine("SKIP", f"dataset {name}", "needs options (or its data) to be built; "
                                              "pass --config of a run that uses it"))
                continue
            datasets.append(name)
            modalities += [m for m in source.modalities if m not in modalities]
        for wanted in owned["modalities"]:
            if wanted in modalities:
                continue
            for name in registry.names("datasets"):
                source = _default_source(registry, name)
                if source is not None and wanted in source.modalities:
                    datasets.append(name)
                    modalities += [m for m in source.modalities if m not in modalities]
                    break
        if not datasets:
            return None
        raw = {"mixture": {"modalities": {m: {} for m in modalities}, "datasets": {d: {} for d in datasets}}}
    raw["run"] = {**raw.get("run", {}), "device": "cpu", "seed": 0}
    if config_path is None:
        raw["run"]["dir"] = str(root / "run")
    raw["model"] = {**raw.get("model", {}), "dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": None,
                    "max_seq_len": 2048, "warm_start": None}
    raw["train"] = {**raw.get("train", {}), "batch_size": 2, "eval_batches": 1, "progress": False}
    return raw


def _check_parts(name: str, source, split: str, sampled: int) -> str:
    """``num_parts`` / ``read_part`` agree with ``documents`` (the parts in order give its
    documents) and ``fingerprint`` is a stable string: what the sharded tokenizer relies on."""
    from mot_core.errors import plugin_boundary
    from mot_core.plugin_api import origin
    from mot_core.train.tokenize import iter_documents, num_parts

    where = f"{origin(source)}: dataset '{name}'"
    parts = num_parts(name, source, split)
    counts = [sum(1 for _ in iter_documents(name, source, split, part)) for part in range(parts)] if parts > 1 else []
    whole = sum(1 for _ in iter_documents(name, source, split))
    if parts > 1 and sum(counts) != whole:
        raise MotError(f"{where}: its {parts} parts of '{split}' hold {sum(counts)} documents, documents('{split}') "
                       f"{whole}; read_part must split documents() without adding or dropping any")
    with plugin_boundary(f"{where}, fingerprint"):
        first, second = source.fingerprint(), source.fingerprint()
    if not isinstance(first, str) or first != second:
        raise MotError(f"{where}: fingerprint() must return the same string while the data is unchanged "
                       f"(got {first!r}, then {second!r})")
    return f"{parts} part{'s' if parts > 1 else ''}, {whole} documents, fingerprint stable"


def _check_run(report: CheckReport, registry, raw: dict, owned: dict, sample_documents: int, root: Path) -> None:
    from mot_core.data import fixed_batches
    from mot_core.train.evaluation import evaluate, forward_losses, reduce_losses
    from mot_core.train.experiment import build_experiment, build_model, extras_sampler, model_args
    from mot_core.train.tokenize import prepare_vocabulary, source_documents

    state: dict[str, Any] = {}

    def build() -> str:
        config = validate_config(raw)
        state["exp"] = build_experiment(config, registry)
        return f"{len(state['exp'].modalities)} modalities, {len(state['exp'].sources)} data sources"

    if not report.run("classes build from their options", build):
        return
    exp = state["exp"]
    docs: dict[str, dict[str, list]] = {"train": {}, "val": {}}
    for name, source in exp.sources.items():
        for split in ("train", "val"):
            def read(name=name, source=source, split=split) -> str:
                try:
                    found = source_documents(name, source, split)
                except MotError as exc:
                    if _is_missing_data(exc):  # data not prepared here: not a defect of the code
                        raise _Skip(str(exc)) from None
                    raise
                if not found:
                    raise MotError(f"dataset '{name}' returned no '{split}' documents")
                docs[split][name] = found[:sample_documents]
                return f"{len(found)} documents"
            if report.run(f"dataset {name}: documents('{split}')", read):
                report.run(f"dataset {name}: parts and fingerprint of '{split}'",
                           lambda name=name, source=source, split=split: _check_parts(name, source, split,
                                                                                        len(docs[split][name])))
    if not all(docs["train"].get(n) and docs["val"].get(n) for n in exp.sources):
        report.lines.append(CheckLine("SKIP", "encoding and model checks", "a data source gave no documents"))
        return

    def vocabulary() -> str:
        try:
            state["vocab"] = prepare_vocabulary(exp)
        except MotError as exc:
            theirs = not any(f"modality '{m}'" in str(exc) for m in owned["modalities"])
            if _is_missing_data(exc) or theirs:  # data or another plugin's modality: not this plugin's fault
                raise _Skip(f"{exc} (pass --config of a run whose tokenizers fit)") from None
            raise
        return ", ".join(f"{n} {state['vocab'].modalities[n].vocab_size} ids" for n in state["vocab"].names)

    if not report.run("modalities prepare their tokenizers", vocabulary):
        return
    vocab = state["vocab"]
    tokenized: dict[str, list] = {}

    def encode() -> str:
        tokenized["train"] = [d for n, ds in docs["train"].items() for d in vocab.tokenize(ds, n)]
        tokenized["val"] = [d for n, ds in docs["val"].items() for d in vocab.tokenize(ds, n)]
        return f"{sum(len(d) for d in tokenized['train'])} tokens from {len(tokenized['train'])} documents"

    if not report.run("documents encode (ids in range, values of input_dim)", encode):
        return
    for name in owned["modalities"]:
        if name in vocab.modalities:
            report.run(f"modality {name}: decode round trip", lambda name=name: _round_trip(vocab, name, docs["val"]))
    seq_len = max(64, min(1024, max(len(d) for d in tokenized["val"])))
    model_state: dict[str, Any] = {}

    def forward_backward() -> str:
        raw["train"]["seq_len"] = seq_len
        args = model_args(validate_config(raw), vocab)
        torch.manual_seed(0)
        model = build_model(args, vocab)
        batch = fixed_batches(tokenized["val"], 2, seq_len, 1, len(vocab.names), extras_sampler(exp, vocab))[0]
        per_modality = forward_losses(model, batch, vocab, exp)
        total = torch.zeros(())
        for name, (losses, valid, piece) in per_modality.items():
            loss_sum, count = reduce_losses(losses, valid, piece, exp.losses[name].reduction)
            if count:
                total = total + loss_sum / count
        if not torch.isfinite(total):
            raise MotError(f"the losses of a tiny untrained model are not finite ({float(total)})")
        total.backward()
        model_state.update(model=model, batches=[batch])
        return "losses " + ", ".join(f"{n} via '{exp.losses[n].name}'" for n in per_modality)

    if not report.run("losses: tiny model forward and backward", forward_backward):
        return
    model = model_state["model"]

    def evaluators() -> str:
        metrics = evaluate(model, model_state["batches"], vocab, exp, torch.device("cpu"), contextlib.nullcontext)
        return ", ".join(sorted(metrics)) or "no metrics"

    report.run("evaluators: update and compute", evaluators)
    for name in owned["modalities"]:
        if name in model.modality_modules:
            report.run(f"modality {name}: own modules save and restore", lambda name=name: _modules_round_trip(model, name))
    for name in owned["modalities"]:
        if name in vocab.modalities:
            report.run(f"modality {name}: generation", lambda name=name: _generation(model, vocab, name, docs["val"], root))
    for loss in owned["losses"]:
        if loss not in {exp.losses[m].name for m in exp.losses}:
            report.lines.append(CheckLine("SKIP", f"loss {loss}", "no modality of this check uses it; pass --config of "
                                          "a run that does"))
    for evaluator in owned["evaluators"]:
        if evaluator not in {cls.name for classes in exp.evaluators.values() for cls in classes}:
            report.lines.append(CheckLine("SKIP", f"evaluator {evaluator}", "no modality of this check runs it; pass "
                                          "--config of a run that does"))


def _is_missing_data(exc: MotError) -> bool:
    text = str(exc)
    return any(k in text for k in ("mot data prepare", "mot tokenizer fit", "not found", "no such", "does not exist"))


def _payloads_of(docs: dict[str, list], modality: str) -> list[Any]:
    return [s.payload for ds in docs.values() for d in ds for s in d.segments if s.modality == modality]


def _round_trip(vocab, name: str, docs: dict[str, list]) -> str:
    """``decode`` must turn encoded ids back into a payload; whether ``encode`` gives the same
    ids again is reported (a lossy or different payload kind is allowed, a failure is not)."""
    modality = vocab.modalities[name]
    if type(modality).decode is Modality.decode:
        raise _Skip("the modality does not decode")
    payloads = _payloads_of(docs, name)[:4]
    if not payloads:
        raise _Skip("no held-out segment of this modality")
    where = f"{origin(modality)}: modality '{name}'"
    same = reencodable = 0
    for payload in payloads:
        with plugin_boundary(f"{where}, encode"):
            encoded = modality.encode(payload)
        if not isinstance(encoded, torch.Tensor):
            raise _Skip("continuous segments are checked through the model")
        with plugin_boundary(f"{where}, decode"):
            decoded = modality.decode(encoded)
        try:
            again = torch.as_tensor(modality.encode(decoded))
        except Exception:  # noqa: BLE001 - decode may give another kind of payload (units, not audio)
            continue
        reencodable += 1
        same += bool(again.shape == encoded.shape and torch.equal(again, encoded))
    return (f"{len(payloads)} held-out segments decode; encode(decode(ids)) == ids for {same} "
            f"(of {reencodable} that re-encode)")


def _modules_round_trip(model, name: str) -> str:
    from safetensors.torch import load, save

    modules = model.modality_modules[name]
    state = {k: v.detach().contiguous() for k, v in modules.state_dict().items()}
    restored = load(save(state))
    fresh = {k: torch.zeros_like(v) for k, v in state.items()}
    modules.load_state_dict(fresh)
    modules.load_state_dict(restored)
    for key, value in modules.state_dict().items():
        if not torch.equal(value, state[key]):
            raise MotError(f"modality '{name}': parameter {key} changed through a safetensors save and load")
    return f"{len(state)} tensors through safetensors"


def _generation(model, vocab, name: str, docs: dict[str, list], root: Path) -> str:
    from mot_core.generate.api import generate_segments

    modality = vocab.modalities[name]
    declares = modality.span_grammar() is not None or modality.input_dim is not None or \
        type(modality).decode is not Modality.decode
    if not declares:
        raise _Skip("the modality declares no way to generate (no span grammar, values or decode)")
    if modality.input_dim is not None and type(modality).sample_values is Modality.sample_values:
        raise _Skip("a continuous modality without sample_values")
    prompt = next((d.segments[0] for ds in docs.values() for d in ds
                   if d.segments[0].modality != name and vocab.modalities[d.segments[0].modality].input_dim is None), None)
    prompts = [[prompt]] if prompt is not None else [[RawSegment(name, _payloads_of(docs, name)[0])]]
    params = SamplingParams(temperature=1.0, denoising_steps=2)
    outputs = generate_segments(model, vocab, prompts * 2, name, params, max_tokens=8, seed=0)
    if len(outputs) != 2:
        raise MotError(f"modality '{name}': 2 prompts gave {len(outputs)} outputs")
    detail = f"2 samples after a '{prompts[0][0].modality}' prompt"
    if type(modality).write_payloads is not Modality.write_payloads:
        suffix = ".png" if modality.span_grammar() is not None or modality.input_dim is not None else ".out"
        with plugin_boundary(f"{origin(modality)}: modality '{name}', write_payloads"):
            written = modality.write_payloads(list(outputs), root / f"samples_{name}{suffix}", ["a", "b"])
        if not Path(written).is_file():
            raise MotError(f"modality '{name}': write_payloads returned {written}, which is not a file")
        detail += f", written by write_payloads to {Path(written).name}"
    return detail


def check_plugins(names: list[str] | None = None, registry=None, config_paths: list | None = None, out=None) -> bool:
    """Check every named plugin (default: all registered), once per run config (default: once
    with each plugin's own data sources); prints each report; True if none fails."""
    from registry import get_registry

    out = out or sys.stdout
    registry = registry or get_registry()
    names = names or sorted({info.name for info in registry.plugins})
    ok = True
    for name in names:
        for config_path in config_paths or [None]:
            report = check_plugin(name, registry, config_path)
            print(report.text() if config_path is None else report.text().replace(":", f" (with {config_path}):", 1),
                  file=out)
            ok = ok and report.ok
    return ok

