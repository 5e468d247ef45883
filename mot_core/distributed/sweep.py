"""``mot sweep``: trials of ``mot train`` as Ray Tune trials, locally or on a cluster.

A sweep is a grid (dotted config key -> values; every combination is a trial), named variants
(sets of settings tried as one more axis: the tower grid dense / MoE-4x / MoT) and repeats
(``samples``, seed = run.seed + repeat). Every trial is planned and validated before anything
runs, and is an ordinary run folder, ``<out>/trials/<name>``, that ``mot eval``, ``mot
compare`` and ``mot train`` read.

Resume: the plan is written to ``<out>/sweep.json``; running the same command again restores
Ray Tune's experiment (``Tuner.restore``): finished and early-stopped trials are kept, the
unfinished ones start again and ``mot train`` continues each from its own last checkpoint
(exact, as any resumed run).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mot_core import filesystems
from mot_core.config import RunConfig, SweepSection, load_raw_config, validate_section
from mot_core.errors import MotError
from mot_core.experiment.build import Experiment, build_experiment
from mot_core.experiment.resolve import resolve_config
from mot_core.runs.start import local_saved_config, start_run, train_locally
from mot_core.training.run_mirror import RunMirror, mirror_of
from mot_core.training.runtime import Reporter, local_runtime
from mot_core.training.trackers import read_records


@dataclass(frozen=True)
class Trial:
    """One run of the sweep: its folder name, the settings it changes, and what the table shows."""

    name: str
    settings: dict[str, Any]  # dotted key -> value, applied over the base config
    values: dict[str, Any]  # column -> value: the swept keys, "variant", "repeat"


@dataclass(frozen=True)
class SweepPlan:
    """``out``: the sweep's folder here; ``uri``: the sweep's folder on an object store, whose
    working copy ``out`` is (each trial a run folder of its own in the store, Ray Tune's state
    in ``<uri>/tune``), or None."""
    out: Path
    sweep: SweepSection
    metric: str
    trials: list[Trial]
    configs: dict[str, dict]  # trial name -> its validated config, as a dict
    uri: str | None = None

    @property
    def shown(self) -> str:
        """Where the sweep is, as the user named it."""
        return self.uri or str(self.out)

    def root_mirror(self) -> RunMirror | None:
        """The sweep's own files in the store (sweep.json, the results): not its trials, not Tune's."""
        return RunMirror(self.uri, self.out, not_copied=("trials", "tune")) if self.uri else None

    def trial_dir(self, name: str) -> str:
        """A trial's ``run.dir``."""
        return filesystems.join(self.uri, "trials", name) if self.uri else str(self.out / "trials" / name)

    def pull_trial_files(self) -> None:
        """The trials' metrics and figures into their working copies (no checkpoint)."""
        if self.uri:
            for trial in self.trials:
                RunMirror(self.trial_dir(trial.name)).pull(checkpoints=False)


def split_values(text: str) -> list[str]:
    """``a,b,[1,2],{x: 1}`` -> ["a", "b", "[1,2]", "{x: 1}"]: commas inside brackets stay."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _scalar(text: str) -> Any:
    """A YAML value, with 1e-3 read as a number (YAML 1.1 wants 1.0e-3; the config's own
    loader, OmegaConf, reads both)."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``--grid key=v1,v2`` arguments -> key -> values (YAML scalars: 1e-3, true, [1, 2])."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise MotError(f"--grid {item!r}: expected key=value1,value2 (e.g. --grid train.lr=1e-3,3e-3)")
        try:
            grid[key.strip()] = [_scalar(v) for v in split_values(values)]
        except yaml.YAMLError as exc:
            raise MotError(f"--grid {item!r}: a value is not YAML ({str(exc).splitlines()[0]})") from None
    return grid


def _set(data: dict, key: str, value: Any) -> None:
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise MotError(f"sweep key '{key}': '{part}' is not a section")
        node = child
    node[leaf] = copy.deepcopy(value)


def _is_config_key(key: str) -> bool:
    """True when ``key`` names a setting of the run config, or lies inside a free-form dict
    (plugin ``options``), which the plugin validates when the trial is built."""
    import typing

    def model_of(annotation):
        """The section class inside ``annotation`` (``X``, ``X | None``), or None."""
        if hasattr(annotation, "model_fields"):
            return annotation
        return next((a for a in typing.get_args(annotation) if hasattr(a, "model_fields")), None)

    annotation: Any = RunConfig
    parts = key.split(".")
    i = 0
    while i < len(parts):
        if typing.get_origin(annotation) is dict:  # a name (modality, dataset) or a free key
            value = typing.get_args(annotation)[1]
            if model_of(value) is None:
                return True  # plugin options: the plugin's own model checks them
            annotation, i = value, i + 1
            continue
        model = model_of(annotation)
        if model is None:
            return False  # a key below a plain setting
        if parts[i] not in model.model_fields:
            return False
        annotation, i = model.model_fields[parts[i]].annotation, i + 1
    return True


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "-", text).rstrip("-")
    if not text.startswith("-"):  # a negative number keeps its sign
        slug = slug.lstrip("-")
    return slug[:40] or "x"


# The metrics a trial logs, that a sweep can rank by: the training losses (``loss``, the weighted
# total, and ``loss/<modality>``), every modality's ``val/<modality>/loss`` and its evaluators'
# ``val/<modality>/<name>``. Evaluators name their metrics in what ``compute()`` returns, so those
# names come from a dry run: each evaluator of the trial's experiment, fed one synthetic
# validation pass over every id of its modality (all positions valid, loss 1), then computed.
# Most evaluators run on the modality as built; one that needs the fitted tokenizer (text's
# bits per byte reads each token's bytes) gets the modality prepared in a scratch folder, as the
# trial would prepare it first. Nothing is written in the sweep's folder.

def _base_metrics(modalities: list[str]) -> list[str]:
    return ["loss", *(f"loss/{m}" for m in modalities), *(f"val/{m}/loss" for m in modalities)]


def _dry_run(exp: Experiment, name: str, modality) -> list[str]:
    """The metric names ``compute()`` of ``name``'s evaluators returns after a synthetic pass
    (without the modality prefix; ``loss`` is the engine's). Raises whatever an evaluator or an
    unprepared modality raises."""
    size = max(1, min(int(modality.vocab_size), 1 << 16))
    losses, valid, targets = torch.ones(size), torch.ones(size, dtype=torch.bool), torch.arange(size)
    names: list[str] = []
    for cls in exp.evaluators[name]:
        evaluator = cls(modality, exp.evaluator_options.get((name, cls.name)))
        evaluator.update(losses, valid, targets)
        names += [key for key in evaluator.compute() if key != "loss" and key not in names]
    return names


def _prepared_modality(exp: Experiment, name: str, scratch: Path):
    """``name``'s modality with its tokenizer prepared in ``scratch`` (fitted on the sample the
    trial fits on, or loaded where its options name a saved one)."""
    from mot_core.errors import plugin_boundary
    from mot_core.experiment.tokenize import sample_documents
    from mot_core.plugin_api import origin

    fresh = build_experiment(exp.config, run_dir=scratch)
    modality = fresh.modalities[name]
    limit = exp.config.data.fit_sample_documents

    def payloads():
        for source_name, source in fresh.sources.items():
            for doc in sample_documents(source_name, source, "train", limit):
                yield from (seg.payload for seg in doc.segments if seg.modality == name)

    with plugin_boundary(f"{origin(modality)}: modality '{name}', prepare"):
        modality.prepare(payloads())
    return modality


class LoggedMetrics:
    """The metric names the planned trials log, found as a check needs them (dry runs cached
    per modality settings)."""

    def __init__(self, trials: list[tuple[str, Experiment]]):
        self.trials = trials
        self._evaluated: dict[str, list[str] | None] = {}

    def modalities(self) -> list[str]:
        return list(dict.fromkeys(m for _, exp in self.trials for m in exp.modalities))

    def evaluator_metrics(self, name: str) -> list[str]:
        """``val/<name>/<metric>`` of every trial's evaluators of modality ``name``."""
        found: list[str] = []
        for trial, exp in self.trials:
            if name not in exp.modalities:
                continue
            key = json.dumps([name, exp.plugin_options.get(f"mixture.modalities.{name}.options"),
                              [cls.name for cls in exp.evaluators[name]],
                              {k[1]: v.model_dump(mode="json") for k, v in exp.evaluator_options.items()
                               if k[0] == name and v is not None}], sort_keys=True, default=str)
            if key not in self._evaluated:
                self._evaluated[key] = self._evaluate(trial, exp, name)
            found += [f"val/{name}/{m}" for m in self._evaluated[key] or [] if f"val/{name}/{m}" not in found]
        return found

    def _evaluate(self, trial: str, exp: Experiment, name: str) -> list[str]:
        try:
            return _dry_run(exp, name, exp.modalities[name])
        except Exception:  # the modality must be prepared first (its tokenizer): as the trial would
            pass
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mot_sweep_metrics_") as scratch:
            modality = _prepared_modality(exp, name, Path(scratch))
            try:
                return _dry_run(exp, name, modality)
            except MotError:
                raise
            except Exception as exc:
                raise MotError(f"trial {trial}: the evaluators of modality '{name}' cannot name their metrics "
                               f"(a dry run of compute() raised {type(exc).__name__}: {exc}); rank by "
                               f"val/{name}/loss") from None

    def logged(self) -> list[str]:
        names = self.modalities()
        return [*_base_metrics(names), *(m for name in names for m in self.evaluator_metrics(name))]


def check_metric(metric: str, logged: LoggedMetrics) -> None:
    """A one-line MotError, before any trial runs, for a metric no trial logs (the list of
    those they log with it)."""
    modalities = logged.modalities()
    if metric in _base_metrics(modalities):
        return
    parts = metric.split("/")
    if len(parts) == 3 and parts[0] == "val" and parts[1] in modalities and \
            metric in logged.evaluator_metrics(parts[1]):
        return
    raise MotError(f"sweep.metric '{metric}' is not logged by any trial; they log {', '.join(logged.logged())}")


def plan_sweep(config_path: str, overrides: list[str], grid_items: list[str], out: str | None,
               samples: int | None = None, scheduler: str | None = None, metric: str | None = None) -> SweepPlan:
    """Every trial planned and validated (its config and its plugins' options) before anything
    runs; one-line errors name the trial."""
    raw = load_raw_config(config_path, overrides)
    section = dict(raw.pop("sweep", None) or {})
    section["grid"] = {**(section.get("grid") or {}), **parse_grid(grid_items)}
    for key, value in (("samples", samples), ("scheduler", scheduler), ("metric", metric)):
        if value is not None:
            section[key] = value
    sweep: SweepSection = validate_section(SweepSection, section, "sweep")
    for key, values in sweep.grid.items():
        if not _is_config_key(key):
            raise MotError(f"sweep grid key '{key}' is not a config key")
        if not values:
            raise MotError(f"sweep grid key '{key}' has no values")
        if key.startswith("sweep.") or key == "run.dir":
            raise MotError(f"sweep grid key '{key}' cannot be swept (each trial has its own run.dir)")
    for name, settings in sweep.variants.items():
        for key in settings:
            if not _is_config_key(key):
                raise MotError(f"sweep variant '{name}': '{key}' is not a config key")
    try:
        base = resolve_config(raw)
    except MotError as exc:
        raise MotError(f"the sweep's base config: {exc}") from None
    where = out or base.run.dir
    uri = where if mirror_of(where) is not None else None
    if uri is not None:
        filesystems.check_reachable(uri, "--out" if out else "run.dir")
    root = filesystems.local_folder(where).resolve()
    modalities = list(base.mixture.modalities)
    chosen = sweep.metric or f"val/{modalities[0]}/loss"

    if sweep.scheduler == "asha" and sweep.grace_steps >= base.train.steps:
        raise MotError(f"sweep.grace_steps={sweep.grace_steps} is not below train.steps={base.train.steps}: asha could "
                       "never stop a trial; lower sweep.grace_steps")
    keys = list(sweep.grid)
    variants = list(sweep.variants.items()) or [(None, {})]
    trials, configs, experiments = [], {}, []
    for index, (combo, (variant, settings), repeat) in enumerate(
            itertools.product(itertools.product(*sweep.grid.values()), variants, range(sweep.samples))):
        values = dict(zip(keys, combo))
        label = [f"{k.split('.')[-1]}={_slug(v)}" for k, v in values.items()]
        if variant is not None:
            label.insert(0, _slug(variant))
        if sweep.samples > 1:
            label.append(f"r{repeat}")
        name = f"t{index:03d}_" + "_".join(label) if label else f"t{index:03d}"
        data = copy.deepcopy(raw)
        for key, value in {**settings, **values}.items():
            _set(data, key, value)
        _set(data, "run.dir", filesystems.join(uri, "trials", name) if uri else str(root / "trials" / name))
        _set(data, "run.seed", base.run.seed + repeat)
        shown = {**({"variant": variant} if variant is not None else {}), **values,
                 **({"repeat": repeat} if sweep.samples > 1 else {})}
        try:  # the front door, as `mot train` of the trial's own folder resolves it
            config = resolve_config(data, saved=local_saved_config)
            exp = build_experiment(config)  # plugin options, losses, evaluators
        except MotError as exc:
            raise MotError(f"trial {name} ({shown}): {str(exc).removeprefix('config error: ')}") from None
        trials.append(Trial(name, {**settings, **values}, shown))
        configs[name] = config.model_dump(mode="json")
        experiments.append((name, exp))
    check_metric(chosen, LoggedMetrics(experiments))
    return SweepPlan(root, sweep, chosen, trials, configs, uri)


def _check_same_plan(plan: SweepPlan) -> None:
    mirror = plan.root_mirror()
    if mirror is not None:
        mirror.pull(checkpoints=False)
    record = plan.out / "sweep.json"
    wanted = {"trials": [asdict(t) for t in plan.trials], "metric": plan.metric,
              "scheduler": plan.sweep.scheduler}
    if record.is_file():
        try:
            saved = json.loads(record.read_text())
        except ValueError:
            saved = None
        if saved != json.loads(json.dumps(wanted)):
            raise MotError(f"{plan.shown} holds a sweep with other trials or settings (sweep.json); use the same "
                           "command to finish it, or another --out")
        return
    plan.out.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(wanted, indent=2))
    os.replace(tmp, record)
    if mirror is not None:
        mirror.push()


class TuneReports(Reporter):
    """A trial's metrics to Ray Tune: every logged step and every checkpointed one, with the
    newest validation metrics carried forward, from the first report that holds the sweep's
    metric on (a scheduler needs it in every report)."""

    def __init__(self, metric: str):
        self.metric = metric
        self.latest_validation: dict[str, float] = {}

    def report(self, record: dict) -> None:
        from ray import tune

        self.latest_validation.update({k: v for k, v in record.items() if k.startswith("val/")})
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
        merged = {**self.latest_validation, **scalars}
        if self.metric in merged:
            tune.report(merged)

    def saved(self, record: dict) -> None:
        self.report(record)


def _trial(params: dict, configs: dict, cwd: str, threads: int, metric: str) -> None:
    """A Tune trainable: the trial's ``mot train``, resumed from its own checkpoint if it has one
    (on a node that does not hold the sweep's folder, from its run folder in the object store)."""
    import ray

    if os.path.isdir(cwd):  # relative data and tokenizer paths mean what they meant where the sweep started
        os.chdir(cwd)
    print(f"trial {params['trial']} on Ray node {ray.get_runtime_context().get_node_id()}", flush=True)
    torch.set_num_threads(threads)
    train_locally(trial_config(configs, params["trial"]), TuneReports(metric))


def trial_config(configs: dict[str, dict], name: str) -> RunConfig:
    """The config a trial runs: its planned config through the front door, as `mot train` of
    the trial's own folder resolves it."""
    return resolve_config(configs[name], saved=local_saved_config)


def _prepare_data(plan: SweepPlan) -> None:
    """Every unfinished trial started here without its loop, one after the other, before any
    trial trains: its refusals checked, its tokenizers fitted and its sources tokenized, so
    trials that share a ``data.dir`` never race to write the same shards, and a trial's first
    step is not delayed by its data."""
    plan.pull_trial_files()
    for trial in plan.trials:
        config = trial_config(plan.configs, trial.name)
        local = filesystems.local_folder(config.run.dir)
        if any(r["step"] == config.train.steps for r in read_records(local / "metrics.jsonl")):
            continue
        start_run(config, local_runtime(torch.device("cpu"), config.run.dir), execute=lambda run, runtime: {})


def run_sweep(plan: SweepPlan, address: str | None) -> list[str]:
    """Run (or finish) the sweep's trials on Ray Tune. Returns the trials left unfinished by an
    interruption (Ctrl-C: Ray Tune stops the trials, saves its state and returns), which the
    same command resumes; empty when every trial finished or was stopped by the scheduler."""
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    _check_same_plan(plan)
    _prepare_data(plan)
    sweep = plan.sweep
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    try:
        resources = {"cpu": sweep.cpus_per_trial, **({"gpu": sweep.gpus_per_trial} if sweep.gpus_per_trial else {})}
        trainable = tune.with_resources(
            tune.with_parameters(_trial, configs=plan.configs, cwd=os.getcwd(),
                                 threads=max(1, int(sweep.cpus_per_trial)), metric=plan.metric), resources)
        stops = plan.out / STOPPED_RECORD
        scheduler = FIFOScheduler() if sweep.scheduler == "fifo" else _asha_class()(
            str(stops), time_attr="step", grace_period=sweep.grace_steps,
            max_t=max(c["train"]["steps"] for c in plan.configs.values()))
        # Tune's state beside the trials: in the store for a sweep there (every node reaches it)
        storage_filesystem, storage = (filesystems.resolve(plan.uri, "--out") if plan.uri else (None, str(plan.out)))
        state = f"{storage.rstrip('/')}/tune"
        if tune.Tuner.can_restore(state, storage_filesystem=storage_filesystem):
            print(f"resuming the sweep in {plan.shown}: finished trials are kept, unfinished ones continue from their "
                  "checkpoints", flush=True)
            tuner = tune.Tuner.restore(state, trainable, resume_unfinished=True, resume_errored=True,
                                       restart_errored=False, storage_filesystem=storage_filesystem)
        else:
            stops.unlink(missing_ok=True)  # Tune starts afresh: so do the scheduler's decisions
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search([t.name for t in plan.trials])},
                tune_config=tune.TuneConfig(metric=plan.metric, mode=sweep.mode, scheduler=scheduler,
                                            max_concurrent_trials=sweep.max_concurrent or None),
                run_config=tune.RunConfig(name="tune", storage_path=storage, storage_filesystem=storage_filesystem,
                                          verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        results = tuner.fit()
        failed = [r for r in results if r.error is not None]
        if failed:
            from mot_core.distributed.launch import _root_cause

            name = (failed[0].config or {}).get("trial", "?")
            raise MotError(f"{len(failed)} trial(s) failed; {name}: {_root_cause(failed[0].error)} (run the same "
                           "command again to retry them)")
        return _unfinished(plan)
    finally:
        if started_here:
            ray.shutdown()


# A trial left short of its steps was stopped by ASHA or by an interruption (Ctrl-C: Ray Tune
# stops every trial, marks it TERMINATED as it marks ASHA's, saves its state and returns). ASHA's
# decisions are recorded as it makes them, in the sweep's folder (they hold across resumes), so
# the two are told apart: the table says "stopped at step N" only of what the scheduler stopped.
STOPPED_RECORD = "stopped_early.json"


def stopped_early(plan: SweepPlan) -> set[str]:
    """The trials the scheduler stopped (``STOPPED_RECORD``)."""
    try:
        return set(json.loads((plan.out / STOPPED_RECORD).read_text()))
    except (OSError, ValueError):
        return set()


def _record_stop(record: Path, trial: str | None) -> None:
    try:
        stopped = set(json.loads(record.read_text()))
    except (OSError, ValueError):
        stopped = set()
    if trial is None or trial in stopped:
        return
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(stopped | {trial})))
    os.replace(tmp, record)


def _recording_asha() -> type:
    """``RecordingASHA``: Ray Tune's ASHA, recording each trial it stops short of ``max_t`` in
    ``record`` (``STOPPED_RECORD``). Made on first use (``__getattr__`` below), so importing this
    module does not import Ray Tune, and found by name when Tune unpickles a restored sweep."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        def __init__(self, record: str, **kwargs):
            super().__init__(**kwargs)
            self.record = record

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP and result.get("step", 0) < self._max_t:
                _record_stop(Path(self.record), (trial.config or {}).get("trial"))
            return decision

    RecordingASHA.__module__, RecordingASHA.__qualname__ = __name__, "RecordingASHA"
    return RecordingASHA


def _asha_class() -> type:
    cls = globals().get("RecordingASHA")
    if cls is None:
        cls = globals()["RecordingASHA"] = _recording_asha()
    return cls


def __getattr__(name: str):
    if name == "RecordingASHA":
        return _asha_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ran_to_the_end(plan: SweepPlan, name: str) -> bool:
    records = read_records(plan.out / "trials" / name / "metrics.jsonl")
    return any(r.get("step") == plan.configs[name]["train"]["steps"] for r in records)


def _unfinished(plan: SweepPlan) -> list[str]:
    """The trials short of their steps that the scheduler did not stop: those an interruption
    left, in the plan's order (Tune returned without an error)."""
    plan.pull_trial_files()
    stopped = stopped_early(plan)
    return [t.name for t in plan.trials if t.name not in stopped and not _ran_to_the_end(plan, t.name)]


def read_results(plan: SweepPlan, interrupted: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """One row per trial from its own metrics.jsonl (the record of what ran), best first by the
    sweep's metric; a trial that never logged it sorts last. ``interrupted``: the trials an
    interruption left unfinished (``run_sweep``), told apart from those the scheduler stopped."""
    rows = []
    plan.pull_trial_files()
    for trial in plan.trials:
        run = plan.out / "trials" / trial.name
        file = run / "metrics.jsonl"
        records = read_records(file)
        steps = max((r.get("step", 0) for r in records), default=0)
        total = plan.configs[trial.name]["train"]["steps"]
        final = next((r for r in reversed(records) if any(k.startswith("val/") for k in r)), {})
        losses = {k: v for k, v in final.items() if k.startswith("val/") and k.endswith("/loss")}
        score = next((r[plan.metric] for r in reversed(records) if plan.metric in r), None)
        rows.append({"trial": trial.name, "run": plan.trial_dir(trial.name), "values": trial.values, "steps": steps,
                     "status": "finished" if steps >= total else "not run" if not steps else (
                         "interrupted" if trial.name in interrupted else "stopped early"),
                     "metric": score, "val_losses": losses, "val_step": final.get("step")})
    sign = 1 if plan.sweep.mode == "min" else -1
    return sorted(rows, key=lambda r: (r["metric"] is None, sign * (r["metric"] or 0.0)))
