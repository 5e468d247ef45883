"""Plugin manager: loads every plugin of the ``mot.plugins`` entry-point group (built-ins
included, registered the same way) and indexes what they contribute by name."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from mot_core.errors import MotError
from registry import hookspecs

ENTRY_POINT_GROUP = "mot.plugins"
KINDS = ("modalities", "losses", "evaluators", "datasets")
SINGULAR = {"modalities": "modality", "losses": "loss", "evaluators": "evaluator", "datasets": "dataset"}


@dataclass(frozen=True)
class PluginInfo:
    name: str  # entry-point name
    module: str
    distribution: str  # "package version" that declared the entry point


class Registry:
    """Everything the registered plugins contribute, looked up by name."""

    def __init__(self, manager: pluggy.PluginManager, plugins: list[PluginInfo]):
        self.manager = manager
        self.plugins = plugins
        self._tables: dict[str, dict[str, tuple[type, PluginInfo]]] = {}
        by_module = {info.module: info for info in plugins}
        for kind in KINDS:
            table: dict[str, tuple[type, PluginInfo]] = {}
            hook = getattr(manager.hook, f"mot_{kind}")
            for impl in hook.get_hookimpls():
                info = by_module.get(impl.plugin_name) or PluginInfo(impl.plugin_name, impl.plugin_name, "registered in code")
                for cls in impl.function() or []:
                    if cls.name in table:
                        other = table[cls.name][1]
                        raise MotError(
                            f"plugins '{other.name}' and '{info.name}' both register a {SINGULAR[kind]} named '{cls.name}'"
                        )
                    table[cls.name] = (cls, info)
            self._tables[kind] = table

    def names(self, kind: str) -> list[str]:
        return sorted(self._tables[kind])

    def get(self, kind: str, name: str, where: str) -> type:
        """The class registered under ``name``; a one-line error listing the known ones if absent."""
        table = self._tables[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise MotError(f"unknown {SINGULAR[kind]} '{name}' in {where}; registered {kind}: {known}")
        return table[name][0]

    def contributions(self) -> list[tuple[str, str, PluginInfo]]:
        """(kind, name, plugin) for every contribution, for ``mot plugins``."""
        return [(kind, name, info) for kind in KINDS for name, (_, info) in sorted(self._tables[kind].items())]

    def tower_defaults(self, modality: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for result in reversed(self.manager.hook.mot_tower_defaults(modality=modality)):
            merged.update(result or {})
        return merged


def _load_entry_points(manager: pluggy.PluginManager) -> list[PluginInfo]:
    infos = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin is named, not a traceback
            raise MotError(f"plugin '{ep.name}' ({ep.value}) failed to import: {type(exc).__name__}: {exc}") from exc
        if manager.is_registered(plugin):
            continue
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
        manager.register(plugin, name=ep.value)
        infos.append(PluginInfo(ep.name, ep.value, dist))
    return infos


def build_registry(extra_plugins: tuple[Any, ...] = ()) -> Registry:
    """A fresh registry from the entry points plus ``extra_plugins`` (modules or objects
    registered in code, e.g. by tests)."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    infos = _load_entry_points(manager)
    for plugin in extra_plugins:
        name = getattr(plugin, "__name__", type(plugin).__name__)
        manager.register(plugin, name=name)
    manager.check_pending()
    return Registry(manager, infos)


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry of installed plugins."""
    return build_registry()
