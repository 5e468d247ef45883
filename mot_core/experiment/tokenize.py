"""Tokenize once: every source's documents, through the modalities' own encoders, into shards
(``mot data tokenize``; ``mot train`` and ``mot launch`` run it first for whatever is
missing), and the shards opened for training.

A split of a source is read in parts (``DataSource.num_parts``); each part is encoded in
chunks of ``data.encode_batch_documents`` documents and written as shards of about
``data.shard_tokens`` tokens. Parts are independent tasks: in this process one after the
other, or on a Ray cluster as a Ray Data job (``mot_core.distributed.tokenize``). Tokenizers are
fitted (or reloaded) before any part runs, on a bounded sample (``data.fit_sample_documents``).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from mot_core import filesystems
from mot_core.data.shards import (
    Fingerprints, ShardedDocuments, ShardWriter, batched, check_index, read_index, split_folder, write_index,
)
from mot_core.data.stores import DocumentList, DocumentStore
from mot_core.data.vocabulary import Vocabulary
from mot_core.errors import BadRecordError, MotError, plugin_boundary
from mot_core.plugin_api import BadRecord, DataSource, RawDocument, RawSegment, origin
from mot_core.progress import progress as progress_display
from mot_core.experiment.build import Experiment
from mot_core.experiment.provenance import check_tokenizers_fit_this_data

SPLITS = ("train", "val")


def data_root(exp: Experiment) -> str:
    """``data.dir``; by default ``<run.dir>/tokens``: in the store for a run folder on an object
    store (every worker reads the shards there; they are never copied to a working copy)."""
    if exp.config.data.dir:
        return exp.config.data.dir
    if filesystems.is_uri(exp.config.run.dir) and not exp.config.run.dir.lower().startswith("file://"):
        return filesystems.join(exp.config.run.dir, "tokens")
    return str(exp.run_dir / "tokens")


def retokenize_hint(exp: Experiment) -> str:
    return f"run `mot data tokenize CONFIG --force` to write them again (they are in {data_root(exp)})"


def iter_documents(name: str, source: DataSource, split: str, part: int | None = None,
                   skipped: collections.Counter | None = None, rows: Any = None) -> Iterator[RawDocument]:
    """``source.documents(split)`` (or one part of it; or, given ``rows`` a Ray Data reader
    gave for that part, ``source.read_rows``), read lazily and checked document by document:
    ``RawDocument``s whose segments are ``RawSegment``s of the source's modalities.

    A ``BadRecord`` the source yields stops the read with one line (``data.on_bad_record:
    error``, the default) or is left out and counted by cause in ``skipped`` (``skip``)."""
    if rows is not None:
        call = f"read_rows('{split}', {part}, <{rows.num_rows} rows>)"
    else:
        call = f"documents('{split}')" if part is None else f"read_part('{split}', {part})"
    where = f"{origin(source)}: dataset '{name}', {call}"
    with plugin_boundary(where):
        if rows is not None:
            docs = source.read_rows(split, part, rows)
        else:
            docs = source.documents(split) if part is None else source.read_part(split, part)
    if isinstance(docs, (str, bytes, dict)) or not hasattr(docs, "__iter__"):
        raise MotError(f"{where} returned {type(docs).__name__}; expected a list or an iterator of RawDocument")
    declared = set(source.modalities)
    policy = getattr(source, "_mot_on_bad_record", "error")
    iterator = iter(docs)
    position = 0
    while True:
        with plugin_boundary(where):
            doc = next(iterator, _END)
        if doc is _END:
            return
        if isinstance(doc, BadRecord):
            if policy != "skip":
                detail = f" ({doc.detail})" if doc.detail else ""
                raise BadRecordError(f"dataset '{name}': bad record at {doc.where}: {doc.cause}{detail}; fix or remove it, or "
                               "set data.on_bad_record=skip to leave such records out (they are counted)")
            if skipped is not None:
                skipped[doc.cause] += 1
            continue
        _check_document(doc, position, where, declared)
        position += 1
        yield doc


_END = object()


def _check_document(doc, position: int, where: str, declared: set[str]) -> None:
    if not isinstance(doc, RawDocument):
        raise MotError(f"{where} item {position} is {type(doc).__name__}; expected RawDocument(segments=(RawSegment(...), ...))")
    if not isinstance(doc.segments, (tuple, list)) or not doc.segments:
        raise MotError(f"{where} item {position} has segments {type(doc.segments).__name__} "
                       f"{'(empty)' if isinstance(doc.segments, (tuple, list)) else ''}; expected a non-empty tuple of RawSegment")
    for segment in doc.segments:
        if not isinstance(segment, RawSegment):
            raise MotError(f"{where} item {position} holds a {type(segment).__name__} segment; expected RawSegment(modality, payload)")
        if segment.modality not in declared:
            raise MotError(f"{where} item {position} has a '{segment.modality}' segment but the dataset declares "
                           f"modalities {', '.join(sorted(declared)) or 'none'}")


def num_parts(name: str, source: DataSource, split: str) -> int:
    where = f"{origin(source)}: dataset '{name}', num_parts('{split}')"
    with plugin_boundary(where):
        parts = source.num_parts(split)
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise MotError(f"{where} returned {parts!r}; expected an integer >= 1")
    return parts


def sample_documents(name: str, source: DataSource, split: str, limit: int) -> Iterator[RawDocument]:
    """At most ``limit`` documents: the first ones of each part, the parts in turn (what
    tokenizers are fitted on, whatever the corpus size)."""
    parts = num_parts(name, source, split)
    if parts == 1:
        yield from itertools.islice(iter_documents(name, source, split), limit)
        return
    count = 0
    for part in range(parts):
        share = -(-(limit - count) // (parts - part))  # what earlier parts left unused goes to the later ones
        for doc in itertools.islice(iter_documents(name, source, split, part), share):
            count += 1
            yield doc
        if count >= limit:
            return
    if not count:  # every part empty: the source's own reading of the split says why
        yield from itertools.islice(iter_documents(name, source, split), limit)


def source_documents(name: str, source: DataSource, split: str) -> list[RawDocument]:
    """Every document of a split, checked, as a list (small splits: held-out data for
    model-level metrics, the conformance check)."""
    return list(iter_documents(name, source, split))


def prepare_vocabulary(exp: Experiment, check_fitted_on: bool = True) -> Vocabulary:
    """Reload (or fit, on a bounded sample of the training documents) each modality's
    tokenizer. Documents are read lazily: a run whose tokenizers are saved reads none, except
    the small probe that checks a shared tokenizer was fitted on this run's data
    (``check_fitted_on``; off where no training data is read: ``mot eval``, ``mot generate``)."""
    if check_fitted_on:
        check_tokenizers_fit_this_data(exp, sample_documents)
    limit = exp.config.data.fit_sample_documents

    def payloads(name: str):
        for source_name, source in exp.sources.items():
            for doc in sample_documents(source_name, source, "train", limit):
                yield from (seg.payload for seg in doc.segments if seg.modality == name)

    for name, modality in exp.modalities.items():
        with plugin_boundary(f"{origin(modality)}: modality '{name}', prepare"):
            modality.prepare(payloads(name))
    return Vocabulary(exp.modalities)


def fingerprints(exp: Experiment, vocab: Vocabulary) -> dict[str, Fingerprints]:
    """Each source's fingerprints: the vocabulary's (every modality's tokenizer state, hashed
    once for all sources) and the source's own."""
    modalities = {}
    for modality_name, modality in vocab.modalities.items():
        with plugin_boundary(f"{origin(modality)}: modality '{modality_name}', fingerprint"):
            modalities[modality_name] = str(modality.fingerprint())
    layout = json.dumps([[n, vocab.offsets[n], vocab.modalities[n].vocab_size, modalities[n]] for n in vocab.names])
    vocabulary = hashlib.sha256(layout.encode()).hexdigest()
    out = {}
    for name, source in exp.sources.items():
        with plugin_boundary(f"{origin(source)}: dataset '{name}', fingerprint"):
            out[name] = Fingerprints(vocabulary, modalities, str(source.fingerprint()))
    return out


@dataclass(frozen=True)
class PartTask:
    source: str
    split: str
    part: int


def tokenize_part(exp: Experiment, vocab: Vocabulary, task: PartTask, prints: Fingerprints,
                  report: Callable[[str], None] = lambda line: None,
                  advance: Callable[[int], None] = lambda documents: None, rows: Any = None) -> list[dict]:
    """Encode one part of a split into shards; continues after the shards an interrupted run
    finished. Returns the part's shard records. ``advance(n)`` is called after each chunk of
    ``n`` documents encoded (progress within a long part). ``rows``: what a Ray Data reader
    gave for the part (``DataSource.read_rows``), else the source reads it."""
    cfg = exp.config.data
    root = data_root(exp)
    with object_store_errors(root, split_folder(root, task.source, task.split)):
        writer = ShardWriter(root, task.source, task.split, task.part, prints, cfg.shard_tokens, retokenize_hint(exp))
        if writer.done:
            return writer.progress["shards"]
        source = exp.sources[task.source]
        parts = num_parts(task.source, source, task.split)
        bad: collections.Counter = collections.Counter()
        if rows is not None:
            docs = iter_documents(task.source, source, task.split, task.part, skipped=bad, rows=rows)
        else:
            docs = iter_documents(task.source, source, task.split, None if parts == 1 else task.part, skipped=bad)
        done = writer.documents_read
        if done:  # read, not encoded: finished shards are kept (and the bad records among them counted)
            for _ in itertools.islice(docs, done):
                pass
            bad.clear()
            report(f"{task.source}/{task.split} part {task.part}: continuing after {done} documents already in "
                   "shards")
        for chunk in batched(docs, cfg.encode_batch_documents):
            writer.add(vocab.encode_documents(chunk, task.source), len(chunk), dict(bad))
            bad.clear()
            advance(len(chunk))
        return writer.finish(dict(bad))


@contextlib.contextmanager
def object_store_errors(root: str, where: str):
    """A failed request to the object store that holds the shards (``data.dir`` a URI) as one
    line naming ``where``, the cause and the fix; a local disk's ``OSError`` is left to the
    caller."""
    try:
        yield
    except OSError as exc:
        if not filesystems.is_uri(root):
            raise
        raise filesystems.describe_error(exc, where, "data.dir", f"{where} changed while it was used; run "
                                         "`mot data tokenize CONFIG` again") from None


def plan(exp: Experiment, vocab: Vocabulary, force: bool = False, splits: Iterable[str] = SPLITS,
         prints: dict[str, Fingerprints] | None = None
         ) -> tuple[list[PartTask], dict[tuple[str, str], tuple[Fingerprints, int]]]:
    """The parts still to tokenize, and each (source, split)'s fingerprints and part count.
    Shards that do not match are refused; ``force`` deletes every split's shards and writes
    them again."""
    root = data_root(exp)
    filesystems.check_reachable(root, "data.dir")  # an object store: its endpoint, credentials and bucket
    tasks, splits_todo = [], {}
    prints = prints or fingerprints(exp, vocab)
    for name, source in exp.sources.items():
        for split in splits:
            where = split_folder(root, name, split)
            with object_store_errors(root, where):
                index = None if force else read_index(root, name, split, retokenize_hint(exp))
            if index is not None:
                check_index(index, where, prints[name], retokenize_hint(exp))
                continue  # up to date (its shards are checked one by one when they are opened)
            if force:
                with object_store_errors(root, where):
                    _clear(where)
            parts = num_parts(name, source, split)
            splits_todo[(name, split)] = (prints[name], parts)
            tasks += [PartTask(name, split, part) for part in range(parts)]
    return tasks, splits_todo


def _clear(folder: str) -> None:
    fs, path = filesystems.resolve(folder, "data.dir")
    from pyarrow import fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path)


def finish(exp: Experiment, vocab: Vocabulary, splits_todo: dict, shards: dict[PartTask, list[dict]]) -> dict:
    """Write the index of every split whose parts are all done; returns a report per split."""
    report = {}
    for (name, split), (prints, parts) in splits_todo.items():
        listed = [s for part in range(parts) for s in shards[PartTask(name, split, part)]]
        with object_store_errors(data_root(exp), split_folder(data_root(exp), name, split)):
            index = write_index(data_root(exp), name, split, prints, parts, listed, vocab.names)
        if not index["documents"]:
            raise MotError(f"dataset '{name}' produced no tokens in its '{split}' split")
        report[f"{name}/{split}"] = {"documents": index["documents"], "tokens": index["tokens"], "shards": len(listed),
                                     **({"skipped": index["skipped"]} if "skipped" in index else {})}
    return report


def describe_skipped(counts: dict) -> str:
    """", 3 bad records skipped (undecodable image: 2, missing caption: 1)" for a split's
    report that left records out, else ""."""
    skipped = counts.get("skipped") or {}
    if not skipped:
        return ""
    causes = ", ".join(f"{cause}: {count:,}" for cause, count in sorted(skipped.items(), key=lambda item: -item[1]))
    return f", {sum(skipped.values()):,} bad records skipped ({causes})"


def tokenize_locally(exp: Experiment, vocab: Vocabulary, force: bool = False, progress: bool = True,
                     prints: dict[str, Fingerprints] | None = None) -> dict:
    """Tokenize every missing split in this process; returns a report per split written.

    ``progress``: a display over the parts (a bar on a terminal, else a plain line every tenth
    of the parts or 30 s, mid-part included), with the documents and tokens encoded so far. It
    goes to stdout, with the rest of the tokenize report (stderr keeps only errors)."""
    tasks, splits_todo = plan(exp, vocab, force, prints=prints)
    shards = {}
    counts = {"documents": 0, "tokens": 0}
    started = time.perf_counter()
    bar = progress_display(total=len(tasks), desc="tokenize", unit="part", disable=not progress or not tasks,
                           file=sys.stdout)

    def advance(documents: int) -> None:
        counts["documents"] += documents
        bar.set_postfix(documents=f"{counts['documents']:,}", tokens=f"{counts['tokens']:,}")

    with bar:
        for task in tasks:
            shards[task] = tokenize_part(exp, vocab, task, splits_todo[(task.source, task.split)][0],
                                         bar.write if progress else (lambda line: None), advance)
            counts["tokens"] += sum(s["tokens"] for s in shards[task])
            bar.set_postfix(documents=f"{counts['documents']:,}", tokens=f"{counts['tokens']:,}", refresh=False)
            bar.update(1)
    if progress and tasks:  # the encode-and-write time alone (`mot bench data` reads it)
        print(f"tokenized {len(tasks)} parts in {time.perf_counter() - started:.1f} s (encode and write)", flush=True)
    return finish(exp, vocab, splits_todo, shards)


@dataclass
class OpenedData:
    """The run's vocabulary and its documents as stores: shards, or (for a split whose shards
    are missing in a folder that may not be written, as ``mot eval`` of a moved run) memory."""

    vocab: Vocabulary
    train: dict[str, DocumentStore]
    val: list[DocumentStore]


def open_data(exp: Experiment, vocab: Vocabulary, missing: str = "error", splits: Iterable[str] = SPLITS,
              prints: dict[str, Fingerprints] | None = None) -> OpenedData:
    """Open every source's shards (written before: ``mot_core.runs.start.start_run`` tokenizes
    what is missing before training opens them). A split without shards is an error
    (``error``), or is tokenized into memory without writing (``memory``: ``mot eval`` never
    writes into a run folder). ``prints``: the sources' fingerprints, when already computed."""
    prints = prints or fingerprints(exp, vocab)
    root = data_root(exp)
    stores: dict[str, dict[str, DocumentStore]] = {split: {} for split in splits}
    for name in exp.sources:
        for split in splits:
            index = read_index(root, name, split, retokenize_hint(exp))
            where = split_folder(root, name, split)
            if index is None:
                if missing != "memory":
                    raise MotError(f"no tokenized shards in {where}; run `mot data tokenize CONFIG` first")
                docs = vocab.tokenize(source_documents(name, exp.sources[name], split), name)
                if not docs:
                    raise MotError(f"dataset '{name}' produced no tokens in its '{split}' split")
                stores[split][name] = DocumentList(docs)
                continue
            check_index(index, where, prints[name], retokenize_hint(exp))
            stores[split][name] = ShardedDocuments(root, name, split, index, vocab.expand, retokenize_hint(exp))
    return OpenedData(vocab, stores.get("train", {}), list(stores.get("val", {}).values()))
