"""The architecture, checked: import-linter contracts (pyproject.toml) and no import cycles.

Layers of mot_core, top to bottom: cli > bench | distributed | testing > runs > training >
experiment > hf | generate | devices > data > model > plugin_api : config : plotting > progress >
errors; model is pure torch; plugins use only plugin_api, errors and registry. The built-in plugins are independent of each other; what they share lives in
plugins.common, which imports none of them. Both checks read the source statically, so they
take well under a second.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mot_core", "registry", "plugins")


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports} missing: pip install -e '.[test]'"
    # --no-cache: leave no .import_linter_cache behind in the checkout.
    result = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"lint-imports exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )


def find_cycle(graph: grimp.ImportGraph) -> list[str] | None:
    """One import cycle as a chain ``[a, b, ..., a]``, or None: an iterative depth-first search."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph.modules, WHITE)
    for root in sorted(graph.modules):
        if colour[root] != WHITE:
            continue
        colour[root] = GREY
        path = [root]
        stack = [iter(sorted(graph.find_modules_directly_imported_by(root)))]
        while stack:
            child = next(stack[-1], None)
            if child is None:  # every import of path[-1] explored
                stack.pop()
                colour[path.pop()] = BLACK
            elif colour[child] == GREY:  # back edge: child is on the current path
                return path[path.index(child):] + [child]
            elif colour[child] == WHITE:
                colour[child] = GREY
                path.append(child)
                stack.append(iter(sorted(graph.find_modules_directly_imported_by(child))))
    return None


def test_find_cycle_reports_the_chain():
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c", "d"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    graph.add_import(importer="c", imported="d")
    assert find_cycle(graph) is None
    graph.add_import(importer="d", imported="b")
    assert find_cycle(graph) == ["b", "c", "d", "b"]


def test_no_import_cycles():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_example_third_party_plugin_imports_only_the_plugin_api():
    """The example package (outside root_packages, so outside import-linter's view) reaches
    the framework only through plugin_api, errors and registry: a plugin needs nothing else."""
    source = str(REPO / "examples" / "timeseries_plugin")
    sys.path.insert(0, source)
    try:
        graph = grimp.build_graph("mot_timeseries", *PACKAGES, cache_dir=None)
    finally:
        sys.path.remove(source)
    allowed = {"mot_core.plugin_api", "mot_core.errors", "registry"}
    reached = {
        (module, imported)
        for module in graph.find_children("mot_timeseries") | {"mot_timeseries"}
        for imported in graph.find_modules_directly_imported_by(module)
        if imported.split(".")[0] in PACKAGES
    }
    assert reached, "the example plugin should import the plugin API"
    assert {imported for _, imported in reached} <= allowed, sorted(p for p in reached if p[1] not in allowed)
