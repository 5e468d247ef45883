"""Checkpoints: safetensors weights + everything needed to resume bit-for-bit.

Layout of ``<run_dir>/checkpoints/step_0000100/``:
    model.safetensors       weights
    trainer.pt              optimizer, scheduler, data-stream position, RNG states
    config.yaml             the resolved run config
    meta.json               step and model args
    optimizer.safetensors   only in the export of a sharded run (``save_streamed_checkpoint``):
                            the AdamW moments, named ``<parameter>.<moment>``; trainer.pt then
                            holds the rest of the optimizer state (step counts, param groups)

``model.safetensors`` and ``optimizer.safetensors`` of an export are written a tensor (or a part
of one) at a time (``StreamedSafetensors``), so no process holds the whole model to write them.

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
import itertools
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from mot_core.errors import MotError
from mot_core.training import storage

PREFIX = "step_"
_COMPLETE = re.compile(rf"^{PREFIX}(\d+)$")
CHECKSUMMED = ("model.safetensors", "trainer.pt", "config.yaml")
OPTIMIZER_FILE = "optimizer.safetensors"


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


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is a complete checkpoint folder's name (``step_NNNNNNN``)."""
    return _COMPLETE.match(name) is not None


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
    sums = meta.get("sha256", {}) if isinstance(meta.get("sha256"), dict) else {}
    for name in [*CHECKSUMMED, *(n for n in sums if n not in CHECKSUMMED)]:  # and an export's optimizer.safetensors
        if not (path / name).is_file():
            return f"{name} missing"
        expected = sums.get(name)
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
    sums = {name: _sha256(tmp / name) for name in CHECKSUMMED}
    return _commit(tmp, final, run_dir, step, dataclasses.asdict(model_args), sums, keep)


def _commit(tmp: Path, final: Path, run_dir: Path, step: int, model_args: dict, sums: dict[str, str],
            keep: int) -> Path:
    """Write meta.json (with the checksums ``sums`` of the other files, already flushed) into
    ``tmp``, rename it into place and drop the checkpoints beyond the newest ``keep``."""
    meta = {"step": step, "model_args": model_args, "sha256": sums}
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


# safetensors' codes for torch dtypes, in the order of its own writer (which puts the tensors of
# the later ones first, so that every tensor's offset is a multiple of its element size)
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.uint64: "U64",
}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES)}


def _finite(block: torch.Tensor) -> bool:
    """No NaN or inf in ``block``, found without a mask of its size: its min and max (which
    propagate NaN) are finite."""
    values = block.reshape(-1) if block.itemsize > 1 else block.reshape(-1).float()  # float8: no aminmax
    low, high = torch.aminmax(values)
    return math.isfinite(float(low)) and math.isfinite(float(high))


class StreamedSafetensors:
    """A safetensors file written a tensor, or a part of a tensor, at a time. The format: an
    8-byte little-endian header length, a JSON header naming every tensor's dtype, shape and
    byte range in the data that follows (padded with spaces to a multiple of 8 bytes), then the
    raw little-endian bytes. The header needs only the dtypes and shapes (``specs``), so it is
    written first; ``write`` puts a tensor, or a block of it at ``offsets``, into its range.
    Tensors are laid out as ``safetensors.torch.save_file`` lays them out (the same file, byte
    for byte, once everything is written).

    The SHA-256 of the file is computed as it is written: bytes that extend the written prefix
    are hashed from memory, bytes written ahead of it (the blocks of a tensor split along a
    later axis arrive out of order) are read back from the file once the prefix reaches them.
    ``names`` is the file's order: writing in it keeps reading back to those out-of-order
    blocks. ``check_finite``: ``nonfinite`` lists the floating-point tensors that hold NaN or inf."""

    def __init__(self, path: Path, specs: Mapping[str, tuple[torch.dtype, Sequence[int]]], check_finite: bool = False):
        for name, (dtype, _) in specs.items():
            if dtype not in _SAFETENSORS_DTYPES:
                raise MotError(f"cannot write {name} to {path.name}: safetensors has no {dtype}")
        self.path, self.check_finite = path, check_finite
        self.names = sorted(specs, key=lambda n: (-_DTYPE_RANK[specs[n][0]], n))
        header, end = {}, 0
        self._regions: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        for name in self.names:
            dtype, shape = specs[name]
            shape = tuple(int(s) for s in shape)
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [end, end + size]}
            self._regions[name] = (end, shape, dtype)
            end += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._data = 8 + len(text)
        self.size = self._data + end
        self._unwritten = {name: math.prod(shape) * dtype.itemsize for name, (_, shape, dtype) in self._regions.items()}
        self.nonfinite: list[str] = []
        self._digest = hashlib.sha256()
        self._hashed = 0  # the file's prefix [0, _hashed) is written and hashed
        self._ahead: dict[int, int] = {}  # start -> end of ranges written past that prefix
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write_at(0, memoryview(struct.pack("<Q", len(text)) + text))

    def __enter__(self) -> "StreamedSafetensors":
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write(self, name: str, tensor: torch.Tensor, offsets: Sequence[int] | None = None) -> None:
        """Write ``tensor``, the block of tensor ``name`` that starts at ``offsets`` (None: the
        whole tensor). Blocks of one tensor must not overlap."""
        start, shape, dtype = self._regions[name]
        offsets = tuple(int(o) for o in offsets) if offsets is not None else (0,) * len(shape)
        sizes = tuple(tensor.shape)
        if tensor.dtype != dtype or len(sizes) != len(shape) or len(offsets) != len(shape) or any(
                o < 0 or o + n > s for o, n, s in zip(offsets, sizes, shape)):
            raise MotError(f"{self.path.name}: a block {list(sizes)} at {list(offsets)} ({tensor.dtype}) does not fit "
                           f"{name} {list(shape)} ({dtype})")
        if tensor.numel() == 0:
            return
        block = tensor.detach().cpu().contiguous()
        if self.check_finite and block.is_floating_point() and name not in self.nonfinite and not _finite(block):
            self.nonfinite.append(name)
        data = memoryview(block.reshape(-1).view(torch.uint8).numpy())
        item = dtype.itemsize
        # the block is contiguous in the file along its axes from `split` on (those after it
        # are whole): one run of bytes for each index of the axes before it
        split = max((axis for axis in range(len(shape)) if sizes[axis] != shape[axis]), default=0)
        strides = [math.prod(shape[axis + 1:]) for axis in range(len(shape))]
        run = (sizes[split] * strides[split] if shape else 1) * item
        for index, outer in enumerate(itertools.product(*(range(n) for n in sizes[:split]))):
            element = sum((o + i) * stride for o, i, stride in zip(offsets, outer, strides))
            element += offsets[split] * strides[split] if shape else 0
            self._write_at(self._data + start + element * item, data[index * run:(index + 1) * run])
        self._unwritten[name] -= block.numel() * item

    def _write_at(self, position: int, data: memoryview) -> None:
        if not len(data):
            return
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], position + done)
        end = position + len(data)
        if position != self._hashed:
            self._ahead[position] = end
            return
        self._digest.update(data)
        self._hashed = end
        while self._hashed in self._ahead:  # read back what was written ahead, now next in line
            end = self._ahead.pop(self._hashed)
            while self._hashed < end:
                chunk = os.pread(self._fd, min(end - self._hashed, 1 << 20), self._hashed)
                if not chunk:
                    raise OSError(errno.EIO, f"{self.path} is shorter than what was written to it")
                self._digest.update(chunk)
                self._hashed += len(chunk)

    def close(self) -> str:
        """Flush the file to disk; returns its SHA-256. Every tensor must have been written whole."""
        missing = [name for name, left in self._unwritten.items() if left]
        if missing or self._hashed != self.size:
            raise MotError(f"{self.path.name}: {missing[0] if missing else 'a range'} was not written whole; the "
                           "checkpoint it was read from is incomplete")
        os.fsync(self._fd)
        self.__exit__()
        return self._digest.hexdigest()


@dataclasses.dataclass
class StreamedTensors:
    """The tensors of one safetensors file of a checkpoint, to be read one at a time: their
    dtypes and shapes (known before any is read) and ``fill``, which reads them, whole or in
    blocks, into the writer it is given (``StreamedSafetensors.write``)."""

    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    fill: Callable[[StreamedSafetensors], None]


def save_streamed_checkpoint(run_dir: Path, step: int, weights: StreamedTensors, moments: StreamedTensors,
                             trainer_state: dict[str, Any], config_yaml: str, model_args: dict, keep: int) -> Path:
    """A checkpoint written from tensors read a block at a time (the export of a sharded run):
    ``model.safetensors`` from ``weights``, ``optimizer.safetensors`` from ``moments`` (named
    ``<parameter>.<moment>``); ``trainer_state["optimizer_by_name"]`` holds the rest of the
    optimizer state (``load_trainer_state`` puts the moments back into it). The same checks,
    checksums and atomic rename as ``save_checkpoint``."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sums = {}
        for name, source in (("model.safetensors", weights), (OPTIMIZER_FILE, moments)):
            with StreamedSafetensors(tmp / name, source.specs, check_finite=source is weights) as writer:
                source.fill(writer)
                sums[name] = writer.close()
            if writer.nonfinite:
                raise MotError(f"not saving step {step}: weights hold NaN or inf ({', '.join(writer.nonfinite[:3])}); "
                               "the last checkpoint is kept")
        torch.save({**trainer_state, "optimizer_tensors": OPTIMIZER_FILE}, tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        for name in ("trainer.pt", "config.yaml"):
            _fsync(tmp / name)
            sums[name] = _sha256(tmp / name)
        return _commit(tmp, final, run_dir, step, model_args, sums, keep)
    except MotError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error(exc, tmp, f"saving the checkpoint of step {step} (the previous one is kept)") from None


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
    """The trainer state of a checkpoint; the AdamW moments of an export (``optimizer.safetensors``)
    are put back into its ``optimizer_by_name``, as an export written before them held them."""
    # weights_only=False: the state holds RNG byte tensors and plain Python containers we wrote.
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    file = state.pop("optimizer_tensors", None)
    if file is not None:
        if not (path / file).is_file():
            raise MotError(f"checkpoint {path} has no {file} (its AdamW moments)")
        moments = state["optimizer_by_name"]["state"]
        for name, tensor in load_file(str(path / file)).items():
            parameter, _, moment = name.rpartition(".")
            moments.setdefault(parameter, {})[moment] = tensor
    return state


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
