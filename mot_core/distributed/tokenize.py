"""``mot data tokenize --address``: the tokenize job as a Ray Data job on a cluster.

First the parts whose files Ray Data's own readers read (``native_read``: Parquet, WebDataset
tars, JSON lines), their rows handed to ``_NativePartWriter`` actors. Then every other part as
one row of a Ray Data dataset; ``map_batches`` runs a class UDF that builds the run once per
actor and writes that part's shards straight into ``data.dir`` (a shared folder or an object
store). The driver then writes the indexes. The same ``tokenize_part`` runs in ``mot train``'s
process when there is no cluster, so every path writes the same shards.

An actor may run on a node that holds none of the driver's files (``experiment.nodes``): it
receives the tokenizers the driver fitted (their saved state, unpacked into a folder of its
own), checks that it sees the driver's ``data.dir`` and every file the config names, and
refuses, in one line, unless its vocabulary and sources have the driver's fingerprints.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import yaml

from mot_core.config import RunConfig
from mot_core.errors import MotError
from mot_core.experiment.build import build_experiment
from mot_core.experiment.resolve import resolve_config
from mot_core.distributed.native_read import rows_of
from mot_core.experiment.nodes import (
    check_marker, check_named_paths, leave_marker, named_paths, pack_state, remove_marker, this_node, unpack_state,
)
from mot_core.experiment.tokenize import (
    PartTask, data_root, fingerprints, finish, plan, prepare_vocabulary, tokenize_part,
)


class _TokenizeParts:
    """Ray Data UDF: one actor holds one built run; each row is a part to tokenize."""

    def __init__(self, config: dict, data_dir: str, marker: str, paths: list, state: dict, expected: dict):
        """``data_dir``: the driver's data root; ``marker``: its marker file there; ``paths``:
        the files the config names, as the driver sees them; ``state``: the tokenizers' saved
        state; ``expected``: each source's fingerprints on the driver."""
        import tempfile

        self.error = ""
        try:
            check_named_paths(paths)
            check_marker(marker, "data.dir")
            own = Path(tempfile.mkdtemp(prefix="mot-tokenize-"))  # this node's copy of the tokenizers
            unpack_state(state, own)
            local = {**config, "run": {**config["run"], "dir": str(own)}, "data": {**config["data"], "dir": data_dir}}
            # the driver's resolved config is the record of its shapes: nothing is read again here
            self.exp = build_experiment(resolve_config(local, saved=yaml.safe_dump(local)))
            # loads what the driver fitted: nothing is refitted or probed here
            self.vocab = prepare_vocabulary(self.exp, check_fitted_on=False)
            self.prints = fingerprints(self.exp, self.vocab)
            self._check_fingerprints(expected)
        except MotError as exc:  # reported by the driver as one line, not a Ray traceback
            self.error = str(exc)

    def _check_fingerprints(self, expected: dict) -> None:
        for source, prints in self.prints.items():
            driver = expected[source]
            if prints.vocabulary != driver["vocabulary"]:
                changed = [m for m, fp in prints.modalities.items() if driver["modalities"].get(m) != fp]
                what = f"modality '{changed[0]}'s tokenizer" if changed else "vocabulary (modalities or id ranges)"
                raise MotError(f"{this_node()} builds another {what} than the driver: its shards would hold other ids; "
                               "the tokenizers' state must reach every node (nothing written)")
            if prints.source != driver["source"]:
                raise MotError(f"{this_node()} reads other data for dataset '{source}' than the driver (its files "
                               "differ or are missing there): every node must read the same files, from an object "
                               "store or a shared folder (nothing written)")

    def __call__(self, rows: dict) -> dict:
        import ray

        out = {"source": [], "split": [], "part": [], "shards": [], "error": [], "node": []}
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "this process"
        for source, split, part in zip(rows["source"], rows["split"], rows["part"]):
            task = PartTask(str(source), str(split), int(part))
            shards, error = [], self.error
            if not error:
                try:
                    shards = tokenize_part(self.exp, self.vocab, task, self.prints[task.source])
                except MotError as exc:  # reported by the driver as one line, not a Ray traceback
                    error = str(exc)
            out["source"].append(task.source)
            out["split"].append(task.split)
            out["part"].append(task.part)
            out["shards"].append(json.dumps(shards))
            out["error"].append(error)
            out["node"].append(node)
        return out


class _NativePartWriter(_TokenizeParts):
    """A Ray actor that writes the parts a Ray Data reader read (``native_read``): one built run
    per actor, as for the parts the sources read themselves."""

    def init_error(self) -> str:
        """Why this actor cannot write (a path its node cannot see, another vocabulary), or ""."""
        return self.error

    def write_rows(self, source: str, split: str, part: int, slices: list) -> dict:
        """Write part ``part`` of ``source``'s ``split`` from ``slices`` ((block, start, stop,
        position in file of start), in file order); a part Ray Data gave no rows for is read by
        the source itself (it finds what is there: nothing, or what Ray Data's reader skips)."""
        import ray

        task = PartTask(source, split, part)
        shards, error = [], self.error
        if not error:
            try:
                rows = rows_of(ray.get([ref for ref, *_ in slices]), slices) if slices else None
                shards = tokenize_part(self.exp, self.vocab, task, self.prints[source], rows=rows)
            except MotError as exc:  # reported by the driver as one line, not a Ray traceback
                error = str(exc)
        return {"shards": json.dumps(shards), "error": error, "node": ray.get_runtime_context().get_node_id()}


def actor_arguments(config: RunConfig, exp, prints: dict) -> dict:
    """What every tokenize actor is built from (``_TokenizeParts``); leaves the marker file in
    ``data.dir`` (removed by the caller)."""
    dumped = config.model_dump(mode="json")
    root = data_root(exp)
    root = root if "://" in root else os.path.abspath(root)
    return {"config": dumped, "data_dir": root, "marker": leave_marker(root), "paths": named_paths(dumped),
            "state": pack_state(exp.modalities), "expected": {n: asdict(p) for n, p in prints.items()}}


def tokenize_on_ray(config: RunConfig, address: str, force: bool = False, concurrency: int | None = None,
                    reader: str = "ray") -> dict:
    """Fit (or reload) tokenizers here, then tokenize every missing part on the cluster at
    ``address`` (``local`` starts a Ray instance on this machine); returns a report per split.

    ``reader``: ``ray`` reads with Ray Data's own readers the files a source lists for them
    (``DataSource.native_reads``: Parquet, WebDataset tars, JSON lines), the rest with the
    sources' readers; ``source`` reads everything with the sources' readers."""
    import ray
    import ray.data

    from mot_core.distributed.launch import check_address
    from mot_core.distributed.native_read import plan_native, run_native

    check_address(address)
    exp = build_experiment(config)
    vocab = prepare_vocabulary(exp)
    prints = fingerprints(exp, vocab)
    tasks, splits_todo = plan(exp, vocab, force, prints=prints)
    if not tasks:
        return {}
    native, own = plan_native(exp, tasks) if reader == "ray" else ([], tasks)
    actor_kwargs = actor_arguments(config, exp, prints)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    shards, errors, nodes = {}, [], set()
    try:
        cpus = float(ray.cluster_resources().get("CPU", 1))
        if native:
            # the writers hold a CPU each; Ray Data's read tasks (I/O, no decoding) share what is left: at
            # least one whole CPU, which read_parquet's listing step asks for (fractional writers that left
            # less deadlocked it)
            writers = concurrency or max(1, min(sum(len(j.todo) for j in native), int(cpus) - 1))
            actor_cpus = 1 if cpus >= 2 else cpus / 2
            actors = [ray.remote(num_cpus=actor_cpus)(_NativePartWriter).remote(**actor_kwargs) for _ in range(writers)]
            try:
                # a node that cannot see a named path says so before anything is read
                errors = [e for e in ray.get([actor.init_error.remote() for actor in actors]) if e]
                if errors:
                    raise MotError(errors[0])
                shards, errors, nodes = run_native(native, actors, read_cpus=min(0.5, cpus / 4),
                                                   report=lambda line: print(line, flush=True))
            finally:
                for actor in actors:
                    ray.kill(actor)
            print(f"tokenized {len(shards)} parts read by Ray Data with {writers} writer{'s' * (writers != 1)} on "
                  f"{len(nodes)} node{'s' * (len(nodes) != 1)}", flush=True)
        if own and not errors:
            workers = concurrency or max(1, min(len(own), int(cpus)))
            rows = [{"source": t.source, "split": t.split, "part": t.part} for t in own]
            # one block per part, made on the driver: the actors then hold every CPU they ask for
            # without starving a repartition task
            results = (
                ray.data.from_items(rows, override_num_blocks=len(rows))
                .map_batches(_TokenizeParts, fn_constructor_kwargs=actor_kwargs,
                             batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
                .take_all()
            )
            nodes = {r["node"] for r in results}
            print(f"tokenized {len(results)} parts read by the sources' own readers with {workers} actors on "
                  f"{len(nodes)} nodes", flush=True)
            errors += [r["error"] for r in results if r["error"]]
            shards.update({PartTask(r["source"], r["split"], int(r["part"])): json.loads(r["shards"])
                           for r in results if not r["error"]})
    finally:
        remove_marker(actor_kwargs["marker"])
        if started_here:
            ray.shutdown()
    if errors:
        raise MotError(errors[0])
    missing = [t for t in tasks if t not in shards]
    if missing:
        raise MotError(f"the Ray Data job returned no result for {missing[0].source}/{missing[0].split} part "
                       f"{missing[0].part}; run the command again (finished shards are kept)")
    return finish(exp, vocab, splits_todo, shards)
