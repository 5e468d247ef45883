"""``mot data tokenize --address``: the tokenize job as a Ray Data job on a cluster.

Each part of each source's split is one row of a Ray Data dataset; ``map_batches`` runs a
class UDF that builds the run (its plugins, and the tokenizers the driver fitted and saved)
once per actor and writes that part's shards straight into ``data.dir`` (a shared folder or
an object store). The driver then writes the indexes. The same ``tokenize_part`` runs in
``mot train``'s process when there is no cluster, so both write the same shards.
"""

from __future__ import annotations

import json

import yaml

from mot_core.config import RunConfig
from mot_core.errors import MotError
from mot_core.experiment.build import build_experiment
from mot_core.experiment.resolve import resolve_config
from mot_core.experiment.tokenize import PartTask, fingerprints, finish, plan, prepare_vocabulary, tokenize_part


class _TokenizeParts:
    """Ray Data UDF: one actor holds one built run; each row is a part to tokenize."""

    def __init__(self, config: dict):
        # the driver's resolved config is the record of its shapes: nothing is read again here
        self.exp = build_experiment(resolve_config(config, saved=yaml.safe_dump(config)))
        # loads what the driver fitted and checked against the data: nothing is refitted or probed here
        self.vocab = prepare_vocabulary(self.exp, check_fitted_on=False)
        self.prints = fingerprints(self.exp, self.vocab)

    def __call__(self, rows: dict) -> dict:
        out = {"source": [], "split": [], "part": [], "shards": [], "error": []}
        for source, split, part in zip(rows["source"], rows["split"], rows["part"]):
            task = PartTask(str(source), str(split), int(part))
            try:
                shards, error = tokenize_part(self.exp, self.vocab, task, self.prints[task.source]), ""
            except MotError as exc:  # reported by the driver as one line, not a Ray traceback
                shards, error = [], str(exc)
            out["source"].append(task.source)
            out["split"].append(task.split)
            out["part"].append(task.part)
            out["shards"].append(json.dumps(shards))
            out["error"].append(error)
        return out


def tokenize_on_ray(config: RunConfig, address: str, force: bool = False, concurrency: int | None = None) -> dict:
    """Fit (or reload) tokenizers here, then tokenize every missing part on the cluster at
    ``address`` (``local`` starts a Ray instance on this machine); returns a report per split."""
    import ray
    import ray.data

    from mot_core.distributed.launch import check_address

    check_address(address)
    exp = build_experiment(config)
    vocab = prepare_vocabulary(exp)
    tasks, splits_todo = plan(exp, vocab, force)
    if not tasks:
        return {}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    try:
        workers = concurrency or max(1, min(len(tasks), int(ray.cluster_resources().get("CPU", 1))))
        rows = [{"source": t.source, "split": t.split, "part": t.part} for t in tasks]
        # one block per part, made on the driver: the actors then hold every CPU they ask for
        # without starving a repartition task
        results = (
            ray.data.from_items(rows, override_num_blocks=len(rows))
            .map_batches(_TokenizeParts, fn_constructor_kwargs={"config": config.model_dump(mode="json")},
                         batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
            .take_all()
        )
    finally:
        if started_here:
            ray.shutdown()
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        raise MotError(errors[0])
    shards = {PartTask(r["source"], r["split"], int(r["part"])): json.loads(r["shards"]) for r in results}
    missing = [t for t in tasks if t not in shards]
    if missing:
        raise MotError(f"the Ray Data job returned no result for {missing[0].source}/{missing[0].split} part "
                       f"{missing[0].part}; run the command again (finished shards are kept)")
    return finish(exp, vocab, splits_todo, shards)
