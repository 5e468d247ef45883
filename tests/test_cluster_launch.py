"""A cluster for real (issue 31): a Ray head and two worker nodes that share no file system with
the machine that launches (``tests/cluster.py``: each worker node in its own mount namespace),
and a real S3 server (SeaweedFS on loopback, ``tests/s3_server.py``) for shards and checkpoints.

The worker nodes hold the installed framework and one read-only dataset folder (as a cluster
mounts its datasets), nothing else: not the run folder, not the tokenizers. Through S3 alone:
  - ``mot data tokenize --address`` runs its actors on both worker nodes and writes the shards
    into the bucket;
  - ``mot launch`` with DDP and with FSDP2, ``run.dir`` in the bucket too, gives ``mot train``'s
    loss at every step, each worker reading only its lanes' record batches (and saying how much
    it fetched before step 1); the driver writes the metrics and the exported checkpoint into its
    working copy of the run folder and pushes them to the bucket;
  - ``mot sweep --address`` with its folder in the bucket runs a trial on each worker node, each
    from and to its own run folder there, Ray Tune's state there too;
  - a worker node killed mid-run (its raylet and every process on it) and a replacement node
    started: the launch resumes from the checkpoint in the bucket and loses no step;
  - a node that cannot see a path the config names, or the driver's data folder, stops the
    command with one line naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_config_dict

pytestmark = pytest.mark.slow

STEPS = 9


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory, text_corpus):
    """(folder, dataset folder the nodes see, bucket prefix, the cluster, the driver's env)."""
    from cluster import local_cluster

    tmp = tmp_path_factory.mktemp("cluster_launch")
    corpus = tmp / "datasets" / "corpus"
    shutil.copytree(text_corpus, corpus)
    prefix = f"s3://{s3_server.bucket}/cluster-{uuid.uuid4().hex[:8]}"
    node_env = {**s3_server.env(), "MOT_CPU_BF16": "0", "OMP_NUM_THREADS": "1"}
    with local_cluster(workers=2, cpus_per_worker=1, extra_env=node_env, keep=[str(tmp / "datasets")]) as nodes:
        env = {**os.environ, **node_env, **nodes.env, "RAY_DEDUP_LOGS": "0"}
        yield tmp, corpus, prefix, nodes, env


def _config(tmp: Path, corpus: Path, prefix: str, name: str, run_on_s3: bool = False, **launch) -> Path:
    """``run_on_s3``: ``run.dir`` in the bucket too, and Ray's checkpoints in it (their default,
    ``<run.dir>/ray``); else a folder of this machine, and the checkpoints under ``<prefix>/ray``."""
    data = tiny_config_dict(corpus, tmp / name, steps=STEPS, eval_every=0, checkpoint_every=3, log_every=1)
    data["data"] = {"dir": f"{prefix}/tokens", "shard_tokens": 4000}
    data["launch"] = dict(launch) if run_on_s3 else {"storage_path": f"{prefix}/ray", **launch}
    if run_on_s3:
        data["run"]["dir"] = f"{prefix}/runs/{name}"
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _mot(env: dict, *args: str, cwd: Path, on_start=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``mot``; its output also goes to ``<cwd>/<command>-N.log``, kept for a failure's story."""
    log = cwd / f"{args[0]}-{len(list(cwd.glob(f'{args[0]}-*.log')))}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "mot_core.cli", *args], cwd=cwd, env=env, text=True,
                                   stdout=out, stderr=subprocess.STDOUT)
        if on_start is not None:
            threading.Thread(target=on_start, daemon=True).start()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"`mot {' '.join(args)}` ran past {timeout} s: {log.read_text()[-6000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, log.read_text(), "")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenized(cluster):
    """``mot data tokenize --address``, then ``mot train`` on this machine from the bucket: the
    reference every launch must match."""
    tmp, corpus, prefix, nodes, env = cluster
    config = _config(tmp, corpus, prefix, "single")
    result = _mot(env, "data", "tokenize", str(config), "--address", nodes.address, cwd=tmp)
    assert result.returncode == 0, result.stdout[-4000:]
    assert re.search(r"tokenized \d+ parts read by the sources' own readers with 2 actors on 2 nodes",
                     result.stdout), result.stdout[-3000:]
    result = _mot(env, "train", str(config), cwd=tmp)
    assert result.returncode == 0, result.stdout[-4000:]
    return _metrics(tmp / "single")


def _store_files(prefix: str, env: dict) -> dict[str, bytes]:
    """Every file under ``prefix`` in the bucket, by its path relative to it."""
    import pyarrow.fs as pafs

    client = pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                               endpoint_override=env["AWS_ENDPOINT_URL"].removeprefix("http://"), scheme="http")
    root = prefix.removeprefix("s3://")
    files = {}
    for info in client.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with client.open_input_stream(info.path) as handle:
                files[info.path[len(root) + 1:]] = handle.read()
    return files


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_launch_across_nodes_without_a_shared_disk_matches_mot_train(cluster, tokenized, strategy):
    """data.dir, run.dir and Ray's checkpoints all in the bucket: the driver keeps a working copy
    of the run folder and pushes it; the run is whole in the store."""
    tmp, corpus, prefix, nodes, env = cluster
    config = _config(tmp, corpus, prefix, strategy, run_on_s3=True, strategy=strategy)
    result = _mot({**env, "MOT_RUN_CACHE": str(tmp / "driver_copies")}, "launch", str(config), "--address",
                  nodes.address, "--num-workers", "2", cwd=tmp)
    assert result.returncode == 0, result.stdout[-5000:]
    stored = _store_files(f"{prefix}/runs/{strategy}", env)
    # written by the driver (rank 0's node sees neither the bucket's run folder nor the driver's copy)
    launched = [json.loads(line) for line in stored["metrics.jsonl"].decode().splitlines()]
    assert [r["step"] for r in launched] == list(range(1, STEPS + 1))
    for a, b in zip(tokenized, launched):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5, abs=1e-6), a["step"]
    reads = re.findall(r"worker (\d): read ([\d.]+) MB of the ([\d.]+) MB of training shards in the object store", result.stdout)
    assert sorted({r[0] for r in reads}) == ["0", "1"], result.stdout[-3000:]  # (Ray may echo a line twice)
    for _, fetched, total in reads:
        assert float(fetched) < float(total)  # its lanes' record batches, not the corpus
    assert f"checkpoints/step_{STEPS:07d}/model.safetensors" in stored and "loss_curves.png" in stored
    assert any(name.startswith("ray/") for name in stored)  # Ray's checkpoints: the default, <run.dir>/ray
    assert not (tmp / strategy).exists()


def test_a_sweep_runs_its_trials_on_both_nodes_with_everything_in_the_bucket(cluster, tokenized):
    """``mot sweep --address --out s3://...``: the driver fits each trial's tokenizers and pushes
    them to the trial's run folder in the bucket; each trial trains on a worker node from its
    run folder there (the nodes do not see the driver's files) and pushes it back; Ray Tune's
    state is in the bucket; the table is made from the trials' metrics in the bucket."""
    tmp, corpus, prefix, nodes, env = cluster
    config = _config(tmp, corpus, prefix, "sweep_base")
    out = f"{prefix}/sweep"
    result = _mot({**env, "MOT_RUN_CACHE": str(tmp / "driver_copies")}, "sweep", str(config), "train.steps=4",
                  "train.eval_every=2", "--grid", "train.lr=0.001,0.003", "--out", out, "--address", nodes.address,
                  cwd=tmp)
    assert result.returncode == 0, result.stdout[-5000:]
    placed = dict(re.findall(r"trial (t\d{3}_\S+) on Ray node ([0-9a-f]+)", result.stdout))
    workers = {nodes.node_ids[f"worker_{i}"] for i in range(2)}
    assert len(placed) == 2 and set(placed.values()) == workers, (placed, workers)  # one trial on each node
    stored = _store_files(out, env)
    for trial in placed:
        steps = [json.loads(line)["step"] for line in stored[f"trials/{trial}/metrics.jsonl"].decode().splitlines()]
        assert steps[-1] == 4, (trial, steps)
        assert f"trials/{trial}/checkpoints/step_0000004/meta.json" in stored
    assert {"sweep.json", "results.md", "results.json", "loss_curves.png"} <= set(stored)
    assert any(name.startswith("tune/") for name in stored)  # Ray Tune's state, beside the trials
    rows = json.loads(stored["results.json"])
    assert {r["trial"] for r in rows} == set(placed) and all(r["status"] == "finished" for r in rows)
    assert f"table: {out}/results.md" in result.stdout


def test_a_killed_node_is_replaced_and_the_launch_loses_no_step(cluster, tokenized, monkeypatch):
    from mot_core.training import storage

    tmp, corpus, prefix, nodes, env = cluster
    config = _config(tmp, corpus, prefix, "killed", max_failures=3)
    for key, value in env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)  # this process watches the bucket for the first checkpoint
    log = tmp / "launch-killed.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "mot_core.cli", "launch", str(config), "--address",
                                    nodes.address, "--num-workers", "2"], cwd=tmp, env=env, text=True, stdout=out,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if storage.intact_checkpoints(f"{prefix}/ray", "killed"):
                        break
                except Exception:  # noqa: BLE001  (the run's folder appears with its first checkpoint)
                    pass
                time.sleep(0.2)
            assert process.poll() is None, log.read_text()[-4000:]
            # In this thread: a node started from another thread would die with it (PR_SET_PDEATHSIG
            # follows the thread that started the process).
            nodes.kill_node(0)  # its raylet and every process on it: a crashed machine
            nodes.add_node()  # a replacement, as an autoscaler would start
            process.wait(timeout=420)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log.read_text()
    assert process.returncode == 0, output[-6000:]
    assert "restarting it from the last checkpoint" in output
    assert re.search(r"resuming from s3://\S+/ray/killed/checkpoint_\S+ \(step [1-9]", output), output[-3000:]
    resumed = _metrics(tmp / "killed")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no lost or repeated step
    for a, b in zip(tokenized, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5, abs=1e-6), a["step"]


def test_a_node_that_cannot_see_a_path_the_config_names_says_which(cluster, tokenized):
    tmp, _, prefix, nodes, env = cluster
    hidden = tmp / "not_on_the_nodes"
    shutil.copytree(tmp / "datasets" / "corpus", hidden)
    config = _config(tmp, hidden, f"{prefix}-hidden", "hidden")
    result = _mot(env, "data", "tokenize", str(config), "--address", nodes.address, cwd=tmp)
    assert result.returncode == 2, result.stdout[-4000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("error: node ") and "Traceback" not in result.stdout.split("error: node ")[-1]
    assert f"cannot see {hidden}/*.txt (mixture.datasets.text_files.options.paths[0])" in last, last


def test_a_local_data_dir_the_nodes_do_not_see_is_one_line(cluster, tokenized):
    tmp, corpus, prefix, nodes, env = cluster
    config = yaml.safe_load(_config(tmp, corpus, prefix, "local_data").read_text())
    config["data"]["dir"] = str(tmp / "local_tokens")  # on the launching machine only
    path = tmp / "local_data.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _mot(env, "launch", str(path), "--address", nodes.address, "--num-workers", "2", cwd=tmp)
    assert result.returncode == 2, result.stdout[-4000:]
    last = result.stdout.strip().splitlines()[-1]
    assert f"does not see the driver's data.dir {tmp / 'local_tokens'}" in last, last


def test_ray_datas_readers_read_the_bucket_on_the_worker_nodes(cluster, tokenized, s3_server, monkeypatch):
    """A Parquet text corpus in the bucket: `mot data tokenize --address` reads it with Ray
    Data's read_parquet on the worker nodes (they see nothing of the launching machine) and
    writes into the bucket the shards a local run writes here, byte for byte."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from mot_core import filesystems
    from test_shards import _shard_bytes

    tmp, corpus, prefix, nodes, env = cluster
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    paragraphs = [p for text in texts for p in text.split("\n\n") if p.strip()]
    local_files = tmp / "parquet_corpus"
    local_files.mkdir()
    for index in range(2):
        pq.write_table(pa.table({"text": paragraphs[index::2]}), local_files / f"part-{index}.parquet",
                       row_group_size=max(1, len(paragraphs) // 8))
    bucket = f"{prefix}/parquet_corpus"
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    filesystems.configure(None, None)
    fs, root = filesystems.resolve(bucket, "test")
    pafs.copy_files(str(local_files), root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def config(name: str, paths: str, data_dir: str) -> Path:
        data = yaml.safe_load(_config(tmp, corpus, prefix, name).read_text())
        data["mixture"]["datasets"] = {"text_records": {"options": {"paths": [paths], "val_fraction": 0.2}}}
        data["data"]["dir"] = data_dir
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    on_nodes = config("parquet_nodes", f"{bucket}/*.parquet", f"{prefix}/parquet_tokens")
    result = _mot(env, "data", "tokenize", str(on_nodes), "--address", nodes.address, cwd=tmp)
    assert result.returncode == 0, result.stdout[-4000:]
    assert re.search(r"dataset 'text_records': 2 files \(\d+ parts\) read with Ray Data's read_parquet", result.stdout)
    assert "read by the sources' own readers" not in result.stdout
    here = config("parquet_here", str(local_files / "*.parquet"), str(tmp / "parquet_tokens"))
    shutil.copytree(tmp / "parquet_nodes" / "state", tmp / "parquet_here" / "state")  # the same tokenizer
    result = _mot(env, "data", "tokenize", str(here), cwd=tmp)
    assert result.returncode == 0, result.stdout[-4000:]
    for split in ("train", "val"):
        local = _shard_bytes(tmp / "parquet_tokens" / "text_records" / split)
        selector = pafs.FileSelector(filesystems.resolve(f"{prefix}/parquet_tokens/text_records/{split}", "test")[1])
        stored = {info.base_name: fs.open_input_stream(info.path).read()
                  for info in fs.get_file_info(selector) if info.base_name.endswith(".arrow")}
        assert local and stored == local, split
    filesystems.configure(None, None)

