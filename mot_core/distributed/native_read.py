"""Ray Data's own readers on a cluster: the parts ``mot data tokenize --address`` reads with
``read_parquet``, ``read_webdataset`` or ``read_binary_files`` (``DataSource.native_reads``).

Ray Data reads the files in parallel and streaming, in file order (``preserve_order``: a file's
rows come in the order they are stored). The driver follows the stream of block references and
each block's path runs (a count of rows per file, never the rows themselves), cuts it into the
source's parts (a Parquet file's row groups by the row counts in its footer; a tar or a JSON
lines file whole) and hands each part's slices to a tokenize actor. The actor puts the part's
rows together, adds each row's position in its file (``row``), and runs the local path from
there (``tokenize_part`` with ``DataSource.read_rows``): the same documents, checks, bad-record
policy, encode batches and shard writer. So the shards are byte-identical to a local run's, and
a part already written is skipped (resume per part).

What Ray Data's reader cannot read (a tar cut short, a corrupt row group, a compressed file cut
short) fails the read: the job stops with one line naming the reader and its cause, keeps the
parts finished, and says how to read the rest with the sources' own readers (``--reader
source``), which report or skip such records one by one (``data.on_bad_record``).
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from mot_core.errors import MotError
from mot_core.plugin_api import NativeFile, NativeRead


@dataclass
class NativeJob:
    """One read to run: ``source``'s ``read``, and for each of its parts the splits to write."""

    source: str
    read: NativeRead
    todo: dict[int, list[str]]

    def files(self) -> list[NativeFile]:
        """The files with a part to write (a Parquet file's finished row groups are read again
        and dropped: Ray Data reads files, not row groups)."""
        return [f for f in self.read.files if any(part in self.todo for part in f.parts)]


def plan_native(exp, tasks: list) -> tuple[list[NativeJob], list]:
    """The reads that cover ``tasks`` (``PartTask``s), and the tasks no read covers (read by the
    sources' own readers). A read the two splits share is run once."""
    wanted: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
    for task in tasks:
        wanted[(task.source, task.part)].append(task.split)
    jobs: list[NativeJob] = []
    covered: set[tuple[str, str, int]] = set()
    for name in dict.fromkeys(task.source for task in tasks):
        source = exp.sources[name]
        for split in ("train", "val"):
            for read in source.native_reads(split):
                job = next((j for j in jobs if j.source == name and j.read == read), None)
                if job is None:
                    job = NativeJob(name, read, {})
                    jobs.append(job)
                for part in (p for f in read.files for p in f.parts):
                    if split in wanted.get((name, part), ()) and (name, split, part) not in covered:
                        job.todo.setdefault(part, []).append(split)
                        covered.add((name, split, part))
    jobs = [job for job in jobs if job.todo]
    rest = [task for task in tasks if (task.source, task.split, task.part) not in covered]
    return jobs, rest


def ray_dataset(read: NativeRead, files: list[NativeFile], **reader_args):
    """The Ray Data dataset of ``files`` (some of ``read``'s): its reader with the source's
    options, each row's ``path``, only the source's columns, and the files' own extensions
    (Ray Data skips a file whose extension it does not expect)."""
    import ray.data

    reader = getattr(ray.data, read.reader)
    extensions = sorted({os.path.basename(f.path).rsplit(".", 1)[-1] for f in files})
    dataset = reader([f.path for f in files], filesystem=read.filesystem, include_paths=True,
                     file_extensions=extensions, **reader_args, **read.options)
    return dataset.select_columns([*read.columns, "path"]) if read.columns else dataset


def _path_runs(block) -> list[tuple[str, int]]:
    """(path, rows) runs of a block's ``path`` column, in order (a remote task: the block stays
    where it is)."""
    paths = block["path"].tolist() if hasattr(block, "iloc") else block.column("path").to_pylist()
    runs: list[list] = []
    for path in paths:
        if runs and runs[-1][0] == path:
            runs[-1][1] += 1
        else:
            runs.append([path, 1])
    return [(path, count) for path, count in runs]


class _Stream:
    """Cuts the ordered stream of (block, path runs) into parts; ``complete`` gives each part
    once all its rows have come (a file whole once a later file starts, or the stream ends)."""

    def __init__(self, job: NativeJob):
        self.job = job
        self.files = {f.path: f for f in job.files()}
        self.index = {path: index for index, path in enumerate(self.files)}  # file order
        self.position = collections.Counter()  # rows seen per file
        # each part's slices so far: (block ref, start, stop, position in its file of start)
        self.parts: dict[int, list[tuple[Any, int, int, int]]] = collections.defaultdict(list)
        self.current: str | None = None
        self.dispatched: set[int] = set()

    def _part_at(self, file: NativeFile, position: int) -> tuple[int, int]:
        """(part, rows left in it) of the row at ``position``."""
        if file.part_rows is None:
            return file.first_part, -1
        end = 0
        for index, rows in enumerate(file.part_rows):
            end += rows
            if position < end:
                return file.first_part + index, end - position
        raise MotError(f"dataset '{self.job.source}': Ray Data's {self.job.read.reader} gave more rows of {file.path} "
                       f"than its footer lists ({sum(file.part_rows)}); the file changed while it was read: run the "
                       "command again")

    def add(self, ref, runs: list[tuple[str, int]]) -> list[int]:
        """Take one block's runs; returns the parts now complete."""
        done, start = [], 0
        for path, count in runs:
            file = self.files.get(path)
            if file is None:
                raise MotError(f"dataset '{self.job.source}': Ray Data's {self.job.read.reader} gave rows of '{path}', "
                               f"which is not one of the files asked for ({len(self.files)}, e.g. "
                               f"'{next(iter(self.files))}')")
            if path != self.current:
                if self.current is not None and self.index[path] < self.index[self.current]:
                    raise MotError(f"dataset '{self.job.source}': Ray Data's {self.job.read.reader} gave the rows of "
                                   f"'{path}' out of file order; shards would not match a local run's (nothing of "
                                   "this read is written)")
                if self.current is not None and self.files[self.current].part_rows is None:
                    done.append(self.files[self.current].first_part)  # a file read whole: complete
                self.current = path
            while count:
                part, left = self._part_at(file, self.position[path])
                take = count if left < 0 else min(count, left)
                self.parts[part].append((ref, start, start + take, self.position[path]))
                self.position[path] += take
                start, count = start + take, count - take
                if left >= 0 and take == left:
                    done.append(part)
        return done

    def close(self) -> list[int]:
        """The end of the stream: every part not yet complete (the last file's, and the parts
        of files Ray Data gave no rows for: empty, or read by the source's reader)."""
        for path, file in self.files.items():
            if file.part_rows is not None and self.position[path] != sum(file.part_rows):
                raise MotError(f"dataset '{self.job.source}': Ray Data's {self.job.read.reader} gave "
                               f"{self.position[path]} rows of {path}, its footer lists {sum(file.part_rows)}; the "
                               "file changed while it was read: run the command again")
        return [p for p in self.job.todo if p not in self.dispatched]


def run_native(jobs: list[NativeJob], actors: list, read_cpus: float,
               report: Callable[[str], None] = print) -> tuple[dict, list[str], set]:
    """Run each read, the parts written by ``actors`` (``_NativePartWriter`` handles) as they
    complete; ``report`` gets a line per read done. Returns ({PartTask: shard records}, errors,
    the writers' nodes)."""
    import ray
    import ray.data

    from mot_core.experiment.tokenize import PartTask

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # blocks in file order: what puts parts back together
    runs_of = ray.remote(num_cpus=0)(_path_runs)
    shards: dict = {}
    errors: list[str] = []
    nodes: set = set()
    in_flight: dict = {}  # result ref -> (task, slices: kept alive until written)
    load = collections.Counter()
    limit = 2 * len(actors)

    def collect(block: bool) -> None:
        if not in_flight:
            return
        ready, _ = ray.wait(list(in_flight), num_returns=1 if block else len(in_flight), timeout=None if block else 0)
        for ref in ready:
            task, _, actor = in_flight.pop(ref)
            load[actor] -= 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the actor died (out of memory, its node lost): not the reader
                errors.append(f"the tokenize actor writing {task.source}/{task.split} part {task.part} failed "
                              f"({_last_line(exc)}); the parts finished are kept: run the command again")
                continue
            nodes.add(result["node"])
            if result["error"]:
                errors.append(result["error"])
            else:
                shards[task] = json.loads(result["shards"])

    def dispatch(job: NativeJob, stream: _Stream, part: int) -> None:
        stream.dispatched.add(part)
        slices = stream.parts.pop(part, [])
        for split in job.todo.get(part, []):
            while len(in_flight) >= limit:
                collect(block=True)
            actor = min(range(len(actors)), key=lambda a: load[a])
            task = PartTask(job.source, split, part)
            ref = actors[actor].write_rows.remote(job.source, split, part, slices)
            in_flight[ref] = (task, slices, actor)
            load[actor] += 1

    for job in jobs:
        files = job.files()
        stream = _Stream(job)
        try:
            dataset = ray_dataset(job.read, files, num_cpus=read_cpus)
            pending: collections.deque = collections.deque()  # (block, its path runs): runs computed ahead

            def advance() -> None:
                ref, runs = pending.popleft()
                for part in stream.add(ref, ray.get(runs)):
                    dispatch(job, stream, part)

            for bundle in dataset.iter_internal_ref_bundles():
                for ref in bundle.block_refs:
                    pending.append((ref, runs_of.remote(ref)))
                while len(pending) > 8:
                    advance()
                collect(block=False)
                if errors:
                    break
            else:
                while pending and not errors:
                    advance()
                if not errors:
                    for part in stream.close():
                        dispatch(job, stream, part)
        except MotError:
            while in_flight:
                collect(block=True)
            raise
        except Exception as exc:  # noqa: BLE001 - whatever Ray Data raised for a file it could not read
            while in_flight:
                collect(block=True)
            raise MotError(f"dataset '{job.source}': Ray Data's {job.read.reader} could not read its files "
                           f"({_last_line(exc)}); the parts finished are kept: run the command again with --reader "
                           "source, which reads the rest with the source's own reader (it names the record, and "
                           "data.on_bad_record=skip leaves it out)") from None
        while in_flight:  # the read's parts written before it is reported
            collect(block=True)
        if errors:
            break
        parts = sum(f.num_parts for f in files)
        report(f"dataset '{job.source}': {len(files)} file{'s' * (len(files) != 1)} ({parts} "
               f"part{'s' * (parts != 1)}) read with Ray Data's {job.read.reader}")
    return shards, errors, nodes


def rows_of(blocks: list, slices: list):
    """One ``pyarrow.Table`` of the slices' rows, with ``row``: each row's position in its file.
    A pandas block (``read_webdataset`` gives those) is converted, its NaN (a member a sample
    lacks) made null."""
    import pyarrow as pa

    tables = []
    for block, (_, start, stop, first) in zip(blocks, slices):
        if not isinstance(block, pa.Table):
            block = pa.Table.from_pandas(block.astype(object).where(block.notna(), None), preserve_index=False)
        table = block.slice(start, stop - start)
        tables.append(table.append_column("row", pa.array(range(first, first + stop - start), pa.int64())))
    return pa.concat_tables(tables, promote_options="default")


class RayPartReader:
    """The rows Ray Data's reader gives for one part, cut as a tokenize job cuts them (``mot
    plugins check``: ``read_rows`` of those rows must give ``read_part``'s documents). Starts a
    local Ray instance on first use; ``close`` stops it."""

    def __init__(self):
        self.started = False

    def __call__(self, read: NativeRead, part: int):
        """A ``pyarrow.Table`` of part ``part``'s rows (with ``path`` and ``row``), or None where
        Ray Data gave none (a tokenize job then reads that part with the source's reader)."""
        import logging

        import ray
        import ray.data

        if not ray.is_initialized():
            logging.getLogger("ray").setLevel(logging.ERROR)  # a check's report, not Ray's start-up and plans
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            self.started = True
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        ray.data.DataContext.get_current().enable_progress_bars = False
        file = next(f for f in read.files if part in f.parts)
        job = NativeJob("check", NativeRead(read.reader, (file,), read.filesystem, read.options), {part: ["train"]})
        stream = _Stream(job)
        dataset = ray_dataset(read, [file])
        for bundle in dataset.iter_internal_ref_bundles():
            for ref in bundle.block_refs:
                stream.add(ref, _path_runs(ray.get(ref)))
        stream.close()
        slices = stream.parts.get(part)
        return rows_of(ray.get([ref for ref, *_ in slices]), slices) if slices else None

    def close(self) -> None:
        import ray

        if self.started:
            ray.shutdown()
            self.started = False


def _last_line(exc: BaseException) -> str:
    """The cause of a Ray error in one line: the innermost exception's type and the first line
    of its message (Ray adds its retry notes after it)."""
    cause, seen = exc, set()
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if inner is None:
            break
        cause = inner
    first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
    return f"{type(cause).__name__}: {first}"[:300] if first else type(cause).__name__
