"""What a process on another node needs from the machine that started the run, and the checks
that it has it.

A cluster node holds the installed framework and plugins, not the launching machine's files. A
process there gets:
  - the tokenizers' saved state, sent with the job (``pack_state`` / ``unpack_state``): a node
    that fitted its own tokenizer would write other ids, silently;
  - data through storage both sides reach (an object store, or a shared folder): the driver
    leaves a marker file in ``data.dir`` and every node must see it (``leave_marker`` /
    ``check_marker``), so a node-local folder of the same name is never written by mistake;
  - the files the config names (corpora, pretrained checkpoints, shared tokenizers): every
    local path the driver sees is listed (``named_paths``) and each node checks it sees it too
    (``check_named_paths``), naming the key and the path when it does not.
"""

from __future__ import annotations

import glob
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from mot_core.errors import MotError

MARKER_PREFIX = ".mot-driver-"
STATE_LIMIT = 1 << 30  # bytes of tokenizer state sent with a job (a VQGAN is a few hundred MB)


def this_node() -> str:
    """How errors name the node a process runs on."""
    return f"node {socket.gethostname()} (pid {os.getpid()})"


def _exists(path: str) -> bool:
    """A file or folder, or a glob pattern that matches one."""
    return bool(glob.glob(path)) if glob.has_magic(path) else os.path.exists(path)


def named_paths(config: dict, sections: tuple[str, ...] = ("mixture", "model")) -> list[tuple[str, str]]:
    """(config key, absolute path or pattern) of every string in ``sections`` that names an
    existing local file or folder here (the driver), or a glob pattern matching some: the files
    a node must see as well."""
    found: list[tuple[str, str]] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}.{name}" if key else str(name))
        elif isinstance(value, (list, tuple)):
            for position, item in enumerate(value):
                walk(item, f"{key}[{position}]")
        elif isinstance(value, str) and value and "://" not in value and "\n" not in value and len(value) < 4096:
            try:
                if _exists(value):
                    found.append((key, os.path.abspath(value)))
            except (OSError, ValueError):
                pass

    for section in sections:
        walk(config.get(section), section)
    return found


def check_named_paths(paths: list[tuple[str, str]]) -> None:
    """A one-line error naming the first path the driver saw that this node does not."""
    for key, path in paths:
        if not _exists(path):
            raise MotError(f"{this_node()} cannot see {path} ({key}), a path on the machine that started the job: put "
                           "it where every node reaches it (an object store URI, or a folder shared by every node) and "
                           "name that in the config")


def leave_marker(uri: str) -> str:
    """Write an empty marker file into ``uri`` (a folder or object-store prefix); its URI."""
    from mot_core.data.shards import filesystem

    fs, path = filesystem(uri)
    marker = f"{MARKER_PREFIX}{uuid.uuid4().hex}"
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path.rstrip('/')}/{marker}") as handle:
        handle.write(b"")
    return f"{uri.rstrip('/')}/{marker}"


def remove_marker(marker: str) -> None:
    from mot_core.data.shards import filesystem

    fs, path = filesystem(marker)
    try:
        fs.delete_file(path)
    except OSError:
        pass  # already gone: nothing to clean


def sees(marker: str) -> bool:
    """Whether this node sees the driver's marker (its folder is this node's too)."""
    import pyarrow.fs as pafs

    from mot_core.data.shards import filesystem

    fs, path = filesystem(marker)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError:
        return False


def check_marker(marker: str, key: str) -> None:
    """A one-line error when this node does not see the driver's marker in ``key``'s folder:
    what it wrote there would land on its own disk, where nobody reads it."""
    import pyarrow.fs as pafs

    from mot_core.data.shards import filesystem

    folder = marker.rsplit("/", 1)[0]
    fs, path = filesystem(marker)
    try:
        seen = fs.get_file_info(path).type == pafs.FileType.File
    except OSError as exc:
        raise MotError(f"{this_node()} cannot reach {key} {folder}: {str(exc).splitlines()[0]}") from None
    if not seen:
        raise MotError(f"{this_node()} does not see the driver's {key} {folder} (another folder of that name, or "
                       "none): what it wrote there would be lost; use an object store URI (s3://...) or a folder "
                       "shared by every node")


def pack_state(modalities: dict) -> dict[str, dict[str, bytes]]:
    """Every modality's saved tokenizer state as {modality: {relative path: bytes}}."""
    packed: dict[str, dict[str, bytes]] = {}
    total = 0
    for name, modality in modalities.items():
        folder = Path(modality.state_dir)
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        packed[name] = {}
        for file in files:
            data = file.read_bytes()
            total += len(data)
            packed[name][str(file.relative_to(folder))] = data
    if total > STATE_LIMIT:
        raise MotError(f"the tokenizers' saved state is {total >> 20} MiB, more than a job carries "
                       f"({STATE_LIMIT >> 20} MiB); keep it in a folder every node reaches and name it in the modality's "
                       "options")
    return packed


def unpack_state(packed: dict[str, dict[str, bytes]], run_dir: Path) -> None:
    """Write what ``pack_state`` read into ``run_dir/state/<modality>/`` on this node."""
    for name, files in packed.items():
        for relative, data in files.items():
            target = run_dir / "state" / name / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
