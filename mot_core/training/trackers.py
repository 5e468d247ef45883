"""Experiment trackers: every record of ``metrics.jsonl`` also sent to TensorBoard, Weights &
Biases or MLflow (``train.loggers``), and the run's figures at its end.

``metrics.jsonl`` stays the record the framework reads back (resume, ``mot compare``); a tracker
is a copy of it in another tool. Each library is an optional extra, imported only when a run
asks for it; ``check_trackers`` reports a missing one in one line before anything in the run
folder is written.

**No duplicate steps after a resume, no gaps.** A resumed run recomputes the steps after its
checkpoint, some of which the crashed run had already sent (their values are bit-identical:
resume is exact; only the wall-clock figures ``tokens_per_s`` and ``step_time_s`` differ, and the
trackers keep the first attempt's). So each tracker records in ``<run.dir>/trackers.json``
(rewritten atomically: a temp file, then ``os.replace``) the last step it holds, and skips the
steps up to it. A step is recorded there only after the tracker has flushed it, so a kill at any
instant may at worst leave a step unrecorded that the tool has (sent once more on resume: one
duplicate, at most), never a recorded step that it lacks (W&B cannot flush: on resume its last
step is read from what it holds, see ``WandbTracker``). On opening, a tracker behind the
resumed step (added on resume, or stopped by an error) is first backfilled from
``metrics.jsonl``, which then holds exactly the records up to that step: every tool ends with
every step of the run once.

``trackers.json``: ``{tracker: {"last_step": int, "run_id": str (wandb, mlflow), "images": {tag:
step}, "config_sha": str (tensorboard)}}``. W&B and MLflow runs are created once and their ids
stored there, so a resumed run continues the same W&B / MLflow run.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from mot_core.config import RunConfig, dump_config
from mot_core.errors import MotError

# logger name -> the modules it imports (mot-framework's extra of the same name installs them)
REQUIRES = {
    "tensorboard": ("tensorboard", "torch.utils.tensorboard"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
}
STATE_FILE = "trackers.json"


class Tracker(Protocol):
    """What the training loop calls. ``scalars``: metric name -> finite or non-finite float;
    ``png_path``: an image file; ``error``: the exception that ends the run, if one does."""

    name: str

    def log(self, step: int, scalars: dict[str, float]) -> bool: ...

    def log_image(self, step: int, tag: str, png_path: Path) -> bool: ...

    def close(self, error: BaseException | None = None) -> None: ...


def check_trackers(loggers: list[str]) -> None:
    """A one-line ``MotError`` for the first requested tracker whose package does not import;
    called before the run folder is touched."""
    for name in dict.fromkeys(loggers):
        for module in REQUIRES.get(name, ()):
            try:
                importlib.import_module(module)
            except ImportError:
                raise MotError(f"train.loggers has {name} but the {name} package is not installed: "
                               f"pip install 'mot-framework[{name}]'") from None
            except Exception as exc:  # noqa: BLE001 - a broken install: name it, in one line
                detail = (str(exc).strip().splitlines() or ["no message"])[0]
                raise MotError(f"train.loggers has {name} but importing {module} fails ({type(exc).__name__}: "
                               f"{detail}): reinstall it: pip install --force-reinstall 'mot-framework[{name}]'") from None


class TrackerState:
    """``<run.dir>/trackers.json``, read once and rewritten whole (temp file + ``os.replace``,
    so a crash leaves the old or the new file, never a torn one)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            raise MotError(f"{path} is not valid JSON (edited by hand?); delete it to start the trackers' runs "
                           "anew (they are backfilled from metrics.jsonl)") from None
        if not isinstance(self.data, dict):
            raise MotError(f"{path} holds {type(self.data).__name__}, not an object; delete it to start the "
                           "trackers' runs anew")

    def entry(self, name: str) -> dict:
        return self.data.setdefault(name, {})

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


class _Base(abc.ABC):
    """Step bookkeeping shared by the trackers; subclasses send (``_log``, ``_image``), flush
    and close."""

    name = ""

    def __init__(self, state: TrackerState):
        self.state = state
        self.entry = state.entry(self.name)

    @property
    def last_step(self) -> int:
        return int(self.entry.get("last_step", -1))

    def log(self, step: int, scalars: dict[str, float]) -> bool:
        """Send one record unless this tracker already holds its step; True when sent. The
        step is recorded in the state (saved by the caller once the tracker is flushed)."""
        if step <= self.last_step:
            return False
        self._log(step, scalars)
        self.entry["last_step"] = step
        return True

    def log_image(self, step: int, tag: str, png_path: Path) -> bool:
        images = self.entry.setdefault("images", {})
        if step <= images.get(tag, -1):
            return False
        self._image(step, tag, Path(png_path))
        images[tag] = step
        return True

    @abc.abstractmethod
    def _log(self, step: int, scalars: dict[str, float]) -> None:
        """Send one record's scalars at ``step``."""

    @abc.abstractmethod
    def _image(self, step: int, tag: str, path: Path) -> None:
        """Send the PNG at ``path`` as image ``tag`` at ``step``."""

    def flush(self) -> None:
        """Make what was sent durable before its step is recorded (see the module docstring)."""

    def close(self, error: BaseException | None = None) -> None:
        """Flush and release; ``error``: the exception that ends the run, if one does."""


def wait_for_a_later_event_file_second(log_dir: Path) -> None:
    """Return once the clock's whole second is past every event file's in ``log_dir``.

    An event file is named ``events.out.tfevents.<whole seconds>.<host>.<pid>...`` and
    TensorBoard reads a folder's files in name order. A start that follows the one before within
    the same second (a fast resume after a kill) would otherwise sort by process id, maybe before
    it, and its steps would come first and read as a restart going back."""
    import time

    seconds = [int(name.split(".")[3]) for name in (p.name for p in log_dir.glob("events.out.tfevents.*"))
               if name.split(".")[3].isdigit()]
    newest = max(seconds, default=0)
    while int(time.time()) <= newest:
        time.sleep(0.05)


class TensorBoardTracker(_Base):
    """Scalars with ``add_scalar`` (TensorBoard stores them as float32), the run config as text
    (``add_hparams`` would need final metrics), figures with ``add_image``; event files in
    ``<run.dir>/tensorboard`` (each start adds one; TensorBoard reads them as one run).

    Every event goes at a step no lower than those already written: TensorBoard's reader takes
    a step going back for a restarted run and drops every later event. So the config (on the
    first start, and again when a resume changed it) is written with the first record this
    start sends, at its step, saying from which step it is in effect."""

    name = "tensorboard"

    def __init__(self, state: TrackerState, run_dir: Path, config_yaml: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(state)
        log_dir = run_dir / "tensorboard"
        wait_for_a_later_event_file_second(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.config_yaml, self.start_step = config_yaml, start_step
        self.config_sha = hashlib.sha256(config_yaml.encode()).hexdigest()

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        digest = self.config_sha
        if self.entry.get("config_sha") != digest:  # first start, or settings changed on resume
            lines = [f"in effect from step {self.start_step + 1}", "", *("    " + line for line in self.config_yaml.splitlines())]
            self.writer.add_text("config", "\n".join(lines), global_step=step)  # the YAML as a Markdown code block
            self.entry["config_sha"] = digest
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)

    def _image(self, step: int, tag: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        self.writer.add_image(tag, pixels, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self, error: BaseException | None = None) -> None:
        self.writer.close()


def wandb_transaction_log(data: bytes):
    """The records (serialized ``wandb_internal_pb2.Record``) of a W&B run file
    (``run-<id>.wandb``), up to the first damaged or missing byte.

    The format is LevelDB's log, which W&B keeps as its transaction log: a 7-byte header
    (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
    (CRC-32 of its type byte and data, data length, type: 1 whole record, 2 first, 3 middle, 4
    last piece of one). The tail a killed process left half-written is not a record."""
    import struct
    import zlib

    if len(data) < 7 or struct.unpack("<4sHB", data[:7]) != (b":W&B", 0xBEE1, 0):
        return
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # too short for a chunk header: padding
            position += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        if kind == 0 and length == 0:  # zeros: the rest of the block is padding
            position += left
            continue
        if kind not in (1, 2, 3, 4) or len(chunk) < length \
                or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            return
        position += 7 + length
        pending += chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def wandb_offline_last_step(folder: Path, run_id: str) -> int | None:
    """The last history step the offline W&B run ``run_id`` holds in its files under
    ``folder``/wandb (every start of the run writes one); -1 if none; None when there is no
    file, or its records cannot be read (another wandb's format)."""
    try:
        from wandb.proto import wandb_internal_pb2
    except ImportError:
        return None
    files = sorted(folder.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))
    if not files:
        return None
    last = -1
    try:
        for file in files:
            for data in wandb_transaction_log(file.read_bytes()):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(data)
                if record.WhichOneof("record_type") == "history":
                    last = max(last, record.history.step.num)
    except Exception:  # noqa: BLE001 - a format this code does not know: trust trackers.json
        return None
    return last


class WandbTracker(_Base):
    """A W&B run (offline by default: written under ``tracker.wandb_dir``/wandb, uploaded by
    ``wandb sync``); its id is created by the first start and reused with ``resume="allow"``,
    so every start of the run writes to the same W&B run. Console capture is off: the
    framework's own output is left as it is.

    W&B has no flush: its service process writes the run file every 15 s and when the run
    finishes, which an exception or Ctrl-C does (``close``), but a trainer killed outright
    (SIGKILL, SIGTERM, out of memory) takes the unwritten rows with it, rows trackers.json
    already counts. So on resume the last step is what W&B really holds: read from the run's
    files offline, W&B's own resumed step online (``starting_step``); the steps after it are
    sent again from metrics.jsonl."""

    name = "wandb"

    def __init__(self, state: TrackerState, run_dir: Path, config: RunConfig, config_dict: dict):
        import wandb

        super().__init__(state)
        cfg = config.train.tracker
        folder = Path(cfg.wandb_dir) if cfg.wandb_dir else run_dir
        folder.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        run_id = self.entry.get("run_id")
        held = wandb_offline_last_step(folder, run_id) if run_id and cfg.wandb_mode == "offline" else None
        try:
            self.run = wandb.init(
                project=cfg.project, name=cfg.name or run_dir.resolve().name, id=self.entry.get("run_id"),
                resume="allow", mode=cfg.wandb_mode, dir=str(folder), config=config_dict,
                settings=wandb.Settings(console="off", quiet=True),
            )
        except Exception as exc:  # noqa: BLE001 - not logged in, no network, a bad project name
            detail = (str(exc).strip().splitlines() or ["no message"])[0]
            raise MotError(f"train.loggers has wandb but wandb.init failed ({type(exc).__name__}: {detail}); "
                           "check train.tracker (wandb_mode: offline needs no account)") from None
        self.entry["run_id"] = self.run.id
        if cfg.wandb_mode == "online" and run_id and self.run.starting_step:
            held = self.run.starting_step - 1
        if held is not None and held < self.last_step:
            holds = "no step" if held < 0 else f"steps up to {held}"
            print(f"W&B run {run_id} holds {holds} of the {self.last_step} sent (the trainer was stopped before W&B "
                  "wrote the rest); the missing ones are sent again from metrics.jsonl")
            self.entry["last_step"] = held

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def _image(self, step: int, tag: str, path: Path) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self, error: BaseException | None = None) -> None:
        self.run.finish(exit_code=0 if error is None else 130 if isinstance(error, KeyboardInterrupt) else 1)


def mlflow_key(name: str) -> str:
    """A metric or parameter name MLflow accepts on every platform: alphanumerics, ``_ - . /``
    and spaces (others become ``_``), no empty or ``..`` path part, at most 250 characters.
    Every name the framework logs (``loss/text``, ``val/text/loss``, ``share/source/wiki``)
    is kept as it is."""
    cleaned = re.sub(r"[^/\w.\- ]", "_", name)
    parts = [("_" if part in ("", ".", "..") else part) for part in cleaned.split("/")]
    return "/".join(parts)[:250]


def mlflow_names(keys) -> dict[str, str]:
    """Record keys -> MLflow metric names (``mlflow_key``). A name that is also the folder of
    other names of the record gets ``/total`` appended: the file store keeps each metric in a
    file named after it, so ``loss`` (the weighted total) next to ``loss/text`` would be both a
    file and a folder. ``loss`` -> ``loss/total``; every other key is kept."""
    names = {key: mlflow_key(key) for key in keys}
    folders = {name.rsplit("/", i)[0] for name in names.values() for i in range(1, name.count("/") + 1)}
    return {key: f"{name}/total" if name in folders else name for key, name in names.items()}


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """A nested config -> {"train.lr": "0.003", ...}: MLflow params are flat strings."""
    if isinstance(node, dict) and node:
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = json.dumps(node) if isinstance(node, (list, dict)) else str(node)
    return {prefix.rstrip("."): text}


def _file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri


class MlflowTracker(_Base):
    """An MLflow run through ``MlflowClient`` (no global active run): experiment
    ``tracker.project``, created by the first start, its id stored and reopened on resume. The
    flattened config is logged as params (values cut to MLflow's 6,000 characters, 100 per
    request); a setting changed on resume cannot overwrite its param (MLflow forbids it) and is
    logged as the tag ``resumed_at_<step>.<key>`` instead. Metric names are the record's keys
    (``mlflow_names``: the total ``loss`` is ``loss/total``). Figures are artifacts under
    ``figures/``.

    The default store is a folder, ``<run.dir>/mlruns`` (``mlflow ui --backend-store-uri
    <run.dir>/mlruns``). MLflow 3 keeps its file store in maintenance mode and refuses it
    unless ``MLFLOW_ALLOW_FILE_STORE`` is set; this tracker sets it for file stores only (it
    keeps a value you set). A database or server store: ``train.tracker.mlflow_tracking_uri``."""

    name = "mlflow"

    def __init__(self, state: TrackerState, run_dir: Path, config: RunConfig, config_dict: dict, start_step: int):
        super().__init__(state)
        cfg = config.train.tracker
        uri = cfg.mlflow_tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if _file_store(uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = self._open_run(cfg, run_dir, uri, MlflowException)
            self._log_params(flatten(config_dict), start_step)
        except MlflowException as exc:
            detail = (str(exc).strip().splitlines() or ["no message"])[0]
            raise MotError(f"train.loggers has mlflow but the tracking store {uri} refused the run: {detail}") from None

    def _open_run(self, cfg, run_dir: Path, uri: str, MlflowException) -> str:
        run_id = self.entry.get("run_id")
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException:  # the store moved or was deleted: a new run, backfilled below
                print(f"MLflow run {run_id} of {self.state.path} is not in {uri}; starting a new MLflow run there "
                      "(filled from metrics.jsonl)")
                self.entry.clear()
        experiment = self.client.get_experiment_by_name(cfg.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.project)
        run = self.client.create_run(experiment_id, run_name=cfg.name or run_dir.resolve().name,
                                     tags={"mot.run_dir": str(run_dir.resolve())})
        self.entry["run_id"] = run.info.run_id
        self.state.save()  # the id outlives a crash during the first steps
        return run.info.run_id

    def _log_params(self, params: dict[str, str], start_step: int) -> None:
        from mlflow.entities import Param, RunTag

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
        except ImportError:  # moved in some release: MLflow's documented limits
            MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH = 6000, 100
        params = {mlflow_key(k): v[:MAX_PARAM_VAL_LENGTH] for k, v in params.items()}
        held = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in held]
        changed = [RunTag(mlflow_key(f"resumed_at_{start_step}.{k}"), v) for k, v in params.items()
                   if k in held and held[k] != v]
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start:start + MAX_PARAMS_TAGS_PER_BATCH])
        for start in range(0, len(changed), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=changed[start:start + MAX_PARAMS_TAGS_PER_BATCH])

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        names = mlflow_names(scalars)
        metrics = [Metric(names[k], v, now, step) for k, v in scalars.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's MAX_METRICS_PER_BATCH
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def _image(self, step: int, tag: str, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="figures")

    def close(self, error: BaseException | None = None) -> None:
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self.client.set_terminated(self.run_id, status=status)


class Trackers(list):
    """The run's trackers (empty on workers other than the main one, or with ``loggers:
    [jsonl]``). ``log`` takes a ``metrics.jsonl`` record; a tracker that fails while the run
    trains is reported in one line and dropped for the rest of the run (training goes on;
    ``metrics.jsonl`` has every record, and the next start backfills the tracker from it)."""

    def __init__(self, trackers: list, state: TrackerState | None):
        super().__init__(trackers)
        self.state = state

    @staticmethod
    def scalars(record: dict) -> dict[str, float]:
        """A ``metrics.jsonl`` record's numbers, ``step`` excepted (bools are not metrics)."""
        return {key: float(value) for key, value in record.items()
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}

    def log(self, record: dict) -> None:
        step, scalars = int(record["step"]), self.scalars(record)
        sent = [tracker for tracker in list(self) if self._guard(tracker, "log", tracker.log, step, scalars)]
        for tracker in sent:
            self._guard(tracker, "flush", tracker.flush)
        if sent:
            self.state.save()

    def log_images(self, step: int, figures: dict[str, Path]) -> None:
        """Send the run's figures (tag -> PNG file) at ``step``, each once per tracker."""
        sent = []
        for tracker in list(self):
            for tag, path in figures.items():
                if tracker in self and self._guard(tracker, "image", tracker.log_image, step, tag, path):
                    sent.append(tracker)
        for tracker in dict.fromkeys(sent):
            self._guard(tracker, "flush", tracker.flush)
        if sent:
            self.state.save()

    def backfill(self, records: list[dict]) -> None:
        """Send the records each tracker lacks (``metrics.jsonl``'s, up to the resumed step)."""
        behind = [t for t in self if records and t.last_step < records[-1]["step"]]
        if not behind:
            return
        first = min(t.last_step for t in behind)
        print(f"trackers: sending {sum(1 for r in records if r['step'] > first)} record(s) of metrics.jsonl missing "
              f"from {', '.join(t.name for t in behind)}")
        for record in records:
            self.log(record)

    def close(self, error: BaseException | None = None) -> None:
        for tracker in list(self):
            self._guard(tracker, "close", tracker.close, error)
        if self.state is not None:
            self.state.save()
        self.clear()

    def _guard(self, tracker, what: str, call, *args) -> bool:
        try:
            return bool(call(*args))
        except Exception as exc:  # noqa: BLE001 - a tracker's failure must not end the training
            detail = (str(exc).strip().splitlines() or ["no message"])[0]
            print(f"{tracker.name} tracker failed ({what}: {type(exc).__name__}: {detail}); it stops here for this "
                  "run, metrics.jsonl has every record and the next start of the run fills it in")
            if tracker in self:
                self.remove(tracker)
            return False


def read_records(path: Path) -> list[dict]:
    """``metrics.jsonl``'s records in step order (unreadable lines skipped: MetricsLog has
    already dropped those a crash cut short)."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return sorted(records, key=lambda r: r["step"])


def open_trackers(config: RunConfig, run_dir: Path, resume_step: int, main: bool) -> Trackers:
    """The trackers of ``train.loggers`` (jsonl aside: ``MetricsLog`` writes it), opened on the
    main process only and backfilled from ``<run.dir>/metrics.jsonl`` (call this after
    ``MetricsLog`` has cut that file at ``resume_step``). The run config sent is
    ``<run.dir>/config.yaml`` (what runs, plugin options filled in)."""
    names = [n for n in dict.fromkeys(config.train.loggers) if n != "jsonl"]
    if not main or not names:
        return Trackers([], None)
    check_trackers(names)
    saved = run_dir / "config.yaml"
    config_yaml = saved.read_text() if saved.is_file() else dump_config(config)
    config_dict = yaml.safe_load(config_yaml) or {}
    state = TrackerState(run_dir / STATE_FILE)
    trackers = Trackers([], state)
    try:
        for name in names:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(state, run_dir, config_yaml, resume_step))
            elif name == "wandb":
                trackers.append(WandbTracker(state, run_dir, config, config_dict))
            elif name == "mlflow":
                trackers.append(MlflowTracker(state, run_dir, config, config_dict, resume_step))
        state.save()
        trackers.backfill([r for r in read_records(run_dir / "metrics.jsonl") if r["step"] <= resume_step])
    except BaseException as exc:
        trackers.close(exc)
        raise
    return trackers
