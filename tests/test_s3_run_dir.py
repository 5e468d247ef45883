"""A run folder on an object store (``run.dir: s3://...``, a real S3 server): ``mot train``
keeps the store's copy whole (config, metrics, tokenizers, checkpoints; shards under
``<run.dir>/tokens`` in the store), another machine (another working copy) resumes it with the
losses of an uninterrupted run, ``mot eval``, ``mot generate`` and ``mot export`` read it from
a third; a push cut short leaves the previous checkpoint the newest intact one; a damaged
newest checkpoint in the store is reported and skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import tiny_config_dict
from mot_core import filesystems
from mot_core.errors import MotError
from mot_core.training import checkpoint as ckpt
from mot_core.training.run_mirror import RunMirror
from test_s3_storage import mot, s3, write_yaml  # noqa: F401  (s3: the fixture)
from test_trackers import KILLER


def store_client(server):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(access_key=server.access_key, secret_key=server.secret_key,
                             endpoint_override=server.endpoint.removeprefix("http://"), scheme="http")


def store_files(server, uri: str) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    client = store_client(server)
    root = uri.removeprefix("s3://").split("?")[0]
    files = {}
    for info in client.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with client.open_input_stream(info.path) as handle:
                files[info.path[len(root) + 1:]] = handle.read()
    return files


def losses(metrics: bytes | str) -> list[tuple[int, float]]:
    text = metrics.decode() if isinstance(metrics, bytes) else metrics
    return [(r["step"], r["loss"]) for r in map(json.loads, text.splitlines()) if "loss" in r]


@pytest.mark.slow
def test_a_run_folder_on_s3_trains_resumes_elsewhere_and_reopens(s3_server, text_corpus, tmp_path):
    run_uri = f"s3://{s3_server.bucket}/runs-{uuid.uuid4().hex[:8]}/run"
    env = s3_server.env()
    data = tiny_config_dict(text_corpus, tmp_path / "unused", steps=6, checkpoint_every=2, eval_every=2)
    data["run"]["dir"] = run_uri
    config = write_yaml(tmp_path / "s3.yaml", data)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)

    # machine A is killed outright (no final push) while training step 5: the store holds what
    # its step-4 checkpoint pushed
    first = subprocess.run([sys.executable, str(script), "5", str(config)], capture_output=True, text=True,
                           cwd=tmp_path, env={**os.environ, **env, "MOT_RUN_CACHE": str(tmp_path / "machine_a")},
                           timeout=300)
    assert first.returncode == 137, first.stderr[-3000:]
    stored = store_files(s3_server, run_uri)
    assert [step for step, _ in losses(stored["metrics.jsonl"])] == [1, 2, 3, 4]
    assert {"checkpoints/step_0000002/meta.json", "checkpoints/step_0000004/meta.json"} <= set(stored)
    assert any(name.startswith("tokens/text_files/train/") for name in stored)  # the shards, in the store
    assert any(name.startswith("state/text/") for name in stored)  # the tokenizer's state
    assert not [n for n in stored if n in ("train.lock", ".mot-synced.json") or ".tmp" in n]
    assert not (tmp_path / "machine_a" / "s3" / s3_server.bucket / run_uri.split("/", 3)[3] / "tokens").exists()

    # machine B, with an empty working copy, resumes from the store's step 4
    second = mot({**env, "MOT_RUN_CACHE": str(tmp_path / "machine_b")}, tmp_path, "train", str(config))
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "tokenized" not in second.stdout  # the shards are the store's
    assert f"done: metrics in {run_uri}/metrics.jsonl" in second.stdout
    # uninterrupted, in a local run folder, from the same shards (an object store's are shuffled
    # a record batch at a time, local ones document by document)
    reference_config = tiny_config_dict(text_corpus, tmp_path / "local", steps=6, checkpoint_every=2, eval_every=2)
    reference_config["data"] = {"dir": f"{run_uri}/tokens"}
    reference = mot(env, tmp_path, "train", str(write_yaml(tmp_path / "local.yaml", reference_config)))
    assert reference.returncode == 0, reference.stderr[-3000:]
    stored = store_files(s3_server, run_uri)
    assert losses(stored["metrics.jsonl"]) == losses((tmp_path / "local" / "metrics.jsonl").read_text())
    kept = sorted({n.split("/")[1] for n in stored if n.startswith("checkpoints/")})
    assert kept == ["step_0000004", "step_0000006"]  # retention reached the store (keep_checkpoints: 2)

    # a third machine reads it
    third = {**env, "MOT_RUN_CACHE": str(tmp_path / "machine_c")}
    evaluated = mot(third, tmp_path, "eval", run_uri, "--batches", "1", "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["step"] == 6
    generated = mot(third, tmp_path, "generate", f"{run_uri}/checkpoints/step_0000004", "--prompt", "The", "--modality", "text",
                    "--max-tokens", "4", "--samples", "1", "--temperature", "0")
    assert generated.returncode == 0, generated.stderr[-3000:]
    exported = mot(third, tmp_path, "export", run_uri, "--format", "hf", "--modality", "text",
                   "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").is_file()
    for output in (first, second, evaluated, generated, exported):
        assert s3_server.secret_key not in output.stdout + output.stderr

    missing = mot(third, tmp_path, "eval", f"{run_uri}/checkpoints/step_0000002")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: checkpoint not found: {run_uri}/checkpoints/step_0000002"]


def _fake_checkpoint(run: Path, step: int) -> Path:
    folder = ckpt.checkpoint_dir(run, step)
    folder.mkdir(parents=True)
    for name in ckpt.CHECKSUMMED:
        (folder / name).write_bytes(f"{name} of {step}".encode())
    sums = {name: ckpt._sha256(folder / name) for name in ckpt.CHECKSUMMED}
    (folder / "meta.json").write_text(json.dumps({"step": step, "sha256": sums}))
    return folder


def test_a_push_cut_short_leaves_the_previous_checkpoint_the_newest(s3, tmp_path, monkeypatch):  # noqa: F811
    uri = f"s3://{s3.bucket}/cut-{uuid.uuid4().hex[:8]}/run?endpoint_override={s3.endpoint}"
    here = RunMirror(uri, tmp_path / "here")
    _fake_checkpoint(here.local, 2)
    (here.local / "metrics.jsonl").write_text('{"step": 1}\n')
    here.push()
    _fake_checkpoint(here.local, 4)
    sent, cut = [], [True]
    real_send = RunMirror._send

    def send(self, name):
        if cut[0] and name.endswith("meta.json"):
            raise MotError("connection lost")
        sent.append(name)
        real_send(self, name)

    monkeypatch.setattr(RunMirror, "_send", send)
    with pytest.raises(MotError, match="connection lost"):
        here.push()
    assert sorted(sent) == [f"checkpoints/step_0000004/{name}" for name in sorted(ckpt.CHECKSUMMED)]  # meta.json last
    cut[0] = False
    elsewhere = RunMirror(uri, tmp_path / "elsewhere")
    assert elsewhere.pull().name == "step_0000002"
    here.push()  # the next push sends what the cut one did not
    assert RunMirror(uri, tmp_path / "third").pull().name == "step_0000004"


def test_a_damaged_newest_checkpoint_in_the_store_is_reported_and_skipped(s3, tmp_path):  # noqa: F811
    uri = f"s3://{s3.bucket}/damaged-{uuid.uuid4().hex[:8]}/run?endpoint_override={s3.endpoint}"
    here = RunMirror(uri, tmp_path / "here")
    _fake_checkpoint(here.local, 2)
    newest = _fake_checkpoint(here.local, 4)
    here.push()
    client = store_client(s3)
    with client.open_output_stream(f"{s3.bucket}/{uri.split('/', 3)[3].split('?')[0]}/checkpoints/step_0000004/"
                                   "model.safetensors") as handle:
        handle.write(b"damaged")
    lines = []
    assert RunMirror(uri, tmp_path / "elsewhere").pull(report=lines.append).name == "step_0000002"
    assert lines == [f"checkpoint {filesystems.join(uri, 'checkpoints', newest.name)} is damaged "
                     "(model.safetensors does not match its checksum); using step_0000002 instead"]


def test_a_store_that_lost_files_is_what_the_working_copy_becomes(s3, tmp_path):  # noqa: F811
    """Files synced before and since deleted in the store (retention by another machine) go
    from the copy; a file written here since the last push stays (the next push sends it)."""
    uri = f"s3://{s3.bucket}/lost-{uuid.uuid4().hex[:8]}/run?endpoint_override={s3.endpoint}"
    here = RunMirror(uri, tmp_path / "here")
    _fake_checkpoint(here.local, 2)
    (here.local / "notes.txt").write_text("synced")
    here.push()
    store_client(s3).delete_file(f"{s3.bucket}/{uri.split('/', 3)[3].split('?')[0]}/notes.txt")
    (here.local / "new.txt").write_text("only here")
    here.pull()
    assert not (here.local / "notes.txt").exists() and (here.local / "new.txt").read_text() == "only here"


def test_what_cannot_use_a_store_run_folder_says_so_in_one_line(s3, text_corpus, tmp_path):  # noqa: F811
    from mot_core.distributed.process_group import folder_store
    from mot_core.experiment.resolve import resolve_config

    uri = f"s3://{s3.bucket}/empty-{uuid.uuid4().hex[:8]}/run?endpoint_override={s3.endpoint}"
    config = resolve_config({**tiny_config_dict(text_corpus, tmp_path / "x"), "run": {"dir": uri}})
    with pytest.raises(MotError, match=r"is on an object store, which `mot train --process-group` does not write to"):
        folder_store(config)
    result = mot(s3.env(), tmp_path, "eval", uri)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {uri} holds no checkpoint (checkpoints/step_* with a meta.json)"]
