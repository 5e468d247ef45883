"""A run folder on an object store (``run.dir: s3://bucket/runs/name``): the process that
starts or reopens the run works in a local copy of it (``filesystems.local_folder``) and keeps
the two in step, so that a run is whole in the store whichever machine trained it.

    pull   before a start or a reopen: the run's files (config, metrics, tokenizers' state,
           trackers, figures) and one checkpoint: the newest intact one, or the one named
    push   after every checkpoint and at the end (a crash included): what changed here, every
           checkpoint's ``meta.json`` last (a folder without it is no checkpoint, so a push cut
           short leaves the previous checkpoint the newest intact one in the store), then the
           store's checkpoints that retention dropped here

Never copied: the shards (``<run.dir>/tokens``, read from the store by every worker), Ray
Train's checkpoints (``<run.dir>/ray``, written to the store by the workers themselves),
``mot train --process-group``'s, the run's lock and an interrupted save's leftovers. A file
the store holds is taken from it when the copy still holds what was last synced; a file only
this copy holds (written since its last push) is kept, and sent by the next push.

One trainer per run folder is held by a lock on the working copy; two machines training the
same store folder at once are not detected (an object store has no lock to take).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Callable

from mot_core import filesystems
from mot_core.errors import MotError
from mot_core.training import checkpoint as ckpt

SYNCED = ".mot-synced.json"  # {relative path: {"local": [size, mtime_ns], "store": [size, mtime_ns]}} at the last sync
NOT_COPIED_FOLDERS = ("tokens", "ray", "distributed_checkpoints")
_LEFTOVER = re.compile(r"\.(tmp|old)\d*")
_CHUNK = 8 << 20


@contextlib.contextmanager
def run_files_synced(run_dir: str):
    """Around a command that writes a run's files without training (``mot data tokenize`` and
    ``mot tokenizer fit`` save the tokenizers' state): for a run folder on an object store, its
    files are pulled first (no checkpoint) and what the command wrote is pushed once it succeeded."""
    mirror = mirror_of(run_dir)
    if mirror is None:
        yield
        return
    mirror.pull(checkpoints=False)
    yield
    mirror.push()


def mirror_of(run_dir: str) -> RunMirror | None:
    """The mirror of ``run.dir`` when it names an object store, else None."""
    if not filesystems.is_uri(run_dir) or run_dir.lower().startswith("file://"):
        return None
    return RunMirror(run_dir)


class RunMirror:
    """``uri``: the run folder in the store; ``local``: its working copy here."""

    def __init__(self, uri: str, local: Path | None = None, not_copied: tuple[str, ...] = ()):
        """``not_copied``: more top-level folders left to the store (a sweep's trials, each a
        run folder of its own, and Ray Tune's state)."""
        self.uri = uri
        self.local = local or filesystems.local_folder(uri)
        self.not_copied = not_copied
        self._fs, self._root = filesystems.resolve(uri, "run.dir")

    # -- what the store holds --------------------------------------------------------------

    def _remote_files(self) -> dict[str, list[int]]:
        """Relative path -> [size, mtime_ns] of every file in the store's run folder that is copied."""
        import pyarrow.fs as pafs

        infos = self._call(lambda: self._fs.get_file_info(pafs.FileSelector(self._root, recursive=True,
                                                                            allow_not_found=True)), "listing")
        prefix = self._root.rstrip("/") + "/"
        return {info.path[len(prefix):]: [info.size, info.mtime_ns or 0] for info in infos
                if info.type == pafs.FileType.File and self._copied(info.path[len(prefix):])}

    def _copied(self, name: str) -> bool:
        return copied(name) and name.split("/")[0] not in self.not_copied

    def newest_saved_config(self) -> str | None:
        """The config.yaml of the store's newest checkpoint, without copying anything (what
        ``mot train`` resolves a resumed config with)."""
        remote = self._remote_files()
        for step in reversed(_checkpoint_steps(remote)):
            name = f"checkpoints/{step}/config.yaml"
            if name in remote:
                return self._read(name).decode()
        return None

    # -- pull ------------------------------------------------------------------------------

    def pull(self, checkpoint: str | None = None, report: Callable[[str], None] = print,
             checkpoints: bool = True) -> Path | None:
        """Copy the run's files and one checkpoint here; returns that checkpoint's folder (None
        when the store holds none). ``checkpoint``: a checkpoint folder's name (``step_0000006``);
        default the newest intact one (a damaged newer one is reported and skipped).
        ``checkpoints=False``: the run's files alone (metrics, figures, config)."""
        remote = self._remote_files()
        synced = self._synced()
        steps = _checkpoint_steps(remote)
        if checkpoint is not None and checkpoint not in steps:
            raise MotError(f"checkpoint not found: {filesystems.join(self.uri, 'checkpoints', checkpoint)}")
        self._drop_stale(remote, synced)
        for name, stamp in remote.items():
            if not name.startswith("checkpoints/"):
                self._fetch(name, stamp, synced)
        candidates = [checkpoint] if checkpoint is not None else list(reversed(steps)) if checkpoints else []
        chosen, damaged = None, []
        for step in candidates:
            for name, stamp in sorted(remote.items(), key=lambda item: item[0].endswith("/meta.json")):
                if name.startswith(f"checkpoints/{step}/"):
                    self._fetch(name, stamp, synced)
            reason = ckpt.damage(self.local / "checkpoints" / step)
            if reason is None or checkpoint is not None:
                chosen = self.local / "checkpoints" / step
                break
            damaged.append((step, reason))
        self._write_synced(synced)
        for step, why in damaged:
            report(f"checkpoint {filesystems.join(self.uri, 'checkpoints', step)} is damaged ({why}); "
                   f"using {chosen.name if chosen else 'none'} instead")
        return chosen

    def _drop_stale(self, remote: dict[str, list[int]], synced: dict[str, dict]) -> None:
        """Files this copy last synced that the store no longer holds (retention there, or the
        folder started over): the store is what the run is."""
        for name in [n for n in synced if n not in remote]:
            path = self.local / name
            if path.is_file() and _same(path, synced[name]["local"]):
                path.unlink()
            del synced[name]
        checkpoints = self.local / "checkpoints"
        if checkpoints.is_dir():
            for folder in checkpoints.iterdir():
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()

    def _fetch(self, name: str, stamp: list[int], synced: dict[str, dict]) -> None:
        path = self.local / name
        if path.is_file():
            if name not in synced or not _same(path, synced[name]["local"]):
                return  # written here since the last sync: newer than the store's, sent by the next push
            if synced[name]["store"] == stamp:
                return  # the store's has not changed either
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.pull{os.getpid()}")

        def copy():
            with self._fs.open_input_stream(f"{self._root}/{name}") as source, open(tmp, "wb") as target:
                while chunk := source.read(_CHUNK):
                    target.write(chunk)

        try:
            self._call(copy, f"reading {name}")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        synced[name] = {"local": _stamp(path), "store": stamp}

    # -- push ------------------------------------------------------------------------------

    def push(self) -> None:
        """Send what changed here since the last sync, each checkpoint's meta.json last; then
        delete the store's checkpoints this copy no longer holds (retention)."""
        if not self.local.is_dir():
            return
        synced = self._synced()
        changed = [name for name in _local_files(self.local) if self._copied(name)
                   if name not in synced or not _same(self.local / name, synced[name]["local"])]
        changed.sort(key=lambda name: (name.startswith("checkpoints/") and name.endswith("/meta.json"), name))
        sent = {}
        for name in changed:
            sent[name] = _stamp(self.local / name)
            self._send(name)
        remote = self._remote_files()
        for name, stamp in sent.items():  # the store's stamps, so that a pull knows them for its own
            synced[name] = {"local": stamp, "store": remote.get(name, [0, 0])}
        self._write_synced(synced)
        kept = {p.name for p in ckpt.list_checkpoints(self.local)}
        for step in _checkpoint_steps(remote):
            if step not in kept and kept and step < max(kept):
                self._call(lambda: self._fs.delete_dir(f"{self._root}/checkpoints/{step}"), f"deleting checkpoints/{step}")
                for name in [n for n in synced if n.startswith(f"checkpoints/{step}/")]:
                    del synced[name]
        self._write_synced(synced)

    def _send(self, name: str) -> None:
        def copy():
            with open(self.local / name, "rb") as source, self._fs.open_output_stream(f"{self._root}/{name}") as target:
                while chunk := source.read(_CHUNK):
                    target.write(chunk)

        self._call(copy, f"writing {name}")

    # -- helpers ---------------------------------------------------------------------------

    def _read(self, name: str) -> bytes:
        def read():
            with self._fs.open_input_stream(f"{self._root}/{name}") as handle:
                return handle.read()

        return self._call(read, f"reading {name}")

    def _call(self, action, doing: str):
        try:
            return action()
        except OSError as exc:
            error = filesystems.describe_error(exc, self.uri, "run.dir")
            raise MotError(f"{error} (while {doing})") from None

    def _synced(self) -> dict[str, dict]:
        try:
            return json.loads((self.local / SYNCED).read_text())
        except (OSError, ValueError):
            return {}

    def _write_synced(self, synced: dict[str, dict]) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        tmp = self.local / f"{SYNCED}.tmp"
        tmp.write_text(json.dumps(synced, sort_keys=True))
        os.replace(tmp, self.local / SYNCED)


def copied(name: str) -> bool:
    """Whether a file (its path relative to the run folder) is kept in step with the store."""
    parts = name.split("/")
    if parts[0] in NOT_COPIED_FOLDERS or name in ("train.lock", SYNCED, f"{SYNCED}.tmp"):
        return False
    if parts[0].startswith(".mot-driver-"):  # `mot launch`'s marker: this machine's, not the run's
        return False
    return not any(_LEFTOVER.search(part) or ".pull" in part for part in parts)


def _checkpoint_steps(remote: dict[str, list[int]]) -> list[str]:
    """The store's checkpoint folders with a meta.json, oldest first."""
    steps = {name.split("/")[1] for name in remote
             if name.startswith("checkpoints/") and name.endswith("/meta.json") and name.count("/") == 2}
    return sorted(s for s in steps if ckpt.is_checkpoint_name(s))


def _local_files(root: Path) -> list[str]:
    names = []
    for folder, subfolders, files in os.walk(root):
        relative = os.path.relpath(folder, root)
        subfolders[:] = [d for d in subfolders if copied(d if relative == "." else f"{relative}/{d}")]
        for file in files:
            name = file if relative == "." else f"{relative}/{file}"
            if copied(name):
                names.append(name.replace(os.sep, "/"))
    return names


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _same(path: Path, stamp: list[int]) -> bool:
    try:
        return _stamp(path) == list(stamp)
    except OSError:
        return False
