"""Checkpoint storage reached by URI: a local or shared folder, or an object store (s3://, gs://),
through pyarrow's file systems (what Ray itself uses), as ``mot_core.filesystems`` resolves
them."""

from __future__ import annotations

import json
import uuid

from mot_core import filesystems
from mot_core.errors import MotError
from mot_core.filesystems import join

WHAT = "launch.storage_path"


def resolved(uri: str):
    """The storage URI (``launch.storage_path``, or a checkpoint's URI under it) -> (pyarrow file
    system, path in it)."""
    return filesystems.resolve(uri, WHAT)


def check_writable(uri: str) -> None:
    """Write, then delete, a probe file in the storage folder: a one-line error when it cannot
    be written (before any worker starts). Folders created for the probe are removed again: a
    launch refused later leaves nothing behind."""
    import pyarrow.fs

    filesystems.check_reachable(uri, WHAT)  # an object store's endpoint, credentials and bucket, one line each
    fs, path = resolved(uri)
    path = path.rstrip("/")
    probe = f"{path}/.mot-write-probe-{uuid.uuid4().hex}"
    try:
        absent = pyarrow.fs.FileType.NotFound
        missing = path  # the outermost folder the probe creates, if any
        while "/" in missing.strip("/") and fs.get_file_info(missing.rsplit("/", 1)[0]).type == absent:
            missing = missing.rsplit("/", 1)[0]
        created = fs.get_file_info(path).type == absent
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as handle:
            handle.write(b"ok")
        fs.delete_file(probe)
        if created:
            fs.delete_dir(missing)
    except (OSError, ValueError) as exc:
        if filesystems.is_uri(uri) and filesystems.failure_kind(exc):
            raise filesystems.describe_error(exc, uri, WHAT) from None
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MotError(f"cannot write checkpoints to storage path {uri}: {detail}; give a writable folder or URI "
                       "(launch.storage_path)") from None


def intact_checkpoints(uri: str, name: str) -> list[tuple[int, str]]:
    """(step, URI) of every intact checkpoint of run ``name``, oldest first. Intact: meta.json
    is there and every worker's listed files are present with their sizes (a crash during an
    upload leaves a folder that is skipped)."""
    import pyarrow.fs

    fs, path = resolved(uri)
    root = f"{path.rstrip('/')}/{name}"
    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError as exc:
        if filesystems.is_uri(uri):
            raise filesystems.describe_error(exc, join(uri, name), WHAT) from None
        raise MotError(f"cannot list checkpoints in {join(uri, name)}: {str(exc).splitlines()[0]}") from None
    found = []
    for entry in entries:
        if entry.type != pyarrow.fs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        step = _intact_step(fs, entry.path)
        if step is not None:
            found.append((step, join(uri, name, entry.base_name)))
    return sorted(found)


def _intact_step(fs, folder: str) -> int | None:
    import pyarrow.fs

    try:
        sizes = {info.base_name: info.size for info in fs.get_file_info(pyarrow.fs.FileSelector(folder))}
        with fs.open_input_stream(f"{folder}/meta.json") as handle:
            meta = json.loads(handle.read())
        for rank in range(int(meta["workers"])):
            with fs.open_input_stream(f"{folder}/files_rank{rank}.json") as handle:
                listing = json.loads(handle.read())
            if any(sizes.get(file) != size for file, size in listing.items()):
                return None
        return int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
