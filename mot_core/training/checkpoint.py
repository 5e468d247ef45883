"""Checkpoints: safetensors weights + everything needed to resume bit-for-bit.

Layout of ``<run_dir>/checkpoints/step_0000100/``:
    model.safetensors   weights
    trainer.pt          optimizer, scheduler, data-stream position, RNG states
    config.yaml         the resolved run config
    meta.json           step and model args

A checkpoint is written to a temporary folder, flushed to disk, and renamed into place, so a
crash at any instant leaves either the previous checkpoints alone or the new one complete.
``meta.json`` is written last and records a SHA-256 of every other file: a checkpoint damaged
later (a torn copy, a bad disk) is recognised, reported in one line, and the run falls back to
the newest intact one. Leftovers of an interrupted save are ignored and cleaned.
"""

from __future__ import annotations

from collections.abc import Mapping

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mot_core.errors import MotError
from mot_core.training import storage

PREFIX = "step_"
_COMPLETE = re.compile(rf"^{PREFIX}(\d+)$")
CHECKSUMMED = ("model.safetensors", "trainer.pt", "config.yaml")


def storage_error(exc: BaseException, path: Path, doing: str) -> MotError:
    """One line naming the path and the cause of a failed write: no space (torch reports a full
    disk as a bare "file write failed"), a read-only file system, or missing permission."""
    code = getattr(exc, "errno", None)
    target = getattr(exc, "filename", None) or path
    # the error code first: a read-only file system also reports no free space
    if code == errno.EROFS:
        return MotError(f"cannot write {target} while {doing}: the file system is read-only; the run folder must be "
                        "writable to train (remount it read-write or use another run.dir)")
    if code in (errno.EACCES, errno.EPERM):
        return MotError(f"cannot write {target} while {doing}: {exc.strerror} (no permission); the run folder must "
                        "be writable to train")
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        free = None
    if code == errno.ENOSPC or (free is not None and free < 64 << 20):
        room = f" ({free >> 20} MiB free)" if free is not None else ""
        return MotError(f"no space left on the device of {path} while {doing}{room}; free space or use another run.dir")
    detail = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
    return MotError(f"writing {path} failed while {doing}: {detail}")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (``step_NNNNNNN`` with a meta.json), oldest first; leftovers of an
    interrupted save (``*.tmp*``, ``*.old*``) are not checkpoints."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _COMPLETE.match(p.name) and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(_COMPLETE.match(p.name).group(1)))


# The sharded checkpoints other ways of training keep in a run folder (when their storage is
# the run folder itself): `mot train --process-group`'s, and `mot launch`'s default storage.
OTHER_LAYOUTS = (("distributed_checkpoints", "`mot train --process-group`"), ("ray/{name}", "`mot launch`"))


def newest_of_other_layouts(run_dir: Path) -> tuple[int, str] | None:
    """(step, who) of the newest intact checkpoint another way of training left in ``run_dir``
    (intact as that way of training counts it: every worker's files whole), or None."""
    newest = None
    for folder, who in OTHER_LAYOUTS:
        root, _, name = str(run_dir / folder.format(name=run_dir.resolve().name)).rpartition("/")
        found = storage.intact_checkpoints(root, name) if Path(root, name).is_dir() else []
        if found and (newest is None or found[-1][0] > newest[0]):
            newest = (found[-1][0], who)
    return newest


def step_of(path: Path) -> int:
    """The step of a ``mot train`` checkpoint folder, from its name."""
    return int(_COMPLETE.match(path.name).group(1))


def clean_leftovers(run_dir: Path) -> list[str]:
    """Remove what an interrupted save left behind; returns their names."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        if path.name.startswith(PREFIX) and not _COMPLETE.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return sorted(removed)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()


def unchecksummed(path: Path) -> bool:
    """A checkpoint written before checksums existed (its files can only be checked for presence)."""
    try:
        return "sha256" not in json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False


def damage(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted, or None if it is intact. Checkpoints
    written before checksums existed are checked for their files only."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        return f"meta.json unreadable ({exc})"
    if not isinstance(meta, dict) or "step" not in meta:
        return "meta.json has no step"
    if "meta_sha256" in meta and _json_digest({k: v for k, v in meta.items() if k != "meta_sha256"}) != meta["meta_sha256"]:
        return "meta.json does not match its checksum"
    for name in CHECKSUMMED:
        if not (path / name).is_file():
            return f"{name} missing"
        expected = meta.get("sha256", {}).get(name)
        if expected is not None and _sha256(path / name) != expected:
            return f"{name} does not match its checksum"
    return None


def latest_intact(run_dir: Path, report=print) -> Path | None:
    """The newest checkpoint that is intact. Every damaged newer one is reported through
    ``report`` (one line each), never skipped silently; when checkpoints exist but none is
    intact, a one-line ``MotError`` says what to delete."""
    found = list_checkpoints(run_dir)
    damaged = []
    for path in reversed(found):
        reason = damage(path)
        if reason is None:
            for bad, why in damaged:
                report(f"checkpoint {bad} is damaged ({why}); using {path.name} instead")
            if unchecksummed(path):
                report(f"checkpoint {path} has no checksums (written by an earlier version): its files could only be "
                       "checked for presence")
            return path
        damaged.append((path.name, reason))
    if damaged:
        listing = "; ".join(f"{name}: {why}" for name, why in damaged)
        raise MotError(f"no intact checkpoint in {run_dir / 'checkpoints'} ({listing}); delete those folders to start over")
    return None


def newest_saved_config(run_dir: Path) -> str | None:
    """The config.yaml of the newest checkpoint whose meta.json and config.yaml are intact, or
    None. Its weights are not read: what a run resumes as (its shape, its data) is the same in
    every checkpoint of it, and hashing gigabytes to read one small file would be wasted."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            meta = json.loads((path / "meta.json").read_text())
            expected = meta.get("sha256", {}).get("config.yaml") if isinstance(meta, dict) else None
            if expected is None or _sha256(path / "config.yaml") == expected:
                return (path / "config.yaml").read_text()
        except (OSError, ValueError, AttributeError):
            continue
    return None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module | dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    config_yaml: str,
    model_args: Any,
    keep: int,
) -> Path:
    """``model``: the module, or its full state dict (gathered from shards)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    weights = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise MotError(f"not saving step {step}: weights hold NaN or inf ({', '.join(bad[:3])}); the last checkpoint is kept")
    try:
        return _write_checkpoint(tmp, final, run_dir, step, state, trainer_state, config_yaml, model_args, keep)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error(exc, tmp, f"saving the checkpoint of step {step} (the previous one is kept)") from None


def _write_checkpoint(tmp: Path, final: Path, run_dir: Path, step: int, state: dict, trainer_state: dict,
                      config_yaml: str, model_args: Any, keep: int) -> Path:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"))
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    for name in CHECKSUMMED:
        _fsync(tmp / name)
    meta = {"step": step, "model_args": dataclasses.asdict(model_args),
            "sha256": {name: _sha256(tmp / name) for name in CHECKSUMMED}}
    meta["meta_sha256"] = _json_digest(meta)  # meta.json checks itself too
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _fsync(tmp / "meta.json")
    if final.exists():  # the same step saved again: move the old one aside, never delete first
        old = final.with_name(f"{final.name}.old{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise MotError(f"not a checkpoint (no meta.json): {path}")
    try:
        return json.loads(meta_file.read_text())
    except ValueError as exc:
        raise MotError(f"checkpoint {path} is damaged: meta.json is not JSON ({exc})") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    file = path / "model.safetensors"
    if not file.is_file():
        raise MotError(f"checkpoint has no model.safetensors: {path}")
    return load_file(str(file))


class LazyWeights(Mapping):
    """A checkpoint's ``model.safetensors`` read one tensor at a time from the memory-mapped
    file: a warm start holds one tensor beyond the model, never the whole checkpoint."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        file = path / "model.safetensors"
        if not file.is_file():
            raise MotError(f"checkpoint has no model.safetensors: {path}")
        self._handle = safe_open(str(file), framework="pt")
        self._keys = list(self._handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._keys:
            raise KeyError(name)
        return self._handle.get_tensor(name)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(name).get_shape())


def load_trainer_state(path: Path) -> dict[str, Any]:
    # weights_only=False: the state holds RNG byte tensors and plain Python containers we wrote.
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)


def check_compatible(saved_args: dict[str, Any], current_args: Any, where: Path) -> None:
    current = json.loads(json.dumps(dataclasses.asdict(current_args)))
    # A field added after a checkpoint was written takes its default, the behaviour it had then.
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(current_args)
                                      if f.default is not dataclasses.MISSING}))
    saved = {**{k: v for k, v in defaults.items() if k not in saved_args}, **saved_args}
    diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise MotError(
            f"checkpoint {where} was trained with a different model ({'; '.join(diffs[:3])}); "
            "use a new run.dir or the original settings"
        )


class RunLock:
    """One trainer per run folder: an exclusive ``flock`` on ``<run_dir>/train.lock`` holding
    the owner's pid. The kernel releases it when the process dies, so a lock file left by a
    dead trainer is taken over (with a message); a live owner is a one-line ``MotError``."""

    def __init__(self, run_dir: Path, report=print):
        import fcntl

        self.path = run_dir / "train.lock"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.handle = self.path.open("a+")
        except OSError as exc:
            raise storage_error(exc, self.path, "locking the run folder") from None
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "another process"
            self.handle.close()
            raise MotError(f"{run_dir} is being trained by {owner}; wait for it, stop it, or use another run.dir") from None
        self.handle.seek(0)
        previous = self.handle.read().strip()
        if previous:
            report(f"taking over {self.path} from {previous}, which is no longer running")
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()}")
        self.handle.flush()

    def release(self) -> None:
        import fcntl

        if self.handle.closed:
            return
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.flush()
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
