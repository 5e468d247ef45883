"""Shared fixtures: tiny configs on real text (CPython's pydoc topics, ~465 KB of English)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(min(2, torch.get_num_threads()))
# train.precision=auto means bf16 on a CPU with native bf16 matmul (AMX, AVX-512 BF16): pin
# fp32 so that the suite's figures and tolerances do not depend on the machine (tests of the
# bf16 path set precision=bf16, or this variable to 1, themselves). Subprocesses inherit it.
os.environ.setdefault("MOT_CPU_BF16", "0")

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = ROOT / "examples" / "timeseries_plugin"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A folder of real English documents, one pydoc topic per file."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("corpus")
    for name in sorted(topics)[:80]:
        (folder / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    return folder


def tiny_config_dict(corpus: Path, run_dir: Path, **train) -> dict:
    return {
        "run": {"dir": str(run_dir), "seed": 0, "device": "cpu"},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
        "train": {
            "steps": 6, "batch_size": 2, "seq_len": 64, "lr": 3e-3, "warmup_steps": 2,
            "eval_every": 3, "eval_batches": 2, "checkpoint_every": 3, "log_every": 1,
            "progress": False, **train,
        },
        "mixture": {
            "modalities": {"text": {"options": {"vocab_size": 300}}},
            "datasets": {"text_files": {"options": {"paths": [str(corpus / "*.txt")], "val_fraction": 0.2}}},
        },
    }


@pytest.fixture
def write_config(text_corpus, tmp_path):
    """write_config(**train_overrides) -> path of a tiny YAML config with its own run dir."""

    def write(name: str = "run", data: dict | None = None, **train) -> Path:
        data = data or tiny_config_dict(text_corpus, tmp_path / name, **train)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A folder holding the installed ``mot-timeseries`` distribution (package + dist-info).

    The source is copied first: with --no-build-isolation pip builds in the source tree, which
    would leave build/ and mot_timeseries.egg-info in examples/timeseries_plugin; such an
    egg-info would make the plugin an installed distribution for any process that puts that
    folder on sys.path (as the unit tests below do)."""
    root = tmp_path_factory.mktemp("timeseries_plugin")
    source = root / "source"
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    command = [
        sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
        "--disable-pip-version-check", "--quiet", "--target", str(site), str(source),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    assert (site / "mot_timeseries" / "data" / "sunspots.csv").is_file(), "package data was not installed"
    return site


def run_mot(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-m", "mot_core.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def fail_at_batch(monkeypatch, call_number: int, exc: BaseException):
    """Make the trainer's data stream raise on its ``call_number``-th batch (validation
    batches are built elsewhere and are not affected)."""
    from mot_core.data import PackedStream

    class FailingStream(PackedStream):
        calls = 0

        def next_batch(self, *args, **kwargs):
            FailingStream.calls += 1
            if FailingStream.calls == call_number:
                raise exc
            return super().next_batch(*args, **kwargs)

    monkeypatch.setattr("mot_core.training.state.PackedStream", FailingStream)


def nan_losses_on(monkeypatch, poisoned) -> None:
    """Make the text loss NaN on the training forward passes whose number (1-based) satisfies
    ``poisoned`` (evaluation passes are not counted)."""
    from plugins.autoregressive import AutoregressiveLoss

    real = AutoregressiveLoss.per_token
    calls = [0]

    def per_token(self, model, hidden, batch):
        losses, valid = real(self, model, hidden, batch)
        if model.training:
            calls[0] += 1
            if poisoned(calls[0]):
                losses = losses * float("nan")
        return losses, valid

    monkeypatch.setattr(AutoregressiveLoss, "per_token", per_token)


@pytest.fixture(scope="session")
def prepared_vq(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, VQ tokenizer folder): the captioned images prepared and a tiny VQGAN fitted
    once per session, for every test of the Chameleon setting (``tiny_chameleon``)."""
    from mot_core.cli import main
    from test_chameleon_pipeline import tiny_chameleon

    base = tmp_path_factory.mktemp("prepared_vq")
    config = base / "prepare.yaml"
    config.write_text(yaml.safe_dump(tiny_chameleon(base / "data", base / "tok", base / "run")))
    assert main(["data", "prepare", str(config)]) == 0
    assert main(["tokenizer", "fit", str(config)]) == 0
    return base / "data", base / "tok"


def use_registry(monkeypatch, make_registry) -> None:
    """Make ``make_registry()`` the registry every config and experiment is built with in this
    process (the front door's tower defaults and the experiment's plugins alike); it is called
    where the registry is needed, so a broken plugin fails inside the command under test."""
    for module in ("mot_core.experiment.resolve", "mot_core.experiment.build"):
        monkeypatch.setattr(f"{module}.get_registry", make_registry)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS, ``tests/s3_server.py``) on loopback for the session: its
    ``endpoint``, ``access_key``, ``secret_key``, a ``bucket``, and ``env()`` (the AWS variables
    a client needs)."""
    from s3_server import s3_server as start

    with start(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server():
    """A Google Cloud Storage JSON API on loopback (``gcp-storage-emulator``, in memory) for the
    session, with a bucket ``mot``: ``uri(prefix)`` gives the ``gs://`` URI of a prefix there, read
    anonymously at the emulator's endpoint, and ``filesystem`` the pyarrow file system."""
    import socket
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                                "--port", str(port), "--in-memory", "--default-bucket", "mot"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the GCS emulator did not start on port {port}") from None
            time.sleep(0.1)
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&anonymous=true"
    try:
        yield SimpleNamespace(uri=lambda prefix: f"gs://mot/{prefix}?{query}",
                              filesystem=pafs.GcsFileSystem(anonymous=True, endpoint_override=f"127.0.0.1:{port}",
                                                            scheme="http"))
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def ray_cluster():
    """A multi-node Ray cluster on this machine (``tests/cluster.py``): a head with 0 CPUs (the
    driver, this process, joins there) and two 1-CPU worker nodes (resources ``worker_0``,
    ``worker_1``), each in its own mount namespace that holds the installed package and none of
    this machine's files; ``address``, ``node_ids``, ``kill_node(i)``, ``add_node()``. About 10 s
    to start on 2 cores: one per test module. A test that needs the S3 server on the nodes
    starts its own: ``local_cluster(extra_env=s3_server.env())``."""
    from cluster import local_cluster

    with local_cluster(workers=2, cpus_per_worker=1, extra_env={"MOT_CPU_BF16": os.environ["MOT_CPU_BF16"]}) as cluster:
        yield cluster
