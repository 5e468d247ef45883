"""``mot plugins check``: a conformance check for plugin authors (like scikit-learn's
``check_estimator``), also callable from a plugin's own tests::

    from mot_core.testing import check_plugin
    report = check_plugin("timeseries")
    assert report.ok, report.text()

For the named plugin it builds every data source and modality from their options (defaults,
or a run config's, with the plugins' tower defaults applied as ``mot train`` does), reads
documents, encodes them, round-trips ``decode``, runs the losses and evaluators through a tiny
model forward and backward, runs each of the plugin's evaluators' ``evaluate_model`` as
``mot eval --samples 2`` would, saves and restores the modules the plugin owns, and generates
(writing the samples through ``write_payloads``) where the modality declares how.

Each check is one line: PASS, FAIL with the reason, or SKIP with why. A check is never cut
short by another's result: one that needs an earlier check which did not pass is a SKIP naming
that check, and everything else still runs. Whatever plugin code raises is a FAIL naming the
plugin, the hook and the exception, never a traceback. A SKIP is what the check could not run
here (data or a fitted tokenizer it cannot make itself, a loss no modality of the run uses):
pass ``config`` of a prepared run that uses it.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pydantic
import torch

from mot_core.errors import MotError, plugin_boundary
from mot_core.plugin_api import DataSource, EvaluationContext, Evaluator, Modality, RawSegment, SamplingParams, origin

STATUSES = ("PASS", "FAIL", "SKIP")

# The checks every plugin goes through, in order; those about one data source, modality or
# evaluator are named after it.
HOOKS = "hooks return valid classes"
BUILD = "classes build from their options"
TOKENIZERS = "modalities prepare their tokenizers"
ENCODE = "documents encode (ids in range, values of input_dim)"
LOSSES = "losses: tiny model forward and backward"
EVALUATORS = "evaluators: update and compute"

# ``mot eval --samples N`` lets generation-based metrics draw N samples; two are enough to run
# that code on a tiny model without making the check slow.
EVALUATE_MODEL_SAMPLES = 2


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
    config: str | None = None  # the run config the check took its run from, if any
    lines: list[CheckLine] = field(default_factory=list)
    # check -> the check whose SKIP or FAIL it could not run without (for the SKIP's reason)
    _causes: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not any(line.status == "FAIL" for line in self.lines)

    def count(self, status: str) -> int:
        return sum(line.status == status for line in self.lines)

    def summary(self) -> str:
        return summary_of([self])

    def text(self) -> str:
        header = f"plugin '{self.plugin}'" + (f" (with {self.config})" if self.config else "") + ":"
        return "\n".join([header, *(f"  {line}" for line in self.lines)])

    def status_of(self, check: str) -> str | None:
        return next((line.status for line in reversed(self.lines) if line.check == check), None)

    def skip(self, check: str, reason: str) -> None:
        self.lines.append(CheckLine("SKIP", check, reason))

    def run(self, check: str, body: Callable[[], str | None], needs: tuple[str, ...] = ()) -> bool:
        """Run one check; True if it passed.

        It is a SKIP, without running, if a check it ``needs`` did not pass; ``_Skip`` makes
        it a SKIP with its reason; a ``MotError`` is a FAIL with its message, and any other
        exception (a bug in plugin code that no boundary caught) a FAIL with its type, first
        line and place. Either way the plugin is named, and the caller goes on."""
        blocked = next((n for n in needs if self.status_of(n) != "PASS"), None)
        if blocked is not None:
            cause = self._causes.get(blocked, blocked)  # the check that actually stopped the chain
            self._causes[check] = cause
            happened = "failed" if self.status_of(cause) == "FAIL" else "was skipped"
            self.skip(check, f"needs '{cause}', which {happened}")
            return False
        try:
            detail = body()
        except _Skip as skip:
            self.skip(check, str(skip))
            return False
        except MotError as exc:
            self.lines.append(CheckLine("FAIL", check, self._naming_the_plugin(str(exc))))
            return False
        except Exception as exc:  # noqa: BLE001 - a conformance check reports a broken plugin, it does not crash on it
            self.lines.append(CheckLine("FAIL", check, self._naming_the_plugin(_unexpected(exc))))
            return False
        self.lines.append(CheckLine("PASS", check, detail or ""))
        return True

    def _naming_the_plugin(self, message: str) -> str:
        """Errors from a plugin boundary name their plugin already; the engine's own checks of
        what a plugin returned (and raw exceptions) say which plugin was under check."""
        return message if "plugin '" in message else f"plugin '{self.plugin}': {message}"


class _Skip(Exception):
    pass


def _unexpected(exc: BaseException) -> str:
    """An exception that escaped plugin code unwrapped, as one line: its type, the first line of
    its message and the innermost place outside torch (the plugin's line that called it)."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    at = f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
    message = str(exc).strip()
    return f"raised {type(exc).__name__}: {message.splitlines()[0] if message else 'no message'}{at}"


def summary_of(reports: list[CheckReport]) -> str:
    """The last line of ``mot plugins check``: "N passed, M skipped, K failed"."""
    counts = {status: sum(report.count(status) for report in reports) for status in STATUSES}
    return f"{counts['PASS']} passed, {counts['SKIP']} skipped, {counts['FAIL']} failed"


def check_plugin(name: str, registry=None, config_path: str | Path | None = None, workdir: Path | None = None,
                 sample_documents: int = 16, read_part_rows: Callable | None = None) -> CheckReport:
    """Check the plugin registered under entry-point (or in-code) ``name``. ``read_part_rows``
    (``mot_core.distributed.native_read.RayPartReader``, which ``mot plugins check`` gives):
    also check each source's Ray Data reads against its own reader.

    A ``config_path`` that cannot be read is the caller's error (a ``MotError``), not a check."""
    from mot_core.config import load_raw_config
    from registry import get_registry

    raw = None if config_path is None else load_raw_config(config_path)
    report = CheckReport(name, None if config_path is None else str(config_path))
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

    if not report.run(HOOKS, hooks):
        # Without the plugin's classes there is nothing to build: the one place the check stops.
        report.skip("every other check", f"needs '{HOOKS}', which failed")
        return report
    owned = {kind: [n for k, n in state["mine"] if k == kind] for kind in ("modalities", "losses", "evaluators", "datasets")}
    with tempfile.TemporaryDirectory(prefix="mot-check-") as tmp:
        root = Path(workdir or tmp)
        if raw is None:
            raw = _default_run(report, state["registry"], owned)
        _complete_run(raw, root, own_dir=config_path is None)
        _check_run(report, state["registry"], raw, owned, sample_documents, root, read_part_rows)
    return report


def _default_source(registry, name: str):
    """The data source ``name`` built from default options, or None and why not.

    Required options (a ``ValidationError`` of its ``Options``) and the source's own
    ``MotError`` (its data is not there) are reasons; any other exception is a bug, and
    propagates."""
    cls = registry.get("datasets", name, "mot plugins check")
    try:
        options = cls.Options()
    except pydantic.ValidationError:
        return None, "needs options to be built; pass --config of a run that uses it"
    try:
        return cls(options), None
    except MotError as exc:  # the source's own words: what it needs is not there
        return None, f"{origin(cls)}: dataset '{name}', __init__: {exc} (pass --config of a run that uses it)"
    except Exception as exc:  # noqa: BLE001 - a bug in its constructor
        raise MotError(f"{origin(cls)}: dataset '{name}', __init__ {_unexpected(exc)}") from None


def _default_run(report: CheckReport, registry, owned: dict) -> dict | None:
    """A tiny run over the plugin's data sources that need no options, plus (for a modality no
    such source yields) any registered source that yields it, and every modality they yield;
    None if there is none."""
    datasets, modalities = [], []
    for name in owned["datasets"]:
        built: dict[str, Any] = {}

        def build_default(name=name, built=built) -> str:
            source, why = _default_source(registry, name)
            if source is None:
                raise _Skip(why)
            built["source"] = source
            return "yields " + ", ".join(source.modalities)

        if report.run(f"dataset {name}: builds from default options", build_default):
            datasets.append(name)
            modalities += [m for m in built["source"].modalities if m not in modalities]
    for wanted in owned["modalities"]:
        if wanted in modalities:
            continue
        for name in registry.names("datasets"):
            try:  # another plugin's source: whether it builds here is not this check's business
                source, _ = _default_source(registry, name)
            except Exception:  # noqa: BLE001
                source = None
            if source is not None and wanted in source.modalities:
                datasets.append(name)
                modalities += [m for m in source.modalities if m not in modalities]
                break
    if not datasets:
        return None
    return {"mixture": {"modalities": {m: {} for m in modalities}, "datasets": {d: {} for d in datasets}}}


def _complete_run(raw: dict | None, root: Path, own_dir: bool) -> None:
    """Make ``raw`` (a run config as a dict) a tiny CPU run: one small layer, small batches."""
    if raw is None:
        return
    raw["run"] = {**raw.get("run", {}), "device": "cpu", "seed": 0}
    if own_dir:
        raw["run"]["dir"] = str(root / "run")
    # a tiny model of its own: no warm start or pretrained checkpoint is loaded into it
    raw["model"] = {**raw.get("model", {}), "dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": None,
                    "ffn_hidden": None, "max_seq_len": 2048, "warm_start": None, "init_from": None}
    raw["train"] = {**raw.get("train", {}), "batch_size": 2, "eval_batches": 1, "progress": False}


def _no_run_reason(owned: dict) -> str:
    if owned["modalities"] or owned["datasets"]:
        return ("no data source with default options yields this plugin's modalities; pass --config of a run "
                "that uses it")
    return "the plugin contributes no modality or data source to build a run from; pass --config of a run that uses it"


def _check_parts(name: str, source, split: str) -> str:
    """``num_parts`` / ``read_part`` agree with ``documents`` (the parts in order give its
    documents) and ``fingerprint`` is a stable string: what the sharded tokenizer relies on."""
    from mot_core.experiment.tokenize import iter_documents, num_parts

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


def _check_native(name: str, source, split: str, read_part_rows: Callable) -> str:
    """The source's Ray Data reads (``native_reads``) name parts it has, each once; and for the
    first part of each read, ``read_rows`` of what Ray Data's reader gives (``read_part_rows``)
    yields ``read_part``'s documents: what keeps a cluster's shards equal to a local run's."""
    from mot_core.experiment.tokenize import iter_documents, num_parts

    where = f"{origin(source)}: dataset '{name}'"
    with plugin_boundary(f"{where}, native_reads('{split}')"):
        reads = list(source.native_reads(split))
    if not reads:
        raise _Skip(f"no file of '{split}' has a Ray Data reader (the source's own reader reads every part)")
    parts, seen = num_parts(name, source, split), set()
    for read in reads:
        for file in read.files:
            held = set(file.parts)
            if not held <= set(range(parts)) or held & seen:
                raise MotError(f"{where}: native_reads('{split}') lists {file.path} with parts {sorted(held)}; the "
                               f"source has {parts} parts and each may be read once")
            seen |= held
    checked = []
    for read in reads:
        # the first part of the read with documents in this split (of its first few)
        candidates = [p for f in read.files for p in f.parts][:4]
        for part in candidates:
            local = list(iter_documents(name, source, split, part if parts > 1 else None))
            if local:
                break
        else:
            part = candidates[0]
        rows = read_part_rows(read, part)
        if rows is None:
            checked.append(f"{read.reader}: part {part} (no rows)")
            continue
        remote = list(iter_documents(name, source, split, part, rows=rows))
        if len(remote) != len(local) or not all(_same_document(a, b) for a, b in zip(remote, local)):
            raise MotError(f"{where}: read_rows('{split}', {part}) of the rows Ray Data's {read.reader} gives yields "
                           f"{len(remote)} documents, read_part {len(local)}"
                           f"{'' if len(remote) != len(local) else ' that differ'}; they must be the same")
        checked.append(f"{read.reader}: part {part}, {len(local)} documents")
    return f"{len(seen)} of {parts} parts; read_rows = read_part ({'; '.join(checked)})"


def _same_document(a, b) -> bool:
    import torch

    if len(a.segments) != len(b.segments):
        return False
    for x, y in zip(a.segments, b.segments):
        if x.modality != y.modality or type(x.payload) is not type(y.payload):
            return False
        same = torch.equal(x.payload, y.payload) if isinstance(x.payload, torch.Tensor) else x.payload == y.payload
        if not same:
            return False
    return True


def _check_run(report: CheckReport, registry, raw: dict | None, owned: dict, sample_documents: int, root: Path,
               read_part_rows: Callable | None = None) -> None:
    """Every check after the hooks, each run as far as what it needs allows."""
    from mot_core.data import fixed_batches
    from mot_core.training.evaluation import evaluate, forward_losses, reduce_losses
    from mot_core.experiment.build import build_experiment, build_model, extras_sampler, model_args
    from mot_core.experiment.resolve import resolve_config
    from mot_core.experiment.tokenize import prepare_vocabulary, source_documents

    state: dict[str, Any] = {}

    def build() -> str:
        if raw is None:
            raise _Skip(_no_run_reason(owned))
        # the front door, as `mot train` resolves a config (the plugins' tower defaults included)
        state["config"] = resolve_config(raw, registry=registry)
        state["exp"] = build_experiment(state["config"], registry)
        return f"{len(state['exp'].modalities)} modalities, {len(state['exp'].sources)} data sources"

    report.run(BUILD, build)
    exp = state.get("exp")
    docs: dict[str, dict[str, list]] = {"train": {}, "val": {}}
    read_checks = []
    for name, source in (exp.sources.items() if exp else ()):
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

            read_checks.append(f"dataset {name}: documents('{split}')")
            report.run(read_checks[-1], read, needs=(BUILD,))
            report.run(f"dataset {name}: parts and fingerprint of '{split}'",
                       lambda name=name, source=source, split=split: _check_parts(name, source, split),
                       needs=(read_checks[-1],))
            if read_part_rows is not None and type(source).native_reads is not DataSource.native_reads:
                report.run(f"dataset {name}: Ray Data's readers on '{split}'",
                           lambda name=name, source=source, split=split: _check_native(name, source, split,
                                                                                       read_part_rows),
                           needs=(read_checks[-1],))

    def vocabulary() -> str:
        try:
            state["vocab"] = prepare_vocabulary(exp, check_fitted_on=False)
        except MotError as exc:
            theirs = not any(f"modality '{m}'" in str(exc) for m in owned["modalities"])
            if _is_missing_data(exc) or theirs:  # data or another plugin's modality: not this plugin's fault
                raise _Skip(f"{exc} (pass --config of a run whose tokenizers fit)") from None
            raise
        return ", ".join(f"{n} {state['vocab'].modalities[n].vocab_size} ids" for n in state["vocab"].names)

    report.run(TOKENIZERS, vocabulary, needs=(BUILD, *read_checks))
    vocab = state.get("vocab")
    tokenized: dict[str, list] = {}

    def encode() -> str:
        tokenized["train"] = [d for n, ds in docs["train"].items() for d in vocab.tokenize(ds, n)]
        tokenized["val"] = [d for n, ds in docs["val"].items() for d in vocab.tokenize(ds, n)]
        return f"{sum(len(d) for d in tokenized['train'])} tokens from {len(tokenized['train'])} documents"

    report.run(ENCODE, encode, needs=(TOKENIZERS,))
    in_run = [n for n in owned["modalities"] if exp is not None and n in exp.modalities]
    for name in in_run:
        report.run(f"modality {name}: decode round trip", lambda name=name: _round_trip(vocab, name, docs["val"]),
                   needs=(ENCODE,))
    for name in in_run:
        report.run(f"modality {name}: Hugging Face codec (export_hf)",
                   lambda name=name: _hf_codec(vocab, name, docs["val"], root), needs=(ENCODE,))
    model_state: dict[str, Any] = {}

    def forward_backward() -> str:
        seq_len = max(64, min(1024, max(len(d) for d in tokenized["val"])))
        config = state["config"]
        args = model_args(config.model_copy(update={"train": config.train.model_copy(update={"seq_len": seq_len})}),
                          vocab)
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

    report.run(LOSSES, forward_backward, needs=(ENCODE,))
    model = model_state.get("model")

    def evaluators() -> str:
        metrics = evaluate(model, model_state["batches"], vocab, exp, torch.device("cpu"), contextlib.nullcontext)
        return ", ".join(sorted(metrics)) or "no metrics"

    report.run(EVALUATORS, evaluators, needs=(LOSSES,))
    val_docs = [doc for found in docs["val"].values() for doc in found]
    runs = [(evaluator, modality) for modality, classes in (exp.evaluators.items() if exp else ())
            for evaluator in classes if evaluator.name in owned["evaluators"]]
    for evaluator, modality in runs:
        def evaluate_model(evaluator=evaluator, modality=modality) -> str:
            return _evaluate_model(exp, vocab, model, modality, evaluator, val_docs)

        report.run(f"evaluator {evaluator.name} of modality {modality}: evaluate_model", evaluate_model,
                   needs=(LOSSES,))
    for name in in_run:
        if model is not None and name not in model.modality_modules:
            continue  # the modality owns no modules: nothing to save
        if model is None and not _may_own_modules(exp.modalities[name]):
            continue
        report.run(f"modality {name}: own modules save and restore", lambda name=name: _modules_round_trip(model, name),
                   needs=(LOSSES,))
    for name in in_run:
        report.run(f"modality {name}: generation", lambda name=name: _generation(model, vocab, name, docs["val"], root),
                   needs=(LOSSES,))
    _report_unexercised(report, exp, owned, runs)


# Per kind of contribution: its line when no check of the run exercised it, and why not.
UNEXERCISED = {
    "modalities": ("modality {}", "no data source of this check yields it; pass --config of a run that uses it"),
    "losses": ("loss {}", "no modality of this check uses it; pass --config of a run that does"),
    "evaluators": ("evaluator {}: evaluate_model", "no modality of this check runs it; pass --config of a run that does"),
    "datasets": ("dataset {}", "no run of this check reads it; pass --config of a run that does"),
}


def _report_unexercised(report: CheckReport, exp, owned: dict, runs: list) -> None:
    """One SKIP for each of the plugin's contributions no check of this run exercised: the
    summary must not count a check as passed when it never ran."""
    if exp is None:
        happened = "failed" if report.status_of(BUILD) == "FAIL" else "was skipped"
        used = {kind: set() for kind in owned}
    else:
        used = {"modalities": set(exp.modalities), "datasets": set(exp.sources),
                "losses": {loss.name for loss in exp.losses.values()}, "evaluators": {e.name for e, _ in runs}}
    for kind, names in owned.items():
        check, why = UNEXERCISED[kind]
        for name in names:
            if name in used[kind]:
                continue
            if kind == "datasets" and report.status_of(f"dataset {name}: builds from default options") in ("SKIP", "FAIL"):
                continue  # a source that did not build from default options has its line already
            report.skip(check.format(name), why if exp is not None else f"needs '{BUILD}', which {happened}")


def _may_own_modules(modality: Modality) -> bool:
    """Whether a modality (whose model could not be built) would own an adapter or a head."""
    cls = type(modality)
    return cls.build_adapter is not Modality.build_adapter or cls.build_head is not Modality.build_head


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


def _hf_codec(vocab, name: str, docs: dict[str, list], root: Path) -> str:
    """``export_hf``: the codec it writes is self-contained (its code imports nothing of this
    package or a plugin) and encodes held-out payloads to the ids ``encode`` gives."""
    import ast
    import importlib.util

    from mot_core.plugin_api import HFCodec

    modality = vocab.modalities[name]
    if type(modality).export_hf is Modality.export_hf:
        raise _Skip("no export_hf: a run with this modality exports one tower (mot export --modality), not the "
                    "whole model")
    where = f"{origin(modality)}: modality '{name}', export_hf"
    folder = root / "hf_codec" / name
    with plugin_boundary(where):
        codec = modality.export_hf(folder)
    if not isinstance(codec, HFCodec):
        raise MotError(f"{where} returned {type(codec).__name__}, expected an HFCodec")
    for file in codec.code:
        tree = ast.parse(Path(file).read_text(), filename=str(file))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            banned = [n for n in names if n.split(".")[0] in ("mot_core", "plugins", "registry")]
            if banned:
                raise MotError(f"{where}: {Path(file).name} imports {banned[0]}; an exported codec runs without this "
                               "package (import torch, numpy, PIL, tokenizers, safetensors or its own files only)")
        (folder / Path(file).name).write_bytes(Path(file).read_bytes())
    module_name, _, class_name = codec.class_name.rpartition(".")
    spec = importlib.util.spec_from_file_location(f"_mot_codec_check_{name}", folder / f"{module_name}.py")
    if spec is None or not (folder / f"{module_name}.py").is_file():
        raise MotError(f"{where}: class_name {codec.class_name!r} names {module_name}.py, which is not among its code")
    module = importlib.util.module_from_spec(spec)
    with plugin_boundary(f"{where}, the codec"):
        spec.loader.exec_module(module)
        instance = getattr(module, class_name)(folder, codec.settings)
    payloads = _payloads_of(docs, name)[:4]
    if not payloads:
        raise _Skip("no held-out segment of this modality")
    for payload in payloads:
        with plugin_boundary(f"{where}, the codec's encode"):
            theirs = [int(i) for i in instance.encode(payload)]
        ours = [int(i) for i in modality.encode(payload)]
        if theirs != ours:
            raise MotError(f"{where}: the codec encodes a held-out payload to {len(theirs)} ids, encode to {len(ours)} "
                           f"({'other ids' if len(theirs) == len(ours) else 'another length'}); the exported processor "
                           "would feed the model other ids than training did")
    return f"{len(payloads)} held-out segments encode to the run's ids through {codec.class_name}"


def _evaluate_model(exp, vocab, model, modality: str, evaluator_cls: type[Evaluator], val_docs: list) -> str:
    """The evaluator's model-level metrics as ``mot eval --samples 2`` computes them: a dict of
    finite numbers from the tiny model and the held-out documents read here."""
    from mot_core.generate.api import generate_segments
    from mot_core.generate.tasks import prompt_to_span, span_to_text
    from mot_core.training.evaluation import _checked_metrics

    where = f"{origin(evaluator_cls)}: evaluator '{evaluator_cls.name}' of modality '{modality}'"
    with plugin_boundary(f"{where}, __init__"):
        evaluator = evaluator_cls(exp.modalities[modality], exp.evaluator_options.get((modality, evaluator_cls.name)))
    context = EvaluationContext(model, vocab, val_docs, torch.device("cpu"), samples=EVALUATE_MODEL_SAMPLES, seed=0,
                                span_sampler=prompt_to_span, text_sampler=span_to_text,
                                segment_generator=generate_segments)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), plugin_boundary(f"{where}, evaluate_model"):
            result = evaluator.evaluate_model(context)
    finally:
        model.train(was_training)
    metrics = _checked_metrics(result, f"{where}, evaluate_model()")
    if type(evaluator).evaluate_model is Evaluator.evaluate_model:
        return "no model-level metrics (inherits Evaluator.evaluate_model)"
    return ", ".join(sorted(metrics)) or "no metrics"


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
    if modality.input_dim is not None:
        _continuous_generation_declared(modality, name)
    elif modality.span_grammar() is None and type(modality).decode is Modality.decode:
        raise _Skip("the modality declares no way to generate (no span grammar, decode, or values)")
    prompt = next((d.segments[0] for ds in docs.values() for d in ds
                   if d.segments[0].modality != name and vocab.modalities[d.segments[0].modality].input_dim is None), None)
    prompts = [[prompt]] if prompt is not None else [[RawSegment(name, _payloads_of(docs, name)[0])]]
    params = SamplingParams(temperature=1.0, denoising_steps=2)
    outputs = generate_segments(model, vocab, prompts * 2, name, params, max_tokens=8, seed=0)
    if len(outputs) != 2:
        raise MotError(f"modality '{name}': 2 prompts gave {len(outputs)} outputs")
    detail = f"2 samples after a '{prompts[0][0].modality}' prompt"
    if type(modality).write_payloads is not Modality.write_payloads:
        suffix = Path(modality.default_sample_file).suffix if modality.default_sample_file else ".out"
        with plugin_boundary(f"{origin(modality)}: modality '{name}', write_payloads"):
            written = modality.write_payloads(list(outputs), root / f"samples_{name}{suffix}", ["a", "b"])
        if not Path(written).is_file():
            raise MotError(f"modality '{name}': write_payloads returned {written}, which is not a file")
        detail += f", written by write_payloads to {Path(written).name}"
    return detail


# What a continuous modality declares to be generated (docs/writing_a_plugin.md, section 7).
_CONTINUOUS_GENERATION = {
    "value_span": "its begin marker and span length: `def value_span(self): return ValueSpan(begin=..., length=...)`",
    "sample_values": "its sampler: `def sample_values(self, runner, params, generator)` (denoise with runner.predict, "
                     "or draw one position at a time from runner.prompt_output() and runner.append)",
    "values_to_payloads": "`def values_to_payloads(self, values)`: (B, count, input_dim) -> B payloads",
}


def _continuous_generation_declared(modality, name: str) -> None:
    """All of what a continuous modality needs to generate, or none of it (it does not
    generate: a SKIP). Part of it is a FAIL naming what to add."""
    declared = {
        "value_span": modality.value_span() is not None,
        "sample_values": type(modality).sample_values is not Modality.sample_values,
        "values_to_payloads": type(modality).values_to_payloads is not Modality.values_to_payloads,
    }
    if not any(declared.values()):
        raise _Skip("a continuous modality that declares nothing to generate with (" + ", ".join(declared) + ")")
    missing = [hook for hook, present in declared.items() if not present]
    if missing:
        raise MotError(f"{origin(modality)}: modality '{name}' declares "
                       f"{', '.join(h for h, p in declared.items() if p)} but not {', '.join(missing)}, so it cannot "
                       "generate; add " + "; ".join(_CONTINUOUS_GENERATION[h] for h in missing))


def check_plugins(names: list[str] | None = None, registry=None, config_paths: list | None = None,
                  out=None, read_part_rows: Callable | None = None) -> list[CheckReport]:
    """Check every named plugin (default: all registered), once per run config (default: once
    with each plugin's own data sources); prints each report as it is done and returns them
    (``summary_of`` gives the closing line)."""
    from mot_core.config import load_raw_config
    from registry import get_registry

    out = out or sys.stdout
    for config_path in config_paths or []:
        load_raw_config(config_path)  # an unreadable config is one error before any check, not a FAIL per plugin
    if not names:
        registry = registry or get_registry()
        names = sorted({info.name for info in registry.plugins})
    reports = []
    for name in names:
        for config_path in config_paths or [None]:
            reports.append(check_plugin(name, registry, config_path, read_part_rows=read_part_rows))
            print(reports[-1].text(), file=out, flush=True)
    return reports
