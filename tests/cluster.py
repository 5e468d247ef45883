"""A multi-node Ray cluster on this one machine whose worker nodes share no file system with the
machine that launches work on it (issue 31).

``local_cluster(workers=2, cpus_per_worker=1, extra_env=None)`` starts Ray's own multi-node
setup with ``ray start``: a head node (``ray start --head``, 0 CPUs by default: the driver, i.e.
this process, runs there, and so does Ray Train's controller, a 0-CPU actor pinned to the
driver's node; every task and training worker that needs a CPU lands on a worker node) and
``workers`` worker nodes (``ray start --address=...``), each with its own custom resources
(``worker_<i>``: 1 and ``worker``: 1; the head has ``head``: 1), its own Ray temp dir and its own
ports. It waits until the GCS lists every node alive, yields a ``LocalCluster`` (``address`` for
``ray.init(address=...)`` and for ``mot ... --address``; ``kill_node(i)``; ``add_node()``) and
tears everything down on exit, after a test failure too.

The head runs in this machine's namespaces, in a process group of its own (the driver talks to
its raylet through the head's session folder, and the raylet looks the driver's PID up). Each
worker node runs in its own PID namespace (``unshare --pid --fork --mount-proc``): one SIGKILL to
the namespace's first process kills every process of that node at once (``kill_node``: a node
crash). Teardown kills the head's process group and each worker node's namespace; never ``ray
stop``, which kills every Ray process on the machine, other people's clusters included. If this
process dies first, the kernel kills the nodes too (``PR_SET_PDEATHSIG``). A worker node's
mount namespace is private and built like this (``NodeView``; ``LocalCluster.view.describe()``
says it in words):

* a fresh empty tmpfs over ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``$HOME``, the repository root
  and the current folder (and any folder in ``hide``): the node sees none of the launching
  machine's data, run folders, configs, tests' tmp_path folders or tokens (``~/.ray``,
  ``~/.aws``, ``~/.cache``);
* read-only bind mounts of what the installed package needs, back at their own paths, as a
  node's image would hold them: the virtual environment (``sys.prefix``), the Python it was made
  from (``sys.base_prefix``, under ``$HOME`` for pyenv) and the source folders the editable
  install maps the packages to (``mot_core``, ``plugins``, ``registry``: its
  ``__editable___*_finder.py`` holds absolute paths into the repository). Nothing else of the
  repository (``examples/``, ``data/``, ``runs/``, ``tests/``, ``tools/``, ``pyproject.toml``);
* the rest of the root file system (``/usr``, ``/etc``, ...) as is: the OS image every node has;
* ``/proc`` of its own PID namespace (no ``/proc/<pid>/root`` path into another node's files).

A worker node's Ray session files are in its private ``/tmp/ray``; from this machine they can be
read while the node lives through ``/proc/<pid>/root`` (``LocalCluster.logs``, used in the error
of a failed start). A worker node's environment is not this process's: ``PATH`` (the venv's
``bin`` first), ``HOME``, ``LANG``, Ray's auth mode and ``extra_env`` (e.g. the S3 server's
``AWS_*`` variables), which Ray's workers on that node inherit; the head gets this process's
environment plus ``extra_env`` (Ray Train's controller, on the head, writes to storage too).

All nodes share the machine's network namespace: the S3 server of ``tests/s3_server.py``, on
loopback, is reachable from every node. Ray turns ``127.0.0.1`` into the machine's own address
(``ray._private.services.resolve_ip_for_localhost``), so the nodes register with that address
(192.0.2.2 on the dev VM; 127.0.0.1 where loopback is the only interface); ``address`` is
``127.0.0.1:<GCS port>`` (the GCS listens on every interface). One consequence: Ray Train
numbers nodes by IP, so its workers on two worker nodes get node_rank 0 and local_rank 0 and 1
(harmless on CPUs; ``mot_core`` reads LOCAL_RANK only for CUDA under torchrun).

Ray's own state stays off the shared /tmp: the head's temp dir is a fresh ``/tmp/raycl-*`` folder
(short: Ray's socket paths under it must fit 107 bytes) and each worker node's is its private
``/tmp/ray``. Two nodes on one temp dir fail to start, and every ``ray start`` (worker nodes too)
writes ``<temp dir>/ray_current_cluster``, which ``ray.init()`` without an address on this
machine would then join, a stale one included. Every port a node would take at a fixed default
(the dashboard agent's 52365, the head's client server 10001 and dashboard 8265, the worker
port range 10002-19999) is a free one or left to the OS.

Code shipped to a worker node must be importable there: a function defined in a test module is
pickled *by reference* (``import test_xxx`` on the node, which fails: tests/ is not there) unless
it is nested in a function (pickled by value) or its module is registered with
``ray.cloudpickle.register_pickle_by_value``. That is the point: the framework's own Ray code
lives in the installed package.

Needs root (mount namespaces) and ``unshare`` (util-linux): without them ``local_cluster`` raises
``ClusterError`` saying so; it never skips. ``python -m tools.cluster up|down`` starts one from the
command line (``tools/cluster``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mot_core", "plugins", "registry")  # the distribution's top-level packages
OBJECT_STORE_BYTES = 200 * 1024 * 1024
START_TIMEOUT_S = 120.0  # every node of a bring-up (2 cores shared with other work)
DEATH_TIMEOUT_S = 30.0
# The GCS declares a raylet dead after this many failed health checks (Ray's defaults: 3 s
# apart, 5 of them); a killed node is then seen dead ~3 s later instead of ~15 s.
HEAD_RAY_CONFIG = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                   "RAY_health_check_failure_threshold": "3"}
PR_SET_PDEATHSIG = 1


class ClusterError(RuntimeError):
    """The cluster could not be started (or a node did not join)."""


@dataclass(frozen=True)
class NodeView:
    """What a worker node's processes see of this machine's files: ``hidden`` folders are each
    covered by an empty tmpfs; ``kept`` ones (inside hidden folders) are bound back read-only."""

    hidden: tuple[str, ...]
    kept: tuple[str, ...]

    def describe(self) -> str:
        lines = ["a worker node sees the machine's root file system except:"]
        lines += [f"  {path}: an empty private tmpfs" for path in (*self.hidden, "/dev/shm")]
        lines += [f"  {path}: bound back read-only" for path in self.kept]
        lines.append("  /proc: its own PID namespace's")
        return "\n".join(lines)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _outermost(paths) -> tuple[str, ...]:
    """The paths that are inside no other one of them, sorted."""
    unique = sorted(set(paths), key=lambda p: (p.count("/"), p))
    kept: list[str] = []
    for path in unique:
        if not any(_under(path, other) for other in kept):
            kept.append(path)
    return tuple(sorted(kept))


def package_dirs() -> list[str]:
    """The folders the installed packages are imported from, as a node's Python finds them
    (isolated mode, started in /: no PYTHONPATH, no current folder; for the editable install,
    the repository's source folders that its finder maps them to)."""
    code = ("import importlib.util, json, sys\n"
            f"specs = [importlib.util.find_spec(n) for n in {PACKAGES!r}]\n"
            "print(json.dumps([list(s.submodule_search_locations) if s else None for s in specs]))")
    found = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    if found.returncode != 0:
        raise ClusterError(f"cannot locate the installed packages: {found.stderr.strip()}")
    dirs = []
    for name, locations in zip(PACKAGES, json.loads(found.stdout)):
        if not locations:
            raise ClusterError(f"package {name} is not installed in {sys.prefix} (pip install -e .)")
        dirs.extend(locations)
    return dirs


def node_view(hide=(), keep=()) -> NodeView:
    """The worker nodes' view: hidden are /tmp, /var/tmp, $HOME, the repository root, the current
    folder and ``hide``; kept are the venv, its base Python, the package sources and ``keep``
    (only those under a hidden folder need a bind mount)."""
    for path in hide:
        if os.path.realpath(path) == "/":
            raise ClusterError("cannot hide / from a node")
    candidates = ["/tmp", "/var/tmp", str(Path.home()), str(ROOT), os.getcwd(), *hide]
    hidden = _outermost(p for p in map(os.path.realpath, candidates) if p != "/" and os.path.isdir(p))
    wanted = [sys.prefix, sys.base_prefix, *package_dirs(), *keep]
    kept = []
    for path in wanted:
        for variant in {os.path.abspath(path), os.path.realpath(path)}:
            if _under(variant, "/dev/shm"):
                raise ClusterError(f"{variant}: a node's /dev/shm is its own; cannot keep a path there")
            if os.path.exists(variant) and any(_under(variant, root) for root in hidden):
                kept.append(variant)
    return NodeView(hidden, _outermost(kept))


def mount_script(view: NodeView) -> str:
    """The shell script a worker node's namespace runs before ``exec "$@"`` (``ray start``):
    the kept paths are bound read-only into a staging tmpfs (the node's own /dev/shm) while they
    are still visible, the hidden folders are covered, then the kept paths are moved into place."""
    q = shlex.quote
    stage = "/dev/shm/.keep"
    lines = ["set -eu", "mount -t tmpfs -o mode=1777 node-shm /dev/shm", f"mkdir {stage}"]
    for i, path in enumerate(view.kept):
        make = f"mkdir {stage}/{i}" if os.path.isdir(path) else f"touch {stage}/{i}"
        lines.append(f"{make} && mount --bind -o ro {q(path)} {stage}/{i}")
    for path in view.hidden:
        mode = "1777" if path in ("/tmp", "/var/tmp") else "0755"
        lines.append(f"mount -t tmpfs -o mode={mode} node-hidden {q(path)}")
    for i, path in enumerate(view.kept):
        if os.path.isdir(path):
            make = f"mkdir -p {q(path)}"
        else:
            make = f"mkdir -p {q(os.path.dirname(path))} && touch {q(path)}"
        lines.append(f"{make} && mount --move {stage}/{i} {q(path)}")
    lines += [f"rm -rf {stage}", "cd /", 'exec "$@"']
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


_PREFLIGHT: list[str] = []


def check_namespaces() -> None:
    """Raise ``ClusterError`` unless this process can make the namespaces a worker node needs."""
    if _PREFLIGHT:
        return
    why = None
    if sys.platform != "linux":
        why = "needs Linux"
    elif shutil.which("unshare") is None:
        why = "needs `unshare` (util-linux) on PATH"
    elif os.geteuid() != 0:
        why = f"needs root for mount namespaces (running as uid {os.geteuid()})"
    else:
        probe = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc", "--",
             "/bin/sh", "-c", "mount -t tmpfs probe /tmp && mount -t tmpfs probe /dev/shm"],
            capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            why = f"`unshare --mount --pid` failed here: {(probe.stderr or probe.stdout).strip()}"
    if why:
        raise ClusterError(f"a local multi-node Ray cluster (tests/cluster.py) {why}; its worker nodes run "
                           "in their own mount and PID namespaces so that they share no file system")
    _PREFLIGHT.append("ok")


def _die_with_parent(signum: int):
    """A preexec_fn: ``signum`` to the started process when the process that started it dies.
    A worker node's `unshare` gets SIGKILL (it ignores SIGTERM while it waits for its child) and
    its ``--kill-child`` SIGKILLs the namespace; the head's shell gets SIGTERM, and kills its group."""
    def preexec() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)

    return preexec


def _stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of /proc/<pid>/stat (state, ppid, pgrp, ...), or None. (psutil is
    importable only after ``import ray``, which puts its thirdparty_files on sys.path.)"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): with the PID, a process's identity."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))):
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Node:
    """One Ray node: ``name`` is also its custom resource (``head``, ``worker_0``, ...)."""

    name: str
    # a worker node: `unshare`, whose child is the namespace's first process (`ray start`); the
    # head: the shell that runs `ray start` and leads the head's process group
    proc: subprocess.Popen
    log: Path  # what `ray start` printed
    temp_dir: str  # Ray's temp dir, as the node sees it
    node_id: str | None = None  # hex, once the GCS lists it
    started_s: float = 0.0

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def init_pid(self) -> int | None:
        """PID (in this machine's namespace) of the node's first process, or None."""
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                children = f.read().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def kill(self) -> None:
        """SIGKILL to every process of the node: a worker node's are in its PID namespace (the
        kernel kills them all with the first one); the head's in its process group."""
        if self.name != "head":
            pid = self.init_pid()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid if pid else self.proc.pid, signal.SIGKILL)
            return
        below = descendants(self.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in below:  # any that left the group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def files_root(self) -> str:
        """Where this machine reads the node's own file system (while it lives)."""
        pid = self.init_pid()
        return f"/proc/{pid}/root" if pid else "/nonexistent"

    def ray_logs(self, names=("raylet.out", "raylet.err", "gcs_server.err")) -> str:
        root = self.temp_dir if self.name == "head" else self.files_root() + self.temp_dir
        parts = []
        for name in names:
            path = Path(root, "session_latest", "logs", name)
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if text.strip():
                    parts.append(f"--- {name}\n{_tail(text, 15)}")
        return "\n".join(parts)

    def describe_failure(self) -> str:
        out = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- ray start ({self.log})\n{_tail(out)}\n{self.ray_logs()}"


@dataclass
class LocalCluster:
    """A running ``local_cluster``: ``address`` (``127.0.0.1:<GCS port>``), ``head``, ``workers``
    (every worker node started, in order; a killed one stays, ``alive`` False), ``view`` (what a
    worker node sees), ``env`` (what a driver in another process needs besides the address:
    Ray's auth mode), ``timings``."""

    base: Path  # this machine's folder for the cluster: the head's temp dir and the nodes' logs
    view: NodeView
    cpus_per_worker: int
    extra_env: dict
    die_with_parent: bool
    head_cpus: int
    head: Node | None = None
    workers: list[Node] = field(default_factory=list)
    address: str = ""
    auth_env: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    _gcs: object = None

    # -- what tests use -------------------------------------------------------------------

    @property
    def env(self) -> dict:
        return dict(self.auth_env)

    @property
    def node_ids(self) -> dict[str, str]:
        """Resource name -> node id (hex), live nodes only."""
        return {n.name: n.node_id for n in [self.head, *self.workers] if n is not None and n.alive}

    @property
    def live_workers(self) -> list[Node]:
        return [n for n in self.workers if n.alive]

    def kill_node(self, i: int, wait: bool = True) -> Node:
        """Kill worker node ``i`` (as started, from 0) as a crash: SIGKILL to its namespace's
        first process, which takes every process of the node with it (raylet, agents, workers).
        ``wait``: until the GCS lists it dead."""
        node = self.workers[i]
        if not node.alive:
            raise ClusterError(f"{node.name} is not running")
        node.kill()
        node.proc.wait(timeout=30)
        if wait:
            self.wait_dead(i)
        return node

    def wait_dead(self, i: int) -> None:
        """Until the GCS lists killed worker node ``i`` dead (~3-6 s after the kill: it misses
        3 health checks 1 s apart)."""
        node = self.workers[i]
        deadline = time.monotonic() + DEATH_TIMEOUT_S
        while node.node_id and self._state(node.node_id) == "ALIVE":
            if time.monotonic() > deadline:
                raise ClusterError(f"the GCS still lists {node.name} alive {DEATH_TIMEOUT_S:.0f} s after its kill")
            time.sleep(0.2)

    def add_node(self, cpus: int | None = None) -> Node:
        """Start one more worker node (``worker_<n>``, n = the number started so far), as an
        autoscaler would, and wait until it joins."""
        node = self._start_worker(len(self.workers), self.cpus_per_worker if cpus is None else cpus)
        self.workers.append(node)
        self._wait_alive([node])
        return node

    def state(self) -> dict:
        """What ``stop_detached`` needs to stop this cluster from another process (``python -m
        tools.cluster down``): each live node's process (its group for the head, its namespace's
        first process for a worker node) with its start time, against a reused PID."""
        nodes = []
        for node in [self.head, *self.workers]:
            pid = node.proc.pid if node.name == "head" else node.init_pid()
            if node.alive and pid:
                nodes.append({"name": node.name, "node_id": node.node_id, "pid": pid, "started": start_ticks(pid)})
        return {"address": self.address, "base": str(self.base), "env": self.env, "nodes": nodes,
                "view": {"hidden": list(self.view.hidden), "kept": list(self.view.kept)}}

    def logs(self, node: Node | None = None) -> str:
        nodes = [node] if node else [self.head, *self.workers]
        return "\n".join(f"=== {n.name}\n{n.describe_failure()}" for n in nodes if n is not None)

    # -- bring-up ------------------------------------------------------------------------

    def _ray(self) -> list[str]:
        beside = Path(sys.executable).parent / "ray"
        return [str(beside)] if beside.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]

    def _common_flags(self, temp_dir: str, resources: dict, cpus: int) -> list[str]:
        return [f"--num-cpus={cpus}", f"--resources={json.dumps(resources)}",
                f"--object-store-memory={OBJECT_STORE_BYTES}", f"--temp-dir={temp_dir}",
                # 0 and 0: each worker binds a port the OS picks (the default range 10002-19999
                # is the same for every node, and two raylets would hand out the same port)
                "--min-worker-port=0", "--max-worker-port=0",
                f"--dashboard-agent-listen-port={free_port()}",  # default 52365 on every node
                "--disable-usage-stats", "--block"]

    def _popen(self, name: str, argv: list[str], env: dict, death_signal: int) -> Node:
        log = self.base / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd="/", start_new_session=True,
                                    preexec_fn=_die_with_parent(death_signal) if self.die_with_parent else None)
        return Node(name, proc, log, "", started_s=time.monotonic())

    def _start_head(self) -> Node:
        """The head, in this machine's namespaces (the driver talks to its raylet through its
        session dir; in a PID namespace of its own, the raylet would not find the driver's PID).
        Its processes stay in the process group of a shell that kills that group on SIGTERM
        (sent when this process dies: ``die_with_parent``)."""
        port = free_port()
        temp_dir = str(self.base / "head")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(self.auth_env, **HEAD_RAY_CONFIG, **self.extra_env)
        argv = ["/bin/sh", "-c", 'trap "kill -KILL 0" TERM HUP INT; "$@" & wait $!', "head",
                *self._ray(), "start", "--head", f"--port={port}", "--include-dashboard=false",
                f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",  # default 8265, 10001
                *self._common_flags(temp_dir, {"head": 1}, self.head_cpus)]
        node = self._popen("head", argv, env, signal.SIGTERM)
        node.temp_dir = temp_dir
        self.address = f"127.0.0.1:{port}"
        return node

    def _worker_env(self) -> dict:
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": str(Path.home()), "LANG": os.environ.get("LANG", "C.UTF-8")}
        env.update(self.auth_env, **self.extra_env)
        return env

    def _start_worker(self, index: int, cpus: int) -> Node:
        name = f"worker_{index}"
        temp_dir = "/tmp/ray"  # in the node's private /tmp
        argv = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc", "--kill-child",
                "--", "/bin/sh", "-c", mount_script(self.view), name,
                *self._ray(), "start", f"--address={self.address}",
                *self._common_flags(temp_dir, {name: 1, "worker": 1}, cpus)]
        node = self._popen(name, argv, self._worker_env(), signal.SIGKILL)
        node.temp_dir = temp_dir
        return node

    def _client(self):
        if self._gcs is None:
            from ray._raylet import GcsClient

            self._gcs = GcsClient(address=self.address)
        return self._gcs

    def _infos(self) -> list:
        try:
            return list(self._client().get_all_node_info(timeout=5).values())
        except Exception:  # the GCS is not up yet
            return []

    def _state(self, node_id: str) -> str:
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        for info in self._infos():
            if info.node_id.hex() == node_id:
                return GcsNodeInfo.GcsNodeState.Name(info.state)
        return "UNKNOWN"

    def _wait_alive(self, nodes: list[Node]) -> None:
        """Until the GCS lists each node (found by its resource) alive; a node whose
        `ray start` exits, or the timeout, raises with the logs."""
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        pending = {n.name: n for n in nodes}
        deadline = time.monotonic() + START_TIMEOUT_S
        while pending:
            for info in self._infos():
                if info.state == GcsNodeInfo.GcsNodeState.ALIVE:
                    for name in [k for k in pending if k in info.resources_total]:
                        node = pending.pop(name)
                        node.node_id = info.node_id.hex()
                        self.timings[f"{name}_up_s"] = round(time.monotonic() - node.started_s, 2)
            for node in pending.values():
                if not node.alive:
                    raise ClusterError(f"Ray node {node.name} exited while starting (code {node.proc.returncode}):\n"
                                       f"{node.describe_failure()}")
            if pending and time.monotonic() > deadline:
                raise ClusterError(f"Ray nodes {sorted(pending)} did not join in {START_TIMEOUT_S:.0f} s:\n"
                                   + "\n".join(n.describe_failure() for n in pending.values()))
            if pending:
                time.sleep(0.2)

    def start(self, workers: int) -> None:
        began = time.monotonic()
        self.head = self._start_head()
        # the workers at once: `ray start --address` waits for the GCS (~1.5 s less than
        # after the head is up, on 2 cores)
        self.workers = [self._start_worker(i, self.cpus_per_worker) for i in range(workers)]
        self._wait_alive([self.head, *self.workers])
        self.timings["up_s"] = round(time.monotonic() - began, 2)

    # -- teardown ------------------------------------------------------------------------

    def _disconnect_driver(self) -> None:
        """``ray.shutdown()`` if this process is still a driver of this cluster: a driver whose
        GCS goes away exits (after Ray's reconnect timeout), taking pytest with it."""
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return
        with contextlib.suppress(Exception):
            ours = ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1] == self.address.rsplit(":", 1)[-1]
            if ours:
                ray.shutdown()

    def close(self) -> None:
        began = time.monotonic()
        self._disconnect_driver()
        self._gcs = None
        nodes = [n for n in [*self.workers, self.head] if n is not None]
        for node in nodes:  # workers first: no node outlives the GCS
            if node.alive or node.name == "head":
                node.kill()
        for node in nodes:
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)
        self.timings["down_s"] = round(time.monotonic() - began, 2)


def stop_detached(state: dict) -> list[str]:
    """Kill the nodes of a cluster started by another process (``LocalCluster.state``) and
    remove its folder; the names of the nodes killed (a node whose PID now names another
    process, or none, is left alone)."""
    killed = []
    for node in sorted(state["nodes"], key=lambda n: n["name"] == "head"):  # workers first
        pid = node["pid"]
        if start_ticks(pid) != node["started"]:
            continue
        below = descendants(pid) if node["name"] == "head" else []
        with contextlib.suppress(ProcessLookupError):
            if node["name"] == "head":
                os.killpg(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        for child in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        killed.append(node["name"])
    shutil.rmtree(state["base"], ignore_errors=True)
    return killed


def ray_auth_env() -> dict:
    """The nodes' auth setting, the one a driver in this process uses when it connects: Ray
    2.5x+ starts a head with token authentication when ``RAY_AUTH_MODE`` is unset, but a driver
    that connects with ``ray.init(address=...)`` uses no token unless ``RAY_AUTH_MODE=token``.
    So: token mode (this process's token, passed to every node) only if asked for here."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {"RAY_AUTH_MODE": "disabled"}
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if not path.is_file():
            raise ClusterError(f"RAY_AUTH_MODE=token but no RAY_AUTH_TOKEN and no token file {path}")
        token = path.read_text().strip()
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def start_cluster(workers: int = 2, cpus_per_worker: int = 1, extra_env: dict | None = None, head_cpus: int = 0,
                  hide=(), keep=(), die_with_parent: bool = True) -> LocalCluster:
    """Start a cluster (see ``local_cluster``); the caller closes it (``LocalCluster.close``)."""
    check_namespaces()
    base = Path(tempfile.mkdtemp(prefix="raycl-", dir="/tmp"))  # short: Ray's socket paths are under it
    cluster = LocalCluster(base, node_view(hide, keep), cpus_per_worker, dict(extra_env or {}), die_with_parent,
                           head_cpus, auth_env=ray_auth_env())
    try:
        cluster.start(workers)
    except BaseException:
        cluster.close()
        raise
    return cluster


@contextlib.contextmanager
def local_cluster(workers: int = 2, cpus_per_worker: int = 1, extra_env: dict | None = None, head_cpus: int = 0,
                  hide=(), keep=()):
    """A head node (``head_cpus`` CPUs, 0 by default) and ``workers`` worker nodes of
    ``cpus_per_worker`` CPUs, each worker node in its own mount namespace (module docstring);
    ``extra_env`` goes to every node's Ray processes. Yields the ``LocalCluster``; on exit this
    process leaves the cluster (``ray.shutdown``) if it joined it, and every node is killed."""
    cluster = start_cluster(workers, cpus_per_worker, extra_env, head_cpus, hide, keep)
    try:
        yield cluster
    finally:
        cluster.close()
