"""Plugin manager: loads every plugin of the ``mot.plugins`` entry-point group (built-ins
included, registered the same way) and indexes what they contribute by name."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy
from pydantic import BaseModel

from mot_core.errors import MotError, plugin_boundary
from mot_core.plugin_api import DataSource, Evaluator, Loss, Modality, PluginOptions
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
        self._by_module = {info.module: info for info in plugins}
        for kind in KINDS:
            table: dict[str, tuple[type, PluginInfo]] = {}
            hook = getattr(manager.hook, f"mot_{kind}")
            for impl in hook.get_hookimpls():
                info = self.info(impl.plugin_name)
                for cls in _checked_classes(kind, info, impl.function):
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
            installed = ", ".join(sorted(info.name for info in self.plugins)) or "none"
            raise MotError(
                f"unknown {SINGULAR[kind]} '{name}' in {where}; registered {kind}: {known} (installed plugins: "
                f"{installed}; a plugin package is found once installed, through an entry point in its "
                f"pyproject.toml: [project.entry-points.\"{ENTRY_POINT_GROUP}\"] NAME = \"your_package\")")
        return table[name][0]

    def contributions(self) -> list[tuple[str, str, PluginInfo]]:
        """(kind, name, plugin) for every contribution, for ``mot plugins``."""
        return [(kind, name, info) for kind in KINDS for name, (_, info) in sorted(self._tables[kind].items())]

    def info(self, plugin_name: str) -> PluginInfo:
        return self._by_module.get(plugin_name) or PluginInfo(plugin_name, plugin_name, "registered in code")

    def tower_defaults(self, modality: str) -> dict[str, Any]:
        """Merged recommendations of every plugin (pluggy calls the last registered first)."""
        merged: dict[str, Any] = {}
        for impl in reversed(self.manager.hook.mot_tower_defaults.get_hookimpls()):
            where = f"{describe(self.info(impl.plugin_name))}: hook mot_tower_defaults(modality={modality!r})"
            with plugin_boundary(where):
                result = impl.function(modality=modality)
            if result is not None and not isinstance(result, dict):
                raise MotError(f"{where} returned {_shown(result)}; expected a dict of tower keys (ffn, group, qk_norm) or None")
            merged.update(result or {})
        return merged


def describe(info: PluginInfo) -> str:
    return f"plugin '{info.name}' ({info.distribution}, module {info.module})"


_BASES = {"modalities": Modality, "losses": Loss, "evaluators": Evaluator, "datasets": DataSource}


def _shown(value: Any) -> str:
    if isinstance(value, type):
        return f"the class {value.__name__}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _checked_classes(kind: str, info: PluginInfo, hook_function) -> list[type]:
    """Call one plugin's ``mot_<kind>`` hook and check what it returned: a list of classes,
    each a subclass of the kind's base class with a ``name`` and a pydantic ``Options``, and
    no abstract method left. Each class is tagged with its plugin (``plugin_api.origin``)."""
    base = _BASES[kind]
    where = f"{describe(info)}: hook mot_{kind}()"
    with plugin_boundary(where):
        result = hook_function()
    if result is None:
        return []
    expected = f"expected a list of {base.__name__} subclasses (classes, not instances)"
    if not isinstance(result, (list, tuple)):
        raise MotError(f"{where} returned {_shown(result)}; {expected}")
    for position, cls in enumerate(result):
        item = f"{where} item {position}"
        if not isinstance(cls, type):
            raise MotError(f"{item} is {_shown(cls)}; {expected}")
        if not issubclass(cls, base):
            kinds = [k for k, b in _BASES.items() if issubclass(cls, b)]
            hint = f" (it is a {_BASES[kinds[0]].__name__}: return it from mot_{kinds[0]})" if kinds else ""
            raise MotError(f"{item} is the class {cls.__name__}, not a subclass of {base.__name__}{hint}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise MotError(f"{item}: class {cls.__name__} has name {name!r}; set a class attribute name = '...' "
                           "(its key in the config)")
        options = getattr(cls, "Options", PluginOptions)
        if not (isinstance(options, type) and issubclass(options, BaseModel)):
            raise MotError(f"{item}: {cls.__name__}.Options is {_shown(options)}; expected a pydantic model "
                           "(subclass mot_core.plugin_api.PluginOptions)")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise MotError(f"{item}: {cls.__name__} does not implement {missing}")
        cls.__mot_origin__ = describe(info)
    return list(result)


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
