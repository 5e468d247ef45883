"""The local multi-node Ray cluster of ``tests/cluster.py`` (issue 31): worker nodes that run the
installed package but see none of the launching machine's files, a node crash and a
replacement node."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cluster import ROOT

pytestmark = pytest.mark.slow


def test_worker_nodes_share_no_files_and_a_crashed_node_is_replaced(ray_cluster, tmp_path):
    import ray

    secret = tmp_path / "secret.txt"
    secret.write_text("only the launching machine has this")
    # files of the launching machine a worker node must not see: the test's tmp_path, the
    # repository outside the package sources, the user's Ray token folder
    hidden = [secret, ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "tests" / "test_cluster.py",
              ROOT / "examples", Path.home() / ".ray", ray_cluster.base]  # base: the head's Ray files
    hidden += [ROOT / name for name in ("runs", "data") if (ROOT / name).exists()]
    hidden = [str(p) for p in hidden if p.exists()]
    assert len(hidden) >= 5

    # nested: pickled by value (a function of this module would be imported by name on the
    # node, and tests/ is not there)
    def look(paths: list[str], marker: str) -> dict:
        import importlib.metadata
        import os

        import mot_core
        import mot_core.config  # noqa: F401  (the package's modules import on the node)
        import ray as node_ray

        with open(f"/tmp/{marker}", "w") as f:  # the node's own /tmp
            f.write("written on a worker node")
        return {
            "node": node_ray.get_runtime_context().get_node_id(),
            "seen": [p for p in paths if os.path.exists(p)],
            "package": mot_core.__file__,
            "source": len(open(mot_core.__file__).read()),
            "plugins": sorted(ep.name for ep in importlib.metadata.entry_points(group="mot.plugins")),
            "wrote": os.path.exists(f"/tmp/{marker}"),
        }

    probe = ray.remote(num_cpus=1)(look)
    ray.init(address=ray_cluster.address, log_to_driver=False)
    try:
        head = ray.get_runtime_context().get_node_id()
        assert head == ray_cluster.node_ids["head"]  # the driver runs on the head
        markers = {name: f"node-{uuid.uuid4().hex}" for name in ("worker_0", "worker_1")}
        refs = {name: probe.options(resources={name: 1}).remote(hidden, marker) for name, marker in markers.items()}
        for name, ref in refs.items():
            seen = ray.get(ref, timeout=120)
            assert seen["node"] == ray_cluster.node_ids[name] != head  # (a) it ran on that worker node
            assert seen["package"] == str(ROOT / "mot_core" / "__init__.py") and seen["source"] > 0  # (b)
            assert {"text", "images", "autoregressive"} <= set(seen["plugins"])  # the venv's entry points
            assert seen["seen"] == []  # (c) none of the launching machine's files
            assert seen["wrote"] and not Path("/tmp", markers[name]).exists()  # (d) its /tmp is its own

        # a node crash, and a replacement (as an autoscaler would start one) that joins
        ray_cluster.kill_node(0, wait=False)
        replacement = ray_cluster.add_node()
        ray_cluster.wait_dead(0)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert ray_cluster.workers[0].node_id not in alive
        assert {ray_cluster.node_ids["worker_1"], replacement.node_id} <= alive
        seen = ray.get(probe.options(resources={replacement.name: 1}).remote(hidden, "x"), timeout=120)
        assert seen["node"] == replacement.node_id and seen["seen"] == []
    finally:
        ray.shutdown()
