"""Packing, targets, resumable streams, and the text plugin's tokenizer and metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mot_core.data import IGNORE, PackedStream, TokenDocument, Vocabulary, collate, fixed_batches
from mot_core.errors import MotError
from mot_core.plugin_api import Modality, RawDocument, RawSegment
from mot_core.training.state import lr_factor
from plugins.text.evaluator import LanguageModelEvaluator
from plugins.text.modality import Text, TextOptions


def doc(ids, modality=0, span=-1) -> TokenDocument:
    ids = np.asarray(ids, dtype=np.int64)
    return TokenDocument(ids, np.full(len(ids), modality, dtype=np.int64), np.full(len(ids), span, dtype=np.int64))


def test_rows_are_full_and_targets_stay_inside_documents():
    docs = [doc([1, 2, 3]), doc([4, 5, 6, 7, 8]), doc([9, 10])]
    stream = PackedStream([docs], [1.0], seq_len=4, seed=0, shuffle=False)
    rows = [stream.next_row() for _ in range(3)]
    tokens = np.concatenate([r["tokens"] for r in rows])
    assert tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]
    first, second = rows[0], rows[1]
    assert first["document"].tolist() == [0, 0, 0, 1]
    assert first["positions"].tolist() == [0, 1, 2, 0]
    # Next-token targets never cross a document; a document cut at the row end still
    # predicts its own next token.
    assert first["targets"].tolist() == [2, 3, IGNORE, 5]
    assert second["tokens"].tolist() == [5, 6, 7, 8] and second["positions"].tolist() == [0, 1, 2, 3]
    assert second["targets"].tolist() == [6, 7, 8, IGNORE]


def test_stream_state_resumes_the_exact_sequence():
    rng = np.random.default_rng(0)
    sources = [[doc(rng.integers(0, 50, rng.integers(2, 30))) for _ in range(20)] for _ in range(2)]
    a = PackedStream(sources, [1.0, 3.0], seq_len=16, seed=7)
    for _ in range(11):
        a.next_row()
    state = a.state_dict()
    expected = [a.next_row()["tokens"].tolist() for _ in range(30)]
    b = PackedStream(sources, [1.0, 3.0], seq_len=16, seed=7)
    b.load_state_dict(state)
    assert [b.next_row()["tokens"].tolist() for _ in range(30)] == expected


def test_mixture_weights_set_the_sampling_ratio():
    sources = [[doc([1] * 8)] * 10, [doc([2] * 8)] * 10]
    stream = PackedStream(sources, [1.0, 3.0], seq_len=8, seed=0)
    tokens = np.concatenate([stream.next_row()["tokens"] for _ in range(2000)])
    share = float((tokens == 2).mean())
    assert share == pytest.approx(0.75, abs=0.03)


def _real_sources() -> tuple[list[TokenDocument], list[TokenDocument]]:
    """Byte ids of real English: whole pydoc topics (long documents, modality 0) and single
    lines of them (short documents, modality 1): mean lengths differ about 30-fold."""
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics)[:60]]
    as_doc = lambda text, m: doc(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + 1, m)  # noqa: E731
    long_docs = [as_doc(text, 0) for text in texts if len(text) > 2000]
    lines = [line for text in texts for line in text.splitlines() if len(line) > 20]
    return long_docs, [as_doc(line, 1) for line in lines]


def test_mixture_weights_are_token_shares_met_within_5_percent_over_200_batches(capsys):
    long_docs, short_docs = _real_sources()
    weights = [0.3, 0.7]
    stream = PackedStream([long_docs, short_docs], weights, seq_len=128, seed=0, lanes=8, weight_unit="tokens")
    mixed, counts = 0, np.zeros(2)
    for _ in range(200):
        batch = stream.next_batch(2)
        real = batch.targets != IGNORE  # padding excluded (none here: no whole segments)
        per_source = np.array([int(((batch.modality == m) & real).sum()) for m in (0, 1)])
        counts += per_source
        mixed += bool(per_source.all())
    shares = counts / counts.sum()
    realized, by_modality = stream.realized_shares()
    with capsys.disabled():
        print(f"\ntoken shares over 200 batches: long {realized[0]:.3f} (weight 0.3), short {realized[1]:.3f} (weight 0.7); "
              f"batches holding both sources: {mixed}/200")
    for share, target in zip(realized, weights):
        assert abs(share - target) <= 0.05 * target
    assert abs(shares[0] - 0.3) <= 0.05 * 0.3  # counted from the batches themselves
    assert by_modality[0] == pytest.approx(realized[0])
    assert mixed >= 190  # batches mix sources instead of one long document filling batch after batch
    # as shares of documents, the same weights give a very different token mix
    by_docs = PackedStream([long_docs, short_docs], weights, seq_len=128, seed=0, lanes=8, weight_unit="documents")
    for _ in range(200):
        by_docs.next_batch(2)
    assert by_docs.realized_shares()[0][0] > 0.8


def test_token_share_stream_resumes_exactly_and_an_old_state_is_refused():
    long_docs, short_docs = _real_sources()
    a = PackedStream([long_docs, short_docs], [0.5, 0.5], seq_len=64, seed=3, lanes=4, weight_unit="tokens")
    for _ in range(5):
        a.next_batch(2)
    state = a.state_dict()
    expected = [a.next_batch(2).tokens for _ in range(5)]
    b = PackedStream([long_docs, short_docs], [0.5, 0.5], seq_len=64, seed=3, lanes=4, weight_unit="tokens")
    b.load_state_dict(state)
    assert all(torch.equal(b.next_batch(2).tokens, t) for t in expected)
    assert b.realized_shares()[0].tolist() == a.realized_shares()[0].tolist()
    legacy = {"rng": state["lanes"][0]["rng"], "epochs": [0, 0], "cursors": [3, 9], "current": [1, 3, 10]}
    with pytest.raises(MotError, match="earlier version of the packer"):
        PackedStream([long_docs, short_docs], [0.5, 0.5], seq_len=64, seed=3, lanes=4).load_state_dict(legacy)


def test_lanes_built_by_several_workers_give_the_global_batch():
    """Worker k builds only lanes [k*B/N, (k+1)*B/N): the rows, values and loss extras of
    each worker's batch are the rows of the single-process batch, and each lane reads its
    own documents (disjoint positions of each source's order)."""
    long_docs, short_docs = _real_sources()
    whole = PackedStream([long_docs, short_docs], [0.3, 0.7], seq_len=64, seed=5, lanes=4, weight_unit="tokens")
    halves = [PackedStream([long_docs, short_docs], [0.3, 0.7], seq_len=64, seed=5, lanes=4, owned=range(k * 2, k * 2 + 2),
                           weight_unit="tokens") for k in (0, 1)]
    for _ in range(6):
        full = whole.next_batch(2)
        parts = [h.next_batch(2) for h in halves]
        assert torch.equal(torch.cat([p.tokens for p in parts]), full.tokens)
        assert torch.equal(torch.cat([p.targets for p in parts]), full.targets)
    merged = {**halves[0].state_dict()["lanes"], **halves[1].state_dict()["lanes"]}
    assert merged.keys() == whole.state_dict()["lanes"].keys()


def test_each_worker_reads_only_the_documents_of_its_lanes():
    from mot_core.data.stores import DocumentList

    class Recording(DocumentList):
        def __init__(self, docs):
            super().__init__(docs)
            self.read: set[int] = set()

        def __getitem__(self, index):
            self.read.add(index)
            return super().__getitem__(index)

    rng = np.random.default_rng(1)
    docs = [doc(rng.integers(1, 50, rng.integers(20, 200))) for _ in range(400)]
    stores = [Recording(docs) for _ in range(2)]
    workers = [PackedStream([stores[k]], [1.0], seq_len=32, seed=0, lanes=4, owned=range(2 * k, 2 * k + 2))
               for k in range(2)]
    for _ in range(20):
        for worker in workers:
            worker.next_batch(1)
    assert stores[0].read and stores[1].read and not stores[0].read & stores[1].read
    assert len(stores[0].read) + len(stores[1].read) < len(docs)  # no worker reads the whole corpus


def test_batch_carries_routing_and_layout_built_on_the_host():
    docs = [doc([1, 2, 3], modality=0), doc([4, 5, 6, 7], modality=1, span=0)]
    stream = PackedStream([docs], [1.0], seq_len=7, seed=0, shuffle=False)
    batch = collate([stream.next_row() for _ in range(2)], num_modalities=2)
    assert batch.plan.counts == (6, 8)
    assert batch.layout.key is not None and not batch.layout.plain_causal
    assert batch.span[0].tolist() == [-1, -1, -1, 0, 0, 0, 0]


class _Digits(Modality):
    name = "digits"

    def prepare(self, train_payloads):
        pass

    @property
    def vocab_size(self):
        return 10

    def encode(self, payload):
        return torch.tensor([int(c) for c in payload])


def test_global_vocabulary_offsets_and_range_check(tmp_path):
    from pydoc_data.topics import topics

    text = Text(TextOptions(vocab_size=300), tmp_path / "text")
    text.prepare([topics[name] for name in sorted(topics)[:20]])
    vocab = Vocabulary({"text": text, "digits": _Digits(None, tmp_path)})
    assert vocab.offsets == {"text": 0, "digits": text.vocab_size} and vocab.size == text.vocab_size + 10
    [tokenized] = vocab.tokenize([RawDocument((RawSegment("text", "hello"), RawSegment("digits", "0129")))], "src")
    assert tokenized.ids[-4:].tolist() == [text.vocab_size + d for d in (0, 1, 2, 9)]
    assert tokenized.modality.tolist() == [0] * (len(tokenized) - 4) + [1] * 4
    with pytest.raises(MotError, match="declares only"):
        vocab.tokenize([RawDocument((RawSegment("audio", b""),))], "src")


def test_validation_batches_are_fixed():
    docs = [doc(list(range(1, 40)))] * 5
    a = fixed_batches(docs, batch_size=2, seq_len=16, max_batches=3, num_modalities=1)
    b = fixed_batches(docs, batch_size=2, seq_len=16, max_batches=3, num_modalities=1)
    assert len(a) == 3 and all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b))
    with pytest.raises(MotError, match="no documents"):
        fixed_batches([], 2, 16, 3, 1)


def test_text_tokenizer_round_trip_and_bytes_per_token(tmp_path):
    from pydoc_data.topics import topics

    corpus = [topics[k] for k in sorted(topics)[:40]]
    text = Text(TextOptions(vocab_size=500), tmp_path)
    text.prepare(corpus)
    sample = "Unicode works too: naïve café — 東京."
    ids = text.encode(sample)
    assert ids[-1] == text.eot and text.decode(ids) == sample
    # Bits-per-byte needs each token's byte length; over a document they sum to its UTF-8 size.
    assert int(text.token_bytes()[ids[:-1]].sum()) == len(sample.encode("utf-8"))
    reloaded = Text(TextOptions(vocab_size=500), tmp_path)
    reloaded.prepare([])  # loads the saved tokenizer instead of training
    assert reloaded.encode(sample).tolist() == ids.tolist()


def _english() -> list[str]:
    """Enough real text for a 300-id BPE (CPython's pydoc topics)."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)[:20]] + ["abc def ghi " * 100]


def test_bits_per_byte_is_nats_over_bytes(tmp_path):
    text = Text(TextOptions(vocab_size=300), tmp_path)
    text.prepare(_english())
    ids = text.encode("abc def")[:-1]
    losses = torch.full((len(ids),), 2.0)
    ev = LanguageModelEvaluator(text)
    ev.update(losses, torch.ones(len(ids), dtype=torch.bool), ids)
    metrics = ev.compute()
    assert metrics["loss"] == pytest.approx(2.0)
    assert metrics["perplexity"] == pytest.approx(math.exp(2.0))
    assert metrics["bits_per_byte"] == pytest.approx(2.0 * len(ids) / (math.log(2) * 7))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_bits_per_byte_ignores_predictions_of_other_modalities(tmp_path):
    text = Text(TextOptions(vocab_size=300), tmp_path)
    text.prepare(_english())
    ids = text.encode("abc def")[:-1]
    targets = torch.cat([ids, torch.tensor([-7])])  # last: a begin-of-image id outside the text range
    losses = torch.cat([torch.full((len(ids),), 2.0), torch.tensor([9.0])])
    ev = LanguageModelEvaluator(text)
    ev.update(losses, torch.ones(len(targets), dtype=torch.bool), targets)
    assert ev.compute()["bits_per_byte"] == pytest.approx(2.0 * len(ids) / (math.log(2) * 7))


def test_text_files_split_does_not_depend_on_where_the_corpus_lives(tmp_path):
    from plugins.text.data import TextFiles, TextFilesOptions

    splits = []
    for folder in ("a", "b/deeper"):
        root = tmp_path / folder
        root.mkdir(parents=True)
        for i in range(40):
            (root / f"doc{i:02d}.txt").write_text(f"document number {i}")
        source = TextFiles(TextFilesOptions(paths=[str(root / "*.txt")], val_fraction=0.2))
        splits.append(sorted(d.segments[0].payload for d in source.documents("val")))
    assert splits[0] == splits[1] and splits[0]


def test_bpe_that_cannot_reach_vocab_size_is_an_error_naming_the_fix(tmp_path):
    text = Text(TextOptions(vocab_size=300), tmp_path / "text")
    # below the option's own minimum a smaller vocab_size is no fix: it is not suggested
    with pytest.raises(MotError, match=r"reached only 2\d\d of vocab_size=300 ids .*; lower min_frequency or add text "
                                       r"\(vocab_size cannot go below 300\)"):
        text.prepare(["hello world " * 50])
    from pydoc_data.topics import topics

    text = Text(TextOptions(vocab_size=60000), tmp_path / "text2")
    with pytest.raises(MotError, match=r"reached only (\d+) of vocab_size=60000 ids .* set "
                                       r"mixture.modalities.text.options.vocab_size=\1 "):
        text.prepare(list(topics.values())[:5])


def test_validation_rows_are_spread_over_the_whole_held_out_set():
    """A budget far smaller than the split still samples every part of it: the end of a long
    document as well as its start, and the short documents too."""
    long_doc = doc(list(range(100, 10_100)))  # 10,000 tokens
    short = [doc([1, 2, 3, 4, 5, 6, 7, 8]) for _ in range(50)]
    batches = fixed_batches([long_doc, *short], batch_size=2, seq_len=16, max_batches=4, num_modalities=1)
    tokens = torch.cat([b.tokens.reshape(-1) for b in batches])
    long_tokens = tokens[tokens >= 100] - 100
    assert long_tokens.numel() and long_tokens.max() > 7_000 and long_tokens.min() < 3_000
    assert bool((tokens < 100).any())  # short documents are read too
    everything = fixed_batches([long_doc, *short], batch_size=2, seq_len=16, max_batches=10_000, num_modalities=1)
    seen = torch.cat([b.tokens.reshape(-1) for b in everything])
    assert seen.numel() <= 10_400 and set(range(100, 10_100)) <= set(seen.tolist())  # all of it, once


@pytest.mark.parametrize("full", [True, False])
def test_every_epoch_reads_every_document_once(monkeypatch, full):
    """A permutation of the documents per epoch, whether the source is small enough for one
    permutation of all of them or read in chunks (above ``FULL_PERMUTATION`` documents)."""
    from mot_core.data.stores import EpochOrder

    if not full:
        monkeypatch.setattr(EpochOrder, "FULL_PERMUTATION", 10)
    order = EpochOrder([5, 130, 0, 70], seed=3, source=1, chunk_docs=64)
    assert order.full == full
    epochs = [[order.document(epoch, i) for i in range(len(order))] for epoch in range(3)]
    assert all(sorted(e) == list(range(205)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert [order.document(1, i) for i in range(len(order))] == epochs[1]  # a function of (epoch, position)


def test_a_store_without_random_access_is_read_chunk_by_chunk_whatever_its_size():
    """An object store fetches a record batch per read: its order visits chunks (record
    batches) in a random order and the documents of each chunk together, even when small
    enough for a full permutation; every epoch still reads every document once."""
    from mot_core.data.stores import EpochOrder

    order = EpochOrder([130, 70], seed=3, source=0, chunk_docs=64, random_access=False)
    assert not order.full
    epoch = [order.document(0, i) for i in range(len(order))]
    assert sorted(epoch) == list(range(200))
    chunk_of = [d // 64 if d < 130 else 3 + (d - 130) // 64 for d in epoch]
    runs = 1 + sum(a != b for a, b in zip(chunk_of, chunk_of[1:]))
    assert runs == 5  # 130 = 64 + 64 + 2 and 70 = 64 + 6 documents: each chunk read in one run


@pytest.mark.parametrize("ahead", [False, True], ids=["on demand", "built ahead"])
def test_lanes_crossing_an_epoch_boundary_build_each_epoch_order_once(monkeypatch, ahead):
    """Lanes reach the end of an epoch at different steps, so the packer asks for two epochs
    in turn: each epoch's order is built once (before, 800 steps of 16 lanes over 4,000
    documents rebuilt it 478 times). Built ahead in the background (large sources), the orders
    and so the batches are the same."""
    from mot_core.data.stores import EpochOrder

    def run() -> tuple[list, EpochOrder, int]:
        docs = [doc(np.arange(100, 100 + 3 + i % 5)) for i in range(4000)]
        stream = PackedStream([docs], [1.0], seq_len=16, seed=0, lanes=16)
        tokens = [stream.next_batch(1).tokens for _ in range(800)]
        order = stream.orders[0]
        epochs = 1 + max(lane.taken[0] * 16 + lane.index for lane in stream._lanes.values()) // len(order)
        return tokens, order, epochs

    expected, order, epochs = run()
    assert epochs >= 3  # the run crossed at least two boundaries
    assert order.rebuilt == epochs
    if ahead:
        monkeypatch.setattr(EpochOrder, "PREFETCH_FROM", 0)
        tokens, order, epochs = run()
        assert all(torch.equal(a, b) for a, b in zip(tokens, expected))
        assert epochs <= order.rebuilt <= epochs + 1  # the last one may be built ahead for nothing
