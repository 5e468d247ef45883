"""Object storage through a real S3 server (SeaweedFS on loopback, ``tests/s3_server.py``):
``mot_core.filesystems`` finds the endpoint in a URI's query, in ``storage.endpoint`` or in
AWS_ENDPOINT_URL; an unreachable endpoint, bad credentials and a missing bucket are one line
each, with no secret in it; shards are tokenized into a bucket and trained from; the launch's
storage probe writes there."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_config_dict
from mot_core import filesystems
from mot_core.errors import MotError
from s3_server import closed_port


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The session's server, with its credentials (and no endpoint) in this process's
    environment and the storage settings reset around the test."""
    for variable in (*filesystems.ENDPOINT_VARIABLES, "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in s3_server.env(endpoint=False).items():
        monkeypatch.setenv(variable, value)
    filesystems.configure(None, None)
    yield s3_server
    filesystems.configure(None, None)


def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def write_then_range_read(uri: str) -> None:
    fs, path = filesystems.resolve(filesystems.join(uri, "sub", "blob.bin"), "data.dir")
    payload = bytes(range(256)) * 4
    with fs.open_output_stream(path) as handle:
        handle.write(payload)
    with fs.open_input_file(path) as handle:
        handle.seek(300)
        assert handle.read(10) == payload[300:310]
        assert handle.size() == len(payload)


def one_line(error: MotError | str, secret: str, *fragments: str) -> str:
    text = str(error)
    assert "\n" not in text.strip(), text
    assert secret not in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


def test_the_endpoint_in_the_uris_query_survives_joined_paths(s3):
    folder = prefix()
    uri = f"s3://{s3.bucket}/{folder}?endpoint_override={s3.endpoint}"
    assert filesystems.join(uri, "wiki", "train") == f"s3://{s3.bucket}/{folder}/wiki/train?endpoint_override={s3.endpoint}"
    write_then_range_read(uri)
    # host:port and the scheme apart, as pyarrow's own URIs give them
    host = s3.endpoint.removeprefix("http://")
    write_then_range_read(f"s3://{s3.bucket}/{prefix()}?endpoint_override={host}&scheme=http")


def test_the_endpoint_from_storage_endpoint(s3):
    filesystems.configure(s3.endpoint, None)
    write_then_range_read(f"s3://{s3.bucket}/{prefix()}")


def test_the_endpoint_from_aws_endpoint_url(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    write_then_range_read(f"s3://{s3.bucket}/{prefix()}")


def test_storage_endpoint_is_set_by_every_resolved_config(s3, text_corpus, tmp_path):
    from mot_core.experiment.resolve import resolve_config

    config = tiny_config_dict(text_corpus, tmp_path / "run")
    resolve_config({**config, "storage": {"endpoint": s3.endpoint}})
    write_then_range_read(f"s3://{s3.bucket}/{prefix()}")
    resolve_config(config)  # a config without it: AWS itself again
    assert filesystems._settings["endpoint"] is None


@pytest.mark.parametrize("source, fix", [
    ("query", "fix endpoint_override in the URI"),
    ("storage.endpoint", "fix storage.endpoint"),
    ("AWS_ENDPOINT_URL", "fix AWS_ENDPOINT_URL"),
])
def test_an_unreachable_endpoint_is_one_line_naming_where_it_was_set(s3, monkeypatch, source, fix):
    """A closed loopback port: told in well under a second (connection refused)."""
    closed = f"http://127.0.0.1:{closed_port()}"
    uri = f"s3://{s3.bucket}/x" + (f"?endpoint_override={closed}" if source == "query" else "")
    if source == "storage.endpoint":
        filesystems.configure(closed, None)
    elif source == "AWS_ENDPOINT_URL":
        monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    with pytest.raises(MotError) as caught:
        filesystems.check_reachable(uri, "launch.storage_path")
    one_line(caught.value, s3.secret_key, f"launch.storage_path {uri}:", f"cannot reach the S3 endpoint {closed}",
             "start the server", fix)


@pytest.mark.parametrize("key, secret, cause", [
    ("right", "wrong", "SignatureDoesNotMatch"),
    ("wrong", "wrong", "InvalidAccessKeyId"),
])
def test_bad_credentials_are_one_line(s3, monkeypatch, key, secret, cause):
    bad_secret = "not-the-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key if key == "right" else "NOSUCHKEY0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    uri = f"s3://{s3.bucket}/x?endpoint_override={s3.endpoint}"
    with pytest.raises(MotError) as caught:
        filesystems.check_reachable(uri, "data.dir")
    text = one_line(caught.value, s3.secret_key, "data.dir", uri, cause, "AWS_SECRET_ACCESS_KEY")
    assert bad_secret not in text


def test_a_missing_bucket_is_one_line(s3):
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/x?endpoint_override={s3.endpoint}"
    with pytest.raises(MotError) as caught:
        filesystems.check_reachable(uri, "data.dir")
    one_line(caught.value, s3.secret_key, "data.dir", "does not exist", "NoSuchBucket", "create it")


def test_a_file_deleted_during_a_run_is_one_line(s3):
    uri = filesystems.join(f"s3://{s3.bucket}/{prefix()}?endpoint_override={s3.endpoint}", "shard.arrow")
    fs, path = filesystems.resolve(uri, "data.dir")
    with fs.open_output_stream(path) as handle:
        handle.write(b"x" * 100)
    fs.delete_file(path)
    with pytest.raises(OSError) as raised:
        fs.open_input_file(path)
    error = filesystems.describe_error(raised.value, uri, "data.dir", "run `mot data tokenize CONFIG` again")
    one_line(error, s3.secret_key, "data.dir", uri, "not found", "mot data tokenize")


def test_credentials_in_a_uri_or_endpoint_are_refused_without_repeating_them(s3, text_corpus, tmp_path):
    from mot_core.experiment.resolve import resolve_config

    config = tiny_config_dict(text_corpus, tmp_path / "run")
    for key, value in (("data", {"dir": f"s3://AKIAX:{s3.secret_key}@{s3.bucket}/t"}),
                       ("launch", {"storage_path": f"s3://AKIAX:{s3.secret_key}@{s3.bucket}/t"}),
                       ("run", {"dir": f"s3://AKIAX:{s3.secret_key}@{s3.bucket}/runs/t"}),
                       ("data", {"dir": f"s3://{s3.bucket}/t?access_key=AKIAX&secret_key={s3.secret_key}"}),
                       ("storage", {"endpoint": f"http://AKIAX:{s3.secret_key}@127.0.0.1:1"})):
        with pytest.raises(MotError) as caught:
            resolve_config({**config, key: value})
        one_line(caught.value, s3.secret_key, "holds credentials", "AWS_SECRET_ACCESS_KEY")
    with pytest.raises(MotError) as caught:  # a URI that never went through a config
        filesystems.check_reachable(f"s3://{s3.bucket}/t?secret_key={s3.secret_key}", "data.dir")
    one_line(caught.value, s3.secret_key, "data.dir holds credentials")
    with pytest.raises(MotError) as caught:
        resolve_config({**config, "storage": {"endpoint": "127.0.0.1:8333"}})
    one_line(caught.value, s3.secret_key, "storage.endpoint", "http://")


def test_launch_storage_probe_writes_to_a_bucket_and_refuses_in_one_line(s3, monkeypatch):
    from mot_core.training import storage

    uri = f"s3://{s3.bucket}/{prefix()}/ray?endpoint_override={s3.endpoint}"
    storage.check_writable(uri)
    fs, path = filesystems.resolve(uri, "launch.storage_path")
    import pyarrow.fs as pafs

    assert fs.get_file_info(pafs.FileSelector(path.rsplit("/", 1)[0], allow_not_found=True)) == []  # no probe left
    with pytest.raises(MotError) as caught:
        storage.check_writable(f"s3://no-such-bucket-x/ray?endpoint_override={s3.endpoint}")
    one_line(caught.value, s3.secret_key, "launch.storage_path", "NoSuchBucket")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + uuid.uuid4().hex)
    with pytest.raises(MotError) as caught:
        storage.check_writable(uri)
    one_line(caught.value, s3.secret_key, "launch.storage_path", "SignatureDoesNotMatch")


def mot(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run([sys.executable, "-m", "mot_core.cli", *args], capture_output=True, text=True,
                          env={**clean, **env, "PYTHONPATH": str(ROOT)}, cwd=cwd, timeout=300)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def assert_one_line_exit_2(result: subprocess.CompletedProcess, secret: str, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and secret not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.slow
def test_a_missing_bucket_stops_tokenize_and_train_in_one_line(s3_server, text_corpus, tmp_path):
    data = tiny_config_dict(text_corpus, tmp_path / "run")
    data["data"] = {"dir": "s3://missing-bucket/x"}
    config = write_yaml(tmp_path / "run.yaml", data)
    for command in ("data tokenize", "train"):
        result = mot(s3_server.env(), tmp_path, *command.split(), str(config))
        assert_one_line_exit_2(result, s3_server.secret_key, "data.dir s3://missing-bucket/x", "NoSuchBucket")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


@pytest.mark.slow
def test_bad_credentials_stop_mot_train_in_one_line(s3_server, text_corpus, tmp_path):
    data = tiny_config_dict(text_corpus, tmp_path / "run")
    data["data"] = {"dir": f"s3://{s3_server.bucket}/{prefix()}"}
    config = write_yaml(tmp_path / "run.yaml", data)
    result = mot({**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong"}, tmp_path, "train", str(config))
    assert_one_line_exit_2(result, s3_server.secret_key, "data.dir", "SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY")


@pytest.mark.slow
def test_tokenize_into_a_bucket_then_train_from_it(s3_server, text_corpus, tmp_path):
    """The endpoint in the URI's query (the form that broke when paths were appended after it):
    ``mot data tokenize`` writes the shards to the bucket, ``mot train`` reads them for a few
    steps; the secret is in no file of the run folder and in no output."""
    tokens = f"s3://{s3_server.bucket}/{prefix()}/tokens?endpoint_override={s3_server.endpoint}"
    data = tiny_config_dict(text_corpus, tmp_path / "run", steps=4, eval_every=2, checkpoint_every=2)
    data["data"] = {"dir": tokens}
    config = write_yaml(tmp_path / "run.yaml", data)
    env = s3_server.env(endpoint=False)

    tokenized = mot(env, tmp_path, "data", "tokenize", str(config))
    assert tokenized.returncode == 0, tokenized.stdout + tokenized.stderr
    assert f"shards in {tokens}" in tokenized.stdout
    _, path = filesystems.resolve(filesystems.join(tokens, "text_files", "train", "index.json"), "data.dir")
    import pyarrow.fs as pafs

    client = pafs.S3FileSystem(access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                               endpoint_override=s3_server.endpoint.removeprefix("http://"), scheme="http")
    assert client.get_file_info(path).type == pafs.FileType.File
    assert not (tmp_path / "run" / "tokens").exists()  # in the bucket, not the run folder

    trained = mot(env, tmp_path, "train", str(config))
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "tokenized" not in trained.stdout  # read from the bucket, not written again
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"step": 4' in metrics
    secret = s3_server.secret_key.encode()
    for output in (tokenized, trained):
        assert s3_server.secret_key not in output.stdout + output.stderr
    leaked = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked, leaked


@pytest.mark.slow
def test_a_launch_keeps_its_checkpoints_in_a_bucket_and_resumes_from_them(s3_server, text_corpus, tmp_path):
    """``launch.storage_path`` in the bucket (the endpoint in the query): Ray Train is handed the
    file system resolved here, so it writes where the driver's probe wrote; a second launch
    finds the newest checkpoint in the bucket and continues from it."""
    data = tiny_config_dict(text_corpus, tmp_path / "run", steps=2, eval_every=2, checkpoint_every=2)
    storage_path = f"s3://{s3_server.bucket}/{prefix()}/ray?endpoint_override={s3_server.endpoint}"
    data["launch"] = {"strategy": "ddp", "num_workers": 1, "storage_path": storage_path, "max_failures": 0}
    config = write_yaml(tmp_path / "run.yaml", data)
    env = {**s3_server.env(endpoint=False), "RAY_DEDUP_LOGS": "0"}

    first = mot(env, tmp_path, "launch", str(config))
    assert first.returncode == 0, (first.stdout + first.stderr)[-5000:]
    _, path = filesystems.resolve(filesystems.join(storage_path, "run"), "launch.storage_path")
    import pyarrow.fs as pafs

    client = pafs.S3FileSystem(access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                               endpoint_override=s3_server.endpoint.removeprefix("http://"), scheme="http")
    saved = [i.base_name for i in client.get_file_info(pafs.FileSelector(path))
             if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    assert len(saved) == 1, saved

    second = mot(env, tmp_path, "launch", str(config), "train.steps=3")
    assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
    assert f"resuming from {filesystems.join(storage_path, 'run', saved[0])}" in second.stdout
    assert "(step 2)" in second.stdout + second.stderr
    for output in (first, second):
        assert s3_server.secret_key not in output.stdout + output.stderr
    secret = s3_server.secret_key.encode()
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file() and secret in p.read_bytes()]


@pytest.mark.slow
def test_a_bucket_that_may_not_be_written_stops_tokenize_in_one_line(s3_server, text_corpus, tmp_path):
    """Credentials that may read and list but not write: the probe passes, the first shard
    write is refused, and that is one line too (not a traceback from the shard writer)."""
    data = tiny_config_dict(text_corpus, tmp_path / "run")
    data["data"] = {"dir": f"s3://{s3_server.bucket}/{prefix()}/tokens"}
    config = write_yaml(tmp_path / "run.yaml", data)
    result = mot(s3_server.env(reader=True), tmp_path, "data", "tokenize", str(config))
    assert_one_line_exit_2(result, s3_server.reader_secret, "data.dir", "AccessDenied", "AWS_ACCESS_KEY_ID")
    assert s3_server.secret_key not in result.stdout + result.stderr
