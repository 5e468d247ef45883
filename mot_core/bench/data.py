"""``mot bench data``: does the data path scale? Tokenize once, then train from the shards.

For each corpus size it builds a folder of real English text (the Wikipedia articles shipped
with gensim and Python's pydoc topics, copied until the size is reached, as a user with a
large corpus would have many files), then:
  - fits the text BPE on a bounded sample and tokenizes the corpus into shards (``mot data
    tokenize``, in a child process), next to the raw speed of HF ``tokenizers`` encoding the
    same text in one ``encode_batch`` call (the limit for the tokenize step);
  - starts ``mot train`` on it (a child process) and records the time from its start to the end
    of its first step and its peak resident memory (VmHWM, polled from /proc).
Then, on the smallest corpus, it trains one model from the shards and from the same documents
held in memory, step for step in alternation, and compares the step times (medians): reading
from shards must not slow training.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mot_core.errors import MotError

UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
FILE_BYTES = 4 << 20  # each corpus file: a user's corpus comes as many files


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            number = text[: -len(unit)]
            try:
                value = float(number)
            except ValueError:
                break
            if value > 0:
                return int(value * factor)
    raise MotError(f"corpus size {text!r} is not a size such as 5MB, 500MB or 2GB")


def real_text() -> str:
    """About 3.5 MB of real English: gensim's Wikipedia articles and Python's pydoc topics."""
    from pydoc_data.topics import topics

    from registry import get_registry

    wikipedia = get_registry().get("datasets", "wikipedia", "mot bench data")
    source = wikipedia(wikipedia.Options())
    articles = [doc.segments[0].payload for split in ("train", "val") for doc in source.documents(split)]
    return "\n\n".join(articles + [topics[name] for name in sorted(topics)])


def build_corpus(folder: Path, size: int, text: str) -> Path:
    """Files of real text adding up to ``size`` bytes (kept and reused when already built)."""
    done = folder / "corpus.json"
    if done.is_file() and json.loads(done.read_text()).get("bytes") == size:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.txt"):
        old.unlink()
    written, number = 0, 0
    while written < size:
        offset = (number * 7919) % len(text)  # each file starts at another place of the text
        rotated = text[offset:] + "\n\n" + text[:offset]
        want = min(FILE_BYTES, size - written)
        path = folder / f"part-{number:05d}.txt"
        path.write_text((rotated * (want // len(rotated) + 1))[:want], encoding="utf-8")
        written += path.stat().st_size
        number += 1
    done.write_text(json.dumps({"bytes": size, "files": number}))
    return folder


def bench_config(corpus: Path, run_dir: Path, steps: int, size: int) -> dict:
    """A 0.4M-parameter text model: the benchmark measures the data path, not the model. The
    held-out fraction keeps about 40 documents or more (1% of a large corpus)."""
    return {
        "run": {"dir": str(run_dir), "seed": 0, "device": "cpu"},
        "model": {"dim": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 256},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 256, "eval_every": 0, "eval_batches": 2,
                  "checkpoint_every": 0, "log_every": 1, "progress": False, "warmup_steps": 1},
        "data": {"fit_sample_documents": 2000},
        "mixture": {
            "modalities": {"text": {"options": {"vocab_size": 2048}}},
            "datasets": {"text_files": {"options": {"paths": [str(corpus / "*.txt")], "split_documents": "chunks",
                                                    "chunk_chars": 8000,
                                                    "val_fraction": min(0.2, max(0.01, 40 * 8000 / size))}}},
        },
    }


def _mot(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mot_core.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def watch(process: subprocess.Popen, metrics: Path | None = None) -> dict:
    """Wait for a child, polling its peak resident memory (VmHWM) and, with ``metrics``, the
    moment its first step is logged. Returns seconds, first-step seconds, peak MB, output."""
    started = time.perf_counter()
    peak_kb, first_step = 0, None
    status = Path(f"/proc/{process.pid}/status")
    output: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except OSError:
            pass
        if first_step is None and metrics is not None and metrics.is_file() and metrics.stat().st_size:
            first_step = time.perf_counter() - started
        time.sleep(0.05)
    reader.join(timeout=5)
    if process.returncode:
        raise MotError(f"`{' '.join(process.args[2:])}` failed: {''.join(output)[-2000:]}")
    return {"seconds": time.perf_counter() - started, "first_step_s": first_step, "peak_mb": peak_kb / 1024,
            "output": "".join(output)}


def raw_encode_speed(tokenizer_file: Path, corpus: Path, limit: int = 32 << 20) -> dict:
    """MB/s and tokens/s of HF ``tokenizers`` alone on (up to ``limit`` bytes of) the corpus."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    texts, size = [], 0
    for path in sorted(corpus.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        texts += [text[i : i + 8000] for i in range(0, len(text), 8000)]
        size += len(text.encode("utf-8"))
        if size >= limit:
            break
    started = time.perf_counter()
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts))
    seconds = time.perf_counter() - started
    return {"mb_per_s": size / seconds / 1e6, "tokens_per_s": tokens / seconds}


def step_times_side_by_side(config_path: Path, steps: int = 60) -> dict:
    """One model trained from the shards and from the same documents in memory, alternating
    step by step; median step time (data reading included) of each."""
    import numpy as np
    import torch

    from mot_core.data import PackedStream
    from mot_core.data.stores import DocumentList
    from mot_core.experiment.build import build_experiment, build_model, model_args
    from mot_core.experiment.resolve import resolve_config
    from mot_core.experiment.tokenize import open_data, prepare_vocabulary
    from mot_core.training.evaluation import forward_losses
    from mot_core.training.state import build_optimizer

    config = resolve_config(config_path)
    exp = build_experiment(config)
    vocab = prepare_vocabulary(exp)
    data = open_data(exp, vocab)
    sharded = data.train["text_files"]
    in_memory = DocumentList([sharded[i] for i in range(len(sharded))])
    tcfg = config.train
    streams = {name: PackedStream([store], [1.0], tcfg.seq_len, 0, lanes=tcfg.batch_size, weight_unit="tokens")
               for name, store in (("shards", sharded), ("memory", in_memory))}
    torch.manual_seed(0)
    model = build_model(model_args(config, vocab), vocab)
    optimizer = build_optimizer(model, tcfg)
    times: dict[str, list[float]] = {"shards": [], "memory": []}
    for step in range(steps + 2):
        for name in (("shards", "memory") if step % 2 else ("memory", "shards")):
            started = time.perf_counter()
            batch = streams[name].next_batch(len(vocab.names))
            losses = forward_losses(model, batch, vocab, exp)
            loss = sum(l[0][l[1]].mean() for l in losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= 2:  # warm-up steps are not timed
                times[name].append(time.perf_counter() - started)
    shards, memory = statistics.median(times["shards"]), statistics.median(times["memory"])
    return {"steps": steps, "shards_step_s": shards, "memory_step_s": memory, "ratio": shards / memory,
            "documents": len(in_memory), "spread": float(np.std(times["shards"]) / shards)}


def run_data_bench(sizes: list[int], out: Path, steps: int = 3, progress=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    text = real_text()
    rows = []
    for size in sizes:
        label = _label(size)
        corpus = build_corpus(out / f"corpus_{label}", size, text)
        run_dir = out / f"run_{label}"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        config = out / f"config_{label}.yaml"
        config.write_text(yaml.safe_dump(bench_config(corpus, run_dir, steps, size)))
        progress(f"{label}: tokenizing {size / 1e6:,.0f} MB")
        tokenize = watch(_mot(["data", "tokenize", str(config)]))
        counts = {}
        for split in ("train", "val"):
            index = json.loads((run_dir / "tokens" / "text_files" / split / "index.json").read_text())
            counts[split] = index
        tokens = sum(c["tokens"] for c in counts.values())
        # the encode-and-write phase alone (start-up and the bounded tokenizer fit excluded)
        encode_s = float(re.findall(r"parts in ([\d.]+) s \(encode and write\)", tokenize["output"])[-1])
        raw = raw_encode_speed(run_dir / "state" / "text" / "tokenizer.json", corpus)
        progress(f"{label}: training {steps} steps")
        train = watch(_mot(["train", str(config)]), metrics=run_dir / "metrics.jsonl")
        rows.append({
            "corpus": label, "bytes": size, "documents": counts["train"]["documents"] + counts["val"]["documents"],
            "tokens": tokens, "shards": sum(len(c["shards"]) for c in counts.values()),
            "tokenize_s": tokenize["seconds"], "encode_s": encode_s, "tokenize_mb_per_s": size / encode_s / 1e6,
            "tokenize_tokens_per_s": tokens / encode_s, "tokenize_peak_mb": tokenize["peak_mb"],
            "raw_mb_per_s": raw["mb_per_s"], "raw_tokens_per_s": raw["tokens_per_s"],
            "first_step_s": train["first_step_s"], "train_peak_mb": train["peak_mb"],
        })
        progress(json.dumps(rows[-1]))
    smallest = out / f"config_{_label(min(sizes))}.yaml"
    progress("step time: shards against the same documents in memory")
    side = step_times_side_by_side(smallest)
    return {"rows": rows, "step_time": side}


def _label(size: int) -> str:
    for unit in ("GB", "MB", "KB"):
        if size >= UNITS[unit] and size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]}{unit}"
    return f"{size}B"


def format_report(report: dict) -> str:
    rows = report["rows"]
    lines = [
        "corpus | documents | tokens | shards | mot data tokenize s (encode s) | encode MB/s | encode tokens/s | "
        "raw tokenizers MB/s | tokenize peak RSS MB | first step s | train peak RSS MB",
        "---|---|---|---|---|---|---|---|---|---|---",
    ]
    for r in rows:
        lines.append(
            f"{r['corpus']} | {r['documents']:,} | {r['tokens']:,} | {r['shards']} | {r['tokenize_s']:.1f} "
            f"({r['encode_s']:.1f}) | {r['tokenize_mb_per_s']:.2f} | {r['tokenize_tokens_per_s']:,.0f} | "
            f"{r['raw_mb_per_s']:.2f} | {r['tokenize_peak_mb']:,.0f} | {r['first_step_s']:.1f} | {r['train_peak_mb']:,.0f}"
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        lines.append(f"train peak RSS {last['corpus']} / {first['corpus']}: {last['train_peak_mb'] / first['train_peak_mb']:.3f}")
    side = report["step_time"]
    lines.append(
        f"step time over {side['steps']} alternating steps ({side['documents']:,} documents of the smallest corpus): "
        f"shards {1000 * side['shards_step_s']:.1f} ms, in memory {1000 * side['memory_step_s']:.1f} ms, "
        f"ratio {side['ratio']:.3f}"
    )
    return "\n".join(lines)


class _SyntheticStore:
    """``documents`` short documents made on demand (``DocumentStore``): the order's cost at a
    corpus size no disk here holds, without the cost of reading them."""

    def __init__(self, documents: int):
        self.count, self.block_sizes, self.chunk_docs, self.random_access = documents, [documents], 64, True

    def __len__(self) -> int:
        return self.count

    def _length(self, index):
        return 8 + (index * 7919) % 33  # 8 to 40 tokens, about 24 on average

    def __getitem__(self, index: int):
        import numpy as np

        from mot_core.data import TokenDocument

        ids = 4 + (index + np.arange(self._length(index), dtype=np.int64)) % 250
        return TokenDocument(ids, np.zeros(ids.size, dtype=np.int64), np.full(ids.size, -1, dtype=np.int64))

    def lengths(self):
        import numpy as np

        return self._length(np.arange(self.count, dtype=np.int64))

    def total_tokens(self) -> int:
        return int(self.lengths().sum())


def epoch_boundary_steps(documents: int = 1 << 24, lanes: int = 16, seq_len: int = 512, steps: int = 100) -> dict:
    """The data side of ``steps`` steps (``PackedStream.next_batch``) while the lanes cross an
    epoch boundary one after another (lane l about 10 + 4 l steps before its end of the
    epoch, with the next epoch's order built as a run would have built it by then), as the packer now runs (two epoch orders kept, the next one built in the
    background) and as it ran before (one order kept, built on demand), side by side on one
    source of ``documents`` documents. Returns each way's median and slowest step and the
    number of orders built."""
    import numpy as np

    from mot_core.data import PackedStream
    from mot_core.data.stores import EpochOrder

    store = _SyntheticStore(documents)
    per_step = seq_len / float(store.lengths()[: 1 << 16].mean())  # documents a lane takes per step
    ways = {"now": (EpochOrder.EPOCHS_KEPT, EpochOrder.PREFETCH_FROM), "before": (1, documents + 1)}
    report = {"documents": documents, "lanes": lanes, "seq_len": seq_len, "steps": steps}
    saved = EpochOrder.EPOCHS_KEPT, EpochOrder.PREFETCH_FROM
    try:
        for name, (kept, prefetch_from) in ways.items():
            EpochOrder.EPOCHS_KEPT, EpochOrder.PREFETCH_FROM = kept, prefetch_from
            stream = PackedStream([store], [1.0], seq_len, seed=0, lanes=lanes)
            for lane in stream._lanes.values():
                lane.taken[0] = documents // lanes - int(per_step * (10 + 4 * lane.index))
            stream.next_batch(1)  # the current epoch's order: built once at the start of any run
            ahead = stream.orders[0]._next
            if ahead is not None:
                # a run's lanes pass three quarters of an epoch thousands of steps before its end
                # (here they start 10 to 70 steps before it): the next order is ready by then
                ahead[1].result()
            def crossed() -> int:
                return sum(lane.index + lane.taken[0] * lanes >= documents for lane in stream._lanes.values())

            times, crossing = [], []  # crossing: a lane entered the next epoch during the step
            for _ in range(steps):
                before = crossed()
                started = time.perf_counter()
                stream.next_batch(1)
                times.append(time.perf_counter() - started)
                crossing.append(crossed() > before)
            median = float(np.median(times))
            at_boundary = [t for t, c in zip(times, crossing) if c]
            report[name] = {"median_step_s": median, "slowest_step_s": max(times), "slowest_over_median": max(times) / median,
                            "crossing_steps": len(at_boundary), "crossing_median_s": float(np.median(at_boundary)),
                            "crossing_slowest_s": max(at_boundary), "orders_built": stream.orders[0].rebuilt,
                            "lanes_crossed": crossed()}
    finally:
        EpochOrder.EPOCHS_KEPT, EpochOrder.PREFETCH_FROM = saved
    return report


def format_epoch_boundary(report: dict) -> str:
    lines = [f"epoch boundary: {report['documents']:,} documents, {report['lanes']} lanes of {report['seq_len']} "
             f"tokens, {report['steps']} steps (data side of each step)",
             "packer | median step ms | slowest step ms | slowest / median | steps where a lane crossed: median ms, "
             "slowest ms | epoch orders built | lanes crossed",
             "---|---|---|---|---|---|---"]
    for name in ("now", "before"):
        r = report[name]
        lines.append(f"{name} | {1000 * r['median_step_s']:.1f} | {1000 * r['slowest_step_s']:.1f} | "
                     f"{r['slowest_over_median']:.2f} | {r['crossing_steps']} steps: {1000 * r['crossing_median_s']:.1f}, "
                     f"{1000 * r['crossing_slowest_s']:.1f} | {r['orders_built']} | {r['lanes_crossed']}/{report['lanes']}")
    return "\n".join(lines)


WORKER_READ = re.compile(r"worker (\d+): read ([\d.]+) MB of the ([\d.]+) MB of training shards in the object store "
                         r"\(([\d.]+)%\) in (\d+) requests before step (\d+)")


def run_remote_bench(size: int, remote: str, out: Path, workers: int = 2, progress=print) -> dict:
    """Shards in an object store against the same shards on disk, for a corpus of ``size``
    bytes: tokenized once on disk, copied to ``remote`` (a URI the usual AWS variables or
    ``storage`` reach), then
      - ``mot train`` from disk and from ``remote``: time to the end of the first step;
      - ``mot launch`` of ``workers`` workers from ``remote``: what each worker fetched before
        its first step (the line each worker prints), against the shards' size."""
    import shutil

    import pyarrow.fs as pafs

    from mot_core import filesystems

    out.mkdir(parents=True, exist_ok=True)
    label = _label(size)
    corpus = build_corpus(out / f"corpus_{label}", size, real_text())
    local_dir = out / f"local_{label}"
    local_config = out / f"local_{label}.yaml"
    local_config.write_text(yaml.safe_dump(bench_config(corpus, local_dir, 1, size)))
    if not (local_dir / "tokens" / "text_files" / "train" / "index.json").is_file():
        progress(f"{label}: tokenizing {size / 1e6:,.0f} MB")
        watch(_mot(["data", "tokenize", str(local_config)]))
    shards_mb = sum(p.stat().st_size for p in (local_dir / "tokens").rglob("*.arrow")) / 1e6
    remote = remote.rstrip("/")
    progress(f"{label}: copying {shards_mb:,.0f} MB of shards to {remote}")
    fs, path = filesystems.resolve(remote, "--remote")
    try:
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local_dir / "tokens"), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs, use_threads=True)
    except OSError as exc:
        raise filesystems.describe_error(exc, remote, "--remote") from None
    firsts = {}
    for where in ("disk", "remote"):
        run_dir = out / f"{where}_run_{label}"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(local_dir / "state", run_dir / "state")  # the same tokenizer: the same shards are valid
        config = bench_config(corpus, run_dir, 1, size)
        config["data"]["dir"] = str(local_dir / "tokens") if where == "disk" else remote
        path_of = out / f"{where}_{label}.yaml"
        path_of.write_text(yaml.safe_dump(config))
        progress(f"{label}: mot train from {where}")
        firsts[where] = watch(_mot(["train", str(path_of)]), metrics=run_dir / "metrics.jsonl")["first_step_s"]
    launch_dir = out / f"launch_run_{label}"
    shutil.rmtree(launch_dir, ignore_errors=True)
    shutil.copytree(local_dir / "state", launch_dir / "state")
    config = bench_config(corpus, launch_dir, 1, size)
    config["data"]["dir"] = remote
    launch_config = out / f"launch_{label}.yaml"
    launch_config.write_text(yaml.safe_dump(config))
    progress(f"{label}: mot launch of {workers} workers from {remote}")
    launched = watch(_mot(["launch", str(launch_config), "--num-workers", str(workers)]))
    reads = {int(m[0]): {"mb": float(m[1]), "shards_mb": float(m[2]), "percent": float(m[3]), "requests": int(m[4])}
             for m in WORKER_READ.findall(launched["output"])}
    if len(reads) != workers:
        raise MotError(f"`mot launch` printed what {len(reads)} of its {workers} workers read: {launched['output'][-1500:]}")
    return {"corpus": label, "bytes": size, "shards_mb": shards_mb, "remote": remote, "first_step_s": firsts,
            "workers": reads}


def format_remote_report(report: dict) -> str:
    first = report["first_step_s"]
    lines = [f"{report['corpus']} corpus, {report['shards_mb']:,.1f} MB of shards in {report['remote']}",
             f"first step of `mot train` (from its start): disk {first['disk']:.1f} s, object store "
             f"{first['remote']:.1f} s",
             "launch worker | fetched before step 1 MB | of the shards | requests",
             "---|---|---|---"]
    for rank, r in sorted(report["workers"].items()):
        lines.append(f"{rank} | {r['mb']:.2f} | {r['percent']:.2f}% | {r['requests']}")
    return "\n".join(lines)


def many_shards_start(count: int, root: str, lanes: int = 16, seq_len: int = 256) -> dict:
    """Start-up against the number of shards: ``count`` small shards (8 documents each) written
    under ``root`` (a folder or an object-store URI), then the time to open the split (sizes
    from one listing, footers checked at once only up to ``ShardedDocuments.EAGER_FOOTERS``
    local shards) and the data side of the first step (``lanes`` rows of ``seq_len``)."""
    import numpy as np

    from mot_core.data import PackedStream
    from mot_core.data.shards import (
        BATCH_DOCUMENTS, Fingerprints, ShardedDocuments, encode_shard, filesystem, split_folder, write_index,
    )
    from mot_core.data.vocabulary import EncodedDocument

    docs = [EncodedDocument(4 + np.arange(24 + i, dtype=np.int32) % 250, np.zeros(1, np.int16),
                            np.array([24 + i], np.int32), np.zeros(0, np.float32)) for i in range(8)]
    data = encode_shard(docs)
    fs, folder = filesystem(split_folder(root, "many", "train"))
    fs.create_dir(folder, recursive=True)
    started = time.perf_counter()
    shards = []
    for number in range(count):
        name = f"part-00000-{number:06d}.arrow"
        with fs.open_output_stream(f"{folder}/{name}") as handle:
            handle.write(data)
        shards.append({"file": name, "documents": len(docs), "tokens": int(sum(d.ids.size for d in docs)),
                       "bytes": len(data), "batch_documents": BATCH_DOCUMENTS})
    written = time.perf_counter() - started
    index = write_index(root, "many", "train", Fingerprints("bench", {}, "bench"), 1, shards, ["text"])

    def expand(encoded):
        from mot_core.data import TokenDocument

        ids = encoded.ids.astype(np.int64)
        return TokenDocument(ids, np.zeros(ids.size, np.int64), np.full(ids.size, -1, np.int64))

    started = time.perf_counter()
    store = ShardedDocuments(root, "many", "train", index, expand)
    opened = time.perf_counter() - started
    started = time.perf_counter()
    PackedStream([store], [1.0], seq_len, seed=0, lanes=lanes).next_batch(1)
    first = time.perf_counter() - started
    return {"shards": count, "root": root, "write_s": written, "open_s": opened, "first_batch_s": first,
            "fetched_mb": store.reads.bytes / 1e6, "requests": store.reads.requests}


def format_many_shards(report: dict) -> str:
    return (f"{report['shards']:,} shards in {report['root']}: opened in {report['open_s']:.2f} s, the first step's "
            f"batch in {report['first_batch_s']:.2f} s (written in {report['write_s']:.1f} s; fetched "
            f"{report['fetched_mb']:.2f} MB in {report['requests']} requests)")
